"""Reading and writing labelmaps with SimpleITK, keeping their geometry.

Writes go to a temporary folder next to the destination and are renamed into place, so a
failure never leaves a half-written output behind.
"""

import os
import shutil
import struct
import tempfile
import zlib
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry

LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_IO = {".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO", ".nrrd": "NrrdImageIO", ".seg.nrrd": "NrrdImageIO",
            ".nhdr": "NrrdImageIO", ".mha": "MetaImageIO", ".mhd": "MetaImageIO"}
# headers whose voxels ITK writes to a file of their own beside them (compressed, as write_labelmap does)
DATA_FILE_SUFFIXES = {".mhd": ".zraw", ".nhdr": ".raw.gz"}


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in sorted(LABELMAP_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return os.path.splitext(name)[1]


def _nifti_data_end(head: bytes) -> Optional[int]:
    """Where a single-file NIfTI-1 or -2 image's voxel data ends (bytes from the file's start), from
    its header; None when `head` is not such a header."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            header = 348
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            header = 540
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or any(d < 0 for d in dims[1:dims[0] + 1]) or bitpix <= 0:
        return None
    return max(offset, header) + int(np.prod(dims[1:dims[0] + 1], dtype=np.float64)) * bitpix // 8


METAIMAGE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


HEADER_BYTES = 1 << 16  # as much of a file as its text header may take


def _head(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(HEADER_BYTES)


def _metaimage_fields(head: bytes) -> Tuple[dict, Optional[int]]:
    """A MetaImage header's fields, up to ElementDataFile (its last), and the offset where its
    voxels begin (None when the header does not get that far)."""
    fields = {}
    for line in head.split(b"\n"):
        name, separator, value = line.decode("latin-1").partition("=")
        if not separator:  # a blank or stray line
            continue
        fields[name.strip()] = value.strip()
        if name.strip() == "ElementDataFile":
            return fields, head.index(line) + len(line) + 1
    return fields, None


def _named_data_file(header_path: str, value: Optional[str]) -> Optional[str]:
    """The one data file a header names (ElementDataFile, NRRD's data file), beside the header;
    None when the data is in the header itself or in a list or pattern of files."""
    if not value or value.upper() in ("LOCAL", "LIST") or " " in value or "%" in value:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(header_path)), value)


def _check_metaimage(path: str) -> None:
    """Raise InputError when a MetaImage header ends before it names its data, or its voxel data
    is shorter than it says (not checked: a list of data files, a type not listed)."""
    head = _head(path)
    fields, header_bytes = _metaimage_fields(head)
    data = fields.get("ElementDataFile")
    if data is None and len(head) < HEADER_BYTES:
        raise InputError(f"{path} is truncated or corrupt (its header ends before it names the voxel data)")
    if fields.get("BinaryData", "True").lower() == "false":  # voxels as text: no size to check
        return
    try:
        voxels = int(np.prod([int(v) for v in fields["DimSize"].split()], dtype=np.float64))
        needed = voxels * int(fields.get("ElementNumberOfChannels", "1")) * METAIMAGE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return
    if fields.get("CompressedData", "False").lower() == "true":
        if "CompressedDataSize" not in fields or not fields["CompressedDataSize"].isdigit():
            return
        needed = int(fields["CompressedDataSize"])
    data_path = _named_data_file(path, data)
    if data == "LOCAL" and header_bytes is not None:
        there = os.path.getsize(path) - header_bytes
    elif data_path is not None and os.path.isfile(data_path):  # a missing one: said by _metaimage_reason
        there = os.path.getsize(data_path)
    else:
        return
    if there < needed:
        raise InputError(f"{path} is truncated or corrupt ({there} bytes of voxel data of the {needed} its header says)")


def _check_complete(path: str) -> None:
    """Raise InputError when a NIfTI or MetaImage file holds less data than its header says, or a
    gzip stream ends early: ITK would fill the rest with zeros (NIfTI) or print its own complaint
    (MetaImage). Reads a .gz to its end (cheap for labelmaps)."""
    if _suffix(path) in (".mha", ".mhd"):
        _check_metaimage(path)
        return
    if _suffix(path) not in (".nii", ".nii.gz"):
        return
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
        handle.seek(0)
        if not gzipped:
            head, length = handle.read(540), os.fstat(handle.fileno()).st_size
    if gzipped:
        # one gzip member, decompressed to its end; bytes after it are ignored, as ITK ignores them
        stream, head, length, ended = zlib.decompressobj(wbits=31), b"", 0, False
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    data = stream.decompress(block)
                    if len(head) < 540:
                        head += data[:540 - len(head)]
                    length += len(data)
                    if stream.eof:
                        ended = True
                        break
        except zlib.error:
            ended = False
        if not ended:
            raise InputError(f"{path} is truncated or corrupt (its compressed data ends early or is damaged)")
    expected = _nifti_data_end(head)
    if expected is not None and length < expected:
        raise InputError(f"{path} is truncated or corrupt ({length} bytes of the {expected} its header says)")


def written_files(path: str) -> List[str]:
    """The files that writing a labelmap to `path` makes: `path` and, for a header with a data
    file of its own (.mhd, .nhdr), that file beside it (the header's name, another suffix)."""
    suffix = _suffix(str(path))
    data = DATA_FILE_SUFFIXES.get(suffix)
    return [str(path)] + ([str(path)[:len(str(path)) - len(suffix)] + data] if data else [])


def read_files(path: str) -> List[str]:
    """The files that reading the image at `path` reads: `path` and, for a header (.mhd, .nhdr,
    or an .mha that names another file), the one data file it names (none when the data is in the
    header, or in a list of files)."""
    path = str(path)
    suffix = _suffix(path)
    if suffix not in (".mhd", ".mha", ".nhdr"):
        return [path]
    try:
        head = _head(path)
    except OSError:
        return [path]
    if suffix == ".nhdr":
        named = next((value.strip() for name, separator, value in
                      (line.partition(":") for line in head.decode("latin-1").splitlines())
                      if separator and name.strip().lower() in ("data file", "datafile") and value.strip()), None)
    else:
        named = _metaimage_fields(head)[0].get("ElementDataFile")
    data_path = _named_data_file(path, named)
    return [path] + ([data_path] if data_path else [])


def _metaimage_reason(path: str) -> str:
    """Why MetaImage could not read `path`: ITK blames errno, which says "No such file" even
    for a truncated file."""
    if path.lower().endswith(".mhd"):
        try:
            data_path = _named_data_file(path, _metaimage_fields(_head(path))[0].get("ElementDataFile"))
        except OSError:
            data_path = None
        if data_path is not None and not os.path.isfile(data_path):
            return f"cannot read {path}: its data file {data_path} does not exist"
    return f"{path} is truncated or corrupt (MetaImage could not read all its data)"


def read_labelmap(path: str) -> Tuple[np.ndarray, Geometry]:
    """Read a 3-D labelmap; returns an integer array indexed (i, j, k) and its geometry."""
    import SimpleITK as sitk

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    try:
        _check_complete(path)
        with open(path, "rb"):  # ITK would blame a missing file for a permission problem
            pass
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        suffix = _suffix(path)
        # ITK knows only lower-case suffixes: name the reader of an upper-case one (O.NII.GZ, O.MHA)
        reader = IMAGE_IO.get(suffix, "") if suffix in LABELMAP_SUFFIXES and not path.endswith(suffix) else ""
        image = sitk.ReadImage(str(path), imageIO=reader)
    except RuntimeError as error:
        if "MetaImageIO" in str(error) and _suffix(path) in (".mha", ".mhd"):
            raise InputError(_metaimage_reason(path)) from None
        reason = error_reason(error) if str(error).strip() else "unknown format"
        raise InputError(f"cannot read {path} as an image ({reason})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a labelmap has one (export a single-layer labelmap)")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension != 3:
        raise InputError(f"{path} is a {dimension}-D image; a 3-D labelmap is needed")
    if min(image.GetSize()) < 2:
        raise InputError(f"{path} has size {image.GetSize()}: a 3-D labelmap needs at least 2 voxels "
                         "along every axis")
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise InputError(f"{path} holds non-integer values; a labelmap holds integer labels")
    geometry = Geometry.create(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    if geometry.problem():
        raise InputError(f"{path}: {geometry.problem()}")
    labels = np.ascontiguousarray(array.transpose(2, 1, 0))
    if not np.issubdtype(labels.dtype, np.integer):  # whole numbers of any size keep their value
        labels = labels.astype(np.int64)
    return labels, geometry


def labelmap_image(labels: np.ndarray, geometry: Geometry):
    """A SimpleITK image of an (i, j, k) array on `geometry`."""
    import SimpleITK as sitk

    if tuple(labels.shape) != geometry.size:
        raise ValueError(f"array shape {labels.shape} does not match grid size {geometry.size}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def check_writable(path: str, kind: str, suffixes: Tuple[str, ...]) -> None:
    """Fail early, before any work, when an output cannot be written."""
    if _suffix(path) not in suffixes:
        raise InputError(f"{kind} {path}: unsupported file type; use one of {', '.join(suffixes)}")
    if os.path.isdir(path):
        raise InputError(f"{kind} {path}: a folder of that name is there; name a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{kind} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{kind} {path}: folder {folder} is not writable")
    try:
        longest = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such limit here (Windows) or not known
        longest = None
    names = [os.path.basename(f) for f in written_files(path)]  # a header's data file too
    if longest and max(len(os.fsencode(name)) for name in names) > longest:
        raise InputError(f"{kind} {path}: the file name is longer than this file system allows ({longest} bytes)")


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path with `path`'s name, in a hidden folder beside it; on success move
    what was written there into place (a header and its data file, for .mhd and .nhdr, the data
    first), on failure remove it all."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    temporary_folder = tempfile.mkdtemp(prefix=".partial-", dir=folder)
    temporary = os.path.join(temporary_folder, name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        written = sorted(os.listdir(temporary_folder), key=lambda f: f == name)  # `name` last
        for entry in written:
            # mkdtemp makes the folder private; outputs get the mode a plain open() would give
            os.chmod(os.path.join(temporary_folder, entry), 0o666 & ~umask)
            os.replace(os.path.join(temporary_folder, entry), os.path.join(folder, entry))
    finally:
        shutil.rmtree(temporary_folder, ignore_errors=True)


def check_storable(path: str, geometry: Geometry) -> None:
    """Raise InputError when the file type of `path` cannot hold `geometry` exactly: NIfTI keeps
    only perpendicular axes (ITK would turn a sheared grid into another one)."""
    if _suffix(str(path)) in (".nii", ".nii.gz") and not geometry.is_rotation:
        raise InputError(f"output {path}: the grid's axes are sheared (direction "
                         f"{np.round(geometry.direction_matrix, 4).tolist()}), which NIfTI cannot store; "
                         "write .nrrd or .mha, which keep them")


def write_labelmap(path: str, labels: np.ndarray, geometry: Geometry, atomic: bool = True) -> None:
    """Write a uint8 labelmap with `geometry` (through a temporary file unless atomic=False).
    Raises InputError when `path` cannot be written (its type, its folder, the file system)."""
    import SimpleITK as sitk

    path = os.fspath(path)
    check_storable(path, geometry)
    if not atomic:
        # ITK picks the format by the suffix as spelt (O.NII.GZ fails, O.MHA becomes O.mhd + O.zraw):
        # write under the lower-case suffix, then give the file the name asked for
        image = labelmap_image(labels.astype(np.uint8, copy=False), geometry)
        suffix = _suffix(path)
        written = path[:len(path) - len(suffix)] + suffix
        sitk.WriteImage(image, written, useCompression=True)
        if written != path:
            os.replace(written, path)
        return
    check_writable(path, "output", LABELMAP_SUFFIXES)
    try:
        with atomic_output(path) as temporary:
            write_labelmap(temporary, labels, geometry, atomic=False)
    except (OSError, RuntimeError) as error:
        raise InputError(f"output {path} could not be written ({error_reason(error)})") from None


def error_reason(error: BaseException) -> str:
    """The reason in an error from reading or writing a file, in one line (ITK's own text has
    several: where it was thrown, then "ITK ERROR: Class(address): reason", sometimes matrices)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line:
            reason = line.split("): ", 1)[-1]
            sentence, refusing, _ = reason.partition(" Refusing")
            return sentence if refusing and sentence else reason
    return lines[-1] if lines else type(error).__name__
