"""Grids in physical space and labelmap files: geometry survives reading and writing."""

import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from fitted import OBLIQUE_DIRECTION, oblique_geometry
from MetaShapeReconLib.errors import InputError
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.labelmap_io import (
    atomic_output,
    check_writable,
    labelmap_image,
    read_files,
    read_labelmap,
    write_labelmap,
    written_files,
)

SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"]


def assert_same_geometry(a: Geometry, b: Geometry, tol=1e-5):
    assert a.size == b.size
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


def test_index_to_physical_matches_simpleitk():
    geometry = oblique_geometry()
    image = sitk.Image(list(geometry.size), sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-1, 25, size=(20, 3))
    ours = geometry.index_to_physical(ijk)
    theirs = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in ijk])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(geometry.physical_to_index(ours), ijk, atol=1e-9)


def test_resampled_is_finer_over_the_same_extent():
    geometry = oblique_geometry((26, 26, 20), (1.5, 1.8, 2.4))
    fine = geometry.resampled(0.6)
    assert fine.size == (65, 78, 80)
    assert fine.spacing == (0.6, 0.6, 0.6)
    np.testing.assert_allclose(fine.direction, geometry.direction)
    # the outer voxel edges stay where they were
    for grid in (geometry, fine):
        low = grid.index_to_physical([-0.5, -0.5, -0.5])
        high = grid.index_to_physical(np.asarray(grid.size) - 0.5)
        np.testing.assert_allclose(low, geometry.index_to_physical([-0.5, -0.5, -0.5]), atol=1e-9)
        np.testing.assert_allclose(high, geometry.index_to_physical(np.asarray(geometry.size) - 0.5), atol=1e-9)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_labelmap_round_trip_keeps_values_and_oblique_geometry(tmp_path, suffix):
    geometry = oblique_geometry((7, 6, 5), (0.7, 1.1, 3.0))
    labels = np.arange(7 * 6 * 5).reshape(7, 6, 5) % 4
    path = str(tmp_path / ("case" + suffix))
    write_labelmap(path, labels, geometry)
    read, read_geometry = read_labelmap(path)
    assert read.shape == (7, 6, 5)
    np.testing.assert_array_equal(read, labels)
    assert_same_geometry(read_geometry, geometry)
    # and the array is indexed (i, j, k) like ITK: voxel (6, 0, 0) is at the index SimpleITK says
    image = sitk.ReadImage(path)
    assert image.GetPixel(6, 0, 0) == labels[6, 0, 0] and image.GetPixel(1, 5, 4) == labels[1, 5, 4]
    assert image.GetPixelID() == sitk.sitkUInt8
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".partial-")]


def test_read_accepts_integer_types_and_whole_floats(tmp_path):
    for pixel in (np.int16, np.uint16, np.int32, np.float32):
        array = np.zeros((4, 4, 4), pixel)
        array[1, 2, 3] = 300 if pixel != np.float32 else 2.0
        image = sitk.GetImageFromArray(array)
        path = str(tmp_path / f"l-{np.dtype(pixel).name}.nrrd")
        sitk.WriteImage(image, path)
        labels, _ = read_labelmap(path)
        assert labels[3, 2, 1] == array[1, 2, 3] and labels.sum() == array.sum()


def test_labels_beyond_32_bits_keep_their_value(tmp_path):
    for pixel, value in ((np.uint32, 4_000_000_000), (np.int64, 2 ** 32), (np.float64, 2.0 ** 32)):
        array = np.zeros((4, 4, 4), pixel)
        array[1, 2, 3] = value
        path = tmp_path / f"big-{np.dtype(pixel).name}.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
        labels, _ = read_labelmap(path)  # a path object, as write_labelmap takes
        assert labels[3, 2, 1] == value and np.count_nonzero(labels) == 1


def test_writing_names_the_users_path_when_it_cannot_be_done(tmp_path):
    labels, geometry = np.ones((4, 4, 4), np.uint8), Geometry.create((4, 4, 4), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="unsupported file type"):
        write_labelmap(str(tmp_path / "slice.png"), labels, geometry)
    with pytest.raises(InputError, match=r"nowhere/o\.nii\.gz: folder .* does not exist"):
        write_labelmap(tmp_path / "nowhere" / "o.nii.gz", labels, geometry)
    with pytest.raises(InputError, match="longer than this file system allows"):
        write_labelmap(str(tmp_path / ("x" * 300 + ".nii.gz")), labels, geometry)
    assert os.listdir(tmp_path) == []


