"""Reading and writing labelmaps with SimpleITK, keeping their geometry.

Writes go to a temporary folder next to the destination and are renamed into place, so a
failure never leaves a half-written output behind.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry

LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in sorted(LABELMAP_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return os.path.splitext(name)[1]


def read_labelmap(path: str) -> Tuple[np.ndarray, Geometry]:
    """Read a 3-D labelmap; returns an integer array indexed (i, j, k) and its geometry."""
    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown format"
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
    labels = np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.int32, copy=False)
    geometry = Geometry.create(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
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
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{kind} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{kind} {path}: folder {folder} is not writable")


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


def write_labelmap(path: str, labels: np.ndarray, geometry: Geometry, atomic: bool = True) -> None:
    """Write a uint8 labelmap with `geometry` (through a temporary file unless atomic=False)."""
    import SimpleITK as sitk

    image = labelmap_image(labels.astype(np.uint8, copy=False), geometry)
    if not atomic:
        sitk.WriteImage(image, path, useCompression=True)
        return
    with atomic_output(path) as temporary:
        sitk.WriteImage(image, temporary, useCompression=True)