def test_metaimage_voxels_as_text_or_in_a_file_of_their_own_are_read(tmp_path):
    labels = np.zeros((4, 4, 4), np.int32)
    labels[1:3, 1:3, 1:3] = 7
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = {}\nDimSize = 4 4 4\nElementSpacing = 1 1 1\n"
              "ElementType = MET_INT\nElementDataFile = {}\n")
    text = tmp_path / "text.mha"
    text.write_text(header.format("False", "LOCAL") + " ".join(str(v) for v in labels.ravel()) + "\n")
    np.testing.assert_array_equal(read_labelmap(str(text))[0], labels)
    (tmp_path / "voxels.raw").write_bytes(labels.astype("<i4").tobytes())
    outside = tmp_path / "outside.mha"  # an .mha may name a data file too
    outside.write_text(header.format("True", "voxels.raw"))
    np.testing.assert_array_equal(read_labelmap(str(outside))[0], labels)
    assert read_files(str(outside)) == [str(outside), str(tmp_path / "voxels.raw")]


def test_the_files_a_header_and_its_data_file_take(tmp_path):
    geometry = Geometry.create((4, 4, 4), (1.0, 1.0, 1.0))
    for name in ("a.mhd", "b.nhdr", "c.MHD", "d.nii.gz"):
        path = str(tmp_path / name)
        write_labelmap(path, np.ones((4, 4, 4), np.uint8), geometry)
        assert all(os.path.isfile(f) for f in written_files(path))
        assert sorted(read_files(path)) == sorted(written_files(path))
    assert sorted(os.listdir(tmp_path)) == ["a.mhd", "a.zraw", "b.nhdr", "b.raw.gz", "c.MHD", "c.zraw", "d.nii.gz"]


@pytest.mark.parametrize("header,phrase", [
    ("TransformMatrix = 0 0 1 0 1 0 0 0 0", "Bad direction, determinant is 0"),
    ("ElementSpacing = 1e-30 1 1", "finer than 0.0001 mm"),
])
def test_a_header_with_an_unusable_grid_is_refused_in_one_line(tmp_path, header, phrase):
    path = tmp_path / "case.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.uint8)), str(path))
    data = path.read_bytes()
    key = header.split(" = ")[0].encode()
    start = data.index(key)
    end = data.index(b"\n", start)
    path.write_bytes(data[:start] + header.encode() + data[end:])
    with pytest.raises(InputError, match=phrase) as caught:
        read_labelmap(str(path))
    assert "\n" not in str(caught.value)


def test_a_sheared_grid_is_kept_where_the_file_type_can_hold_it_and_refused_elsewhere(tmp_path):
    sheared = Geometry.create((4, 5, 6), (1.0, 0.8, 2.0), (3, -2, 7), (1, 0, 0.6, 0, 1, 0, 0, 0, 0.8))
    labels = np.zeros(sheared.size, np.uint8)
    labels[1:3, 2:4, 2:5] = 1
    for name in ("s.nrrd", "s.mha"):
        write_labelmap(str(tmp_path / name), labels, sheared)
        read, geometry = read_labelmap(str(tmp_path / name))
        np.testing.assert_array_equal(read, labels)
        assert_same_geometry(geometry, sheared)
    with pytest.raises(InputError, match="sheared .* which NIfTI cannot store"):
        write_labelmap(str(tmp_path / "s.nii.gz"), labels, sheared)
    assert sorted(os.listdir(tmp_path)) == ["s.mha", "s.nrrd"]


def test_read_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_labelmap(str(tmp_path / "missing.nii.gz"))
    text = tmp_path / "text.nii.gz"
    text.write_text("this is not an image\n")
    with pytest.raises(InputError, match="cannot read"):
        read_labelmap(str(text))
    flat = str(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image(10, 12, sitk.sitkUInt8), flat)
    with pytest.raises(InputError, match="2-D"):
        read_labelmap(flat)
    rgb = str(tmp_path / "rgb.nrrd")
    sitk.WriteImage(sitk.Image([5, 5, 5], sitk.sitkVectorUInt8, 3), rgb)
    with pytest.raises(InputError, match="components"):
        read_labelmap(rgb)
    thin = str(tmp_path / "thin.nrrd")
    sitk.WriteImage(sitk.Image([5, 5, 1], sitk.sitkUInt8), thin)
    with pytest.raises(InputError, match="at least 2 voxels"):
        read_labelmap(thin)
    fractional = str(tmp_path / "probability.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4, 4), 0.5, np.float32)), fractional)
    with pytest.raises(InputError, match="non-integer"):
        read_labelmap(fractional)
    series = str(tmp_path / "series.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkUInt8), series)
    with pytest.raises(InputError, match="4-D"):
        read_labelmap(series)


def test_check_writable(tmp_path):
    check_writable(str(tmp_path / "out.nii.gz"), "output", (".nii.gz",))
    with pytest.raises(InputError, match="unsupported file type"):
        check_writable(str(tmp_path / "out.png"), "output", (".nii.gz", ".nrrd"))
    with pytest.raises(InputError, match="does not exist"):
        check_writable(str(tmp_path / "nowhere" / "out.nii.gz"), "output", (".nii.gz",))


def test_atomic_output_leaves_nothing_on_failure_and_usual_permissions_on_success(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as temporary:
            with open(temporary, "w") as handle:
                handle.write("half")
            raise RuntimeError("failed half way")
    assert os.listdir(tmp_path) == []
    with atomic_output(str(target)) as temporary:
        with open(temporary, "w") as handle:
            handle.write("whole")
    assert os.listdir(tmp_path) == ["out.nii.gz"] and target.read_text() == "whole"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_oblique_direction_is_a_rotation():
    np.testing.assert_allclose(OBLIQUE_DIRECTION @ OBLIQUE_DIRECTION.T, np.eye(3), atol=1e-12)
    assert np.abs(OBLIQUE_DIRECTION).max() < np.cos(np.radians(15))  # nowhere near axis-aligned


def unreadable(path, monkeypatch):
    """Make `path` unreadable: mode 000, and for root (whom modes do not stop) an open() that refuses it."""
    os.chmod(path, 0)
    try:
        open(path, "rb").close()
    except PermissionError:
        return
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(file) == os.path.abspath(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)


def _truncated(tmp_path, suffix):
    geometry = oblique_geometry((20, 18, 16))
    labels = np.zeros(geometry.size, np.uint8)
    labels[5:15, 4:14, 3:13] = 1
    path = str(tmp_path / ("case" + suffix.replace("-raw", "")))
    if suffix in (".nii", ".mha-raw", ".mhd-raw"):  # uncompressed: cut the voxel data
        sitk.WriteImage(labelmap_image(labels, geometry), path)
        if suffix == ".mhd-raw":
            path = str(tmp_path / "case.raw")
    else:
        write_labelmap(path, labels, geometry)
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size * 2 // 3 if suffix != ".nii.gz" else size - 20)
    return str(tmp_path / "case.mhd") if suffix == ".mhd-raw" else path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mha-raw", ".mhd-raw"])
def test_a_truncated_file_is_refused_not_read_as_zeros(tmp_path, suffix, capfd):
    path = _truncated(tmp_path, suffix)
    with pytest.raises(InputError, match="is truncated or corrupt") as error:
        read_labelmap(path)
    assert "\n" not in str(error.value) and "No such file" not in str(error.value)
    assert capfd.readouterr().err == ""  # nor does ITK print its own complaint


def test_a_header_whose_data_file_is_missing_says_so(tmp_path):
    path = str(tmp_path / "case.mhd")
    write_labelmap(path, np.ones((4, 4, 4), np.uint8), Geometry.create((4, 4, 4), (1.0, 1.0, 1.0)))
    os.remove(str(tmp_path / "case.zraw"))
    with pytest.raises(InputError, match=r"data file .*case\.zraw does not exist"):
        read_labelmap(path)


def test_an_unreadable_input_says_it_cannot_be_read(tmp_path, monkeypatch):
    path = str(tmp_path / "case.nii.gz")
    write_labelmap(path, np.ones((4, 4, 4), np.uint8), Geometry.create((4, 4, 4), (1.0, 1.0, 1.0)))
    unreadable(path, monkeypatch)
    with pytest.raises(InputError, match="cannot read .*case.nii.gz: Permission denied"):
        read_labelmap(path)


def test_check_writable_refuses_a_folder_in_the_way(tmp_path):
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(InputError, match="a folder of that name"):
        check_writable(str(tmp_path / "out.nii.gz"), "output", (".nii.gz",))


@pytest.mark.parametrize("name,suffix", [("CASE.NII.GZ", ".nii.gz"), ("Case.MHA", ".mha"), ("CASE.Nrrd", ".nrrd")])
def test_upper_case_suffixes_write_and_read_exactly_the_named_file(tmp_path, name, suffix):
    geometry = oblique_geometry((7, 6, 5), (0.7, 1.1, 3.0))
    labels = (np.arange(7 * 6 * 5).reshape(7, 6, 5) % 2).astype(np.uint8)
    path = str(tmp_path / name)
    check_writable(path, "output", (suffix,))
    write_labelmap(path, labels, geometry)
    assert os.listdir(tmp_path) == [name]
    read, read_geometry = read_labelmap(path)
    np.testing.assert_array_equal(read, labels)
    assert_same_geometry(read_geometry, geometry)


def test_bytes_after_a_whole_gzip_stream_are_ignored_as_itk_does(tmp_path):
    path = str(tmp_path / "case.nii.gz")
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:4, 1:3, 1:3] = 1
    write_labelmap(path, labels, Geometry.create((6, 5, 4), (1.0, 1.0, 1.0)))
    with open(path, "ab") as handle:
        handle.write(b"GARBAGE!")
    np.testing.assert_array_equal(read_labelmap(path)[0], labels)
