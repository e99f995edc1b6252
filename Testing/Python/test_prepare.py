"""`training prepare` on each dataset layout, built here as small label files with known shapes."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from training.config import load_config
from training.data import load_shapes
from training.prepare import prepare


def ellipsoids(size_kji, spacing, centres_mm, radii_mm, labels):
    """A label image (LPS, identity direction, spacing (x, y, z) mm) holding one ellipsoid per label."""
    k, j, i = np.meshgrid(*[np.arange(n) * s for n, s in zip(size_kji, spacing[::-1])], indexing="ij")
    array = np.zeros(size_kji, np.uint8)
    for (cx, cy, cz), (rx, ry, rz), label in zip(centres_mm, radii_mm, labels):
        array[((i - cx) / rx) ** 2 + ((j - cy) / ry) ** 2 + ((k - cz) / rz) ** 2 <= 1] = label
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def run_prepare(tmp_path, layout, root, *overrides):
    config = load_config(None, [f"data.layout={layout}", f"data.root={root}", f"data.cache={tmp_path / 'cache'}",
                                "frame.extent_mm=48", "data.margin_mm=4", 'data.split={"test": 0.34, "val": 0.0, "folds": 0}',
                                *overrides])
    summary = prepare(config, workers=1)
    split = json.loads(open(summary["split_file"]).read())
    shapes = load_shapes(str(tmp_path / "cache"))
    return summary, split, {s.name: s for s in shapes}


def sphere_ml(radius_mm):
    return 4 / 3 * math.pi * radius_mm ** 3 / 1000


def test_msd_layout_thick_slices_come_out_smooth_and_of_the_right_volume(tmp_path):
    root = tmp_path / "Task02_Heart"
    (root / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "Heart", "labels": {"0": "background", "1": "left atrium"}}))
    for n in range(3):  # 3 mm slices: resampled through signed distances, not as staircases
        sitk.WriteImage(ellipsoids((20, 50, 50), (0.8, 0.8, 3.0), [(20, 20, 30)], [(12, 12, 12)], [1]),
                        str(root / "labelsTr" / f"la_{n:03d}.nii.gz"))
    (root / "labelsTr" / "._la_000.nii.gz").write_bytes(b"macOS resource fork, not a label file")
    summary, split, shapes = run_prepare(tmp_path, "msd", root)
    assert summary["cases"] == 3 and sorted(shapes) == ["la_000_c1", "la_001_c1", "la_002_c1"]
    assert sorted(split["train"] + split["val"] + split["test"]) == ["la_000", "la_001", "la_002"]
    assert len(split["test"]) == 1
    mask = shapes["la_000_c1"].mask
    assert mask.shape == (56, 56, 56)  # frame 48 mm + 2 margins of 4 mm at 1 mm
    assert mask.sum() / 1000 == pytest.approx(sphere_ml(12), rel=0.05)
    # smooth: each 1 mm cross-section's area follows the sphere's (a staircase of 3 mm steps is
    # twice as far off), and no structure is shaved: boundary voxels stay inside
    geometry = shapes["la_000_c1"].geometry
    z = geometry.index_to_physical(np.stack([np.zeros(56), np.zeros(56), np.arange(56)], axis=1))[:, 2]
    sphere_areas = math.pi * np.clip(12 ** 2 - (z - 30) ** 2, 0, None)
    assert np.abs(mask.sum(axis=(0, 1)) - sphere_areas).mean() < 0.025 * sphere_areas.max()


def test_kits19_layout_keeps_left_and_right_kidney_as_two_shapes(tmp_path):
    root = tmp_path / "kits19"
    (root / "case_00000").mkdir(parents=True)
    (root / "case_00001").mkdir(parents=True)
    for case in ("case_00000", "case_00001"):  # kidney (1) with a tumour (2) on the right, a kidney on the left
        image = ellipsoids((40, 40, 90), (0.9, 0.9, 0.9), [(20, 20, 20), (30, 20, 20), (70, 20, 20)],
                           [(10, 8, 12), (5, 5, 5), (9, 8, 11)], [1, 2, 1])
        sitk.WriteImage(image, str(root / case / "segmentation.nii.gz"))
    summary, split, shapes = run_prepare(tmp_path, "kits19", root, "data.labels=[1, 2]", "data.components=2")
    assert sorted(shapes) == ["case_00000_c1", "case_00000_c2", "case_00001_c1", "case_00001_c2"]
    sizes = {name: shape.mask.sum() / 1000 for name, shape in shapes.items()}
    right = 4 / 3 * math.pi * 10 * 8 * 12 / 1000  # tumour (inside the kidney's box) merged into it
    assert sizes["case_00000_c1"] >= right * 0.95  # the larger structure is c1
    assert sizes["case_00000_c2"] == pytest.approx(4 / 3 * math.pi * 9 * 8 * 11 / 1000, rel=0.08)


def test_verse_layout_gives_one_shape_per_vertebra_listed_in_the_centroids(tmp_path):
    folder = tmp_path / "verse" / "sub-001"
    folder.mkdir(parents=True)
    image = ellipsoids((80, 40, 40), (0.9, 0.9, 0.9), [(20, 20, 15), (20, 20, 40), (20, 20, 60)],
                       [(10, 10, 6), (10, 10, 7), (10, 10, 6)], [20, 21, 22])
    sitk.WriteImage(image, str(folder / "sub-001_seg-vert_msk.nii.gz"))
    (folder / "sub-001_seg-subreg_ctd.json").write_text(json.dumps(
        [{"direction": ["P", "I", "R"]}, {"label": 20, "X": 20, "Y": 20, "Z": 15}, {"label": 21, "X": 20, "Y": 20, "Z": 40}]))
    _, _, shapes = run_prepare(tmp_path, "verse", tmp_path / "verse")
    assert sorted(shapes) == ["sub-001_v20", "sub-001_v21"]  # label 22 has no centroid: not a listed vertebra
    assert shapes["sub-001_v21"].mask.sum() / 1000 == pytest.approx(4 / 3 * math.pi * 10 * 10 * 7 / 1000, rel=0.08)


def test_folder_layout_reads_every_label_format_and_ignores_other_files(tmp_path):
    root = tmp_path / "labels"
    root.mkdir()
    for name in ("a.nrrd", "b.mha", "c.nii.gz"):
        sitk.WriteImage(ellipsoids((30, 30, 30), (0.9, 0.9, 0.9), [(15, 15, 15)], [(8, 8, 8)], [3]), str(root / name))
    (root / "notes.txt").write_text("not a label file")
    summary, split, shapes = run_prepare(tmp_path, "folder", root)
    assert sorted(shapes) == ["a_c1", "b_c1", "c_c1"]
    for shape in shapes.values():
        assert shape.mask.sum() / 1000 == pytest.approx(sphere_ml(8), rel=0.08)


def test_synthetic_layout_reports_its_shapes(tmp_path):
    config = load_config(None, ["data.layout=synthetic", f"data.cache={tmp_path / 'cache'}", "data.synthetic.count=4",
                                "frame.extent_mm=32", "data.margin_mm=4", 'data.split={"test": 0.25, "val": 0.0, "folds": 0}'])
    summary = prepare(config, workers=1)
    assert summary["cases"] == 4 and summary["shapes"] == 4


def test_a_wrong_data_root_says_so(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        run_prepare(tmp_path, "msd", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not an MSD task folder"):
        run_prepare(tmp_path, "msd", tmp_path / "empty")


def three_labels(root):
    root.mkdir()
    for name in ("a", "b", "c"):
        sitk.WriteImage(ellipsoids((30, 30, 30), (0.9, 0.9, 0.9), [(15, 15, 15)], [(8, 8, 8)], [1]),
                        str(root / f"{name}.nii.gz"))


def test_a_cache_made_with_other_crop_settings_is_prepared_again(tmp_path, capsys):
    root = tmp_path / "my labels[1]"  # a folder name, not a glob pattern
    three_labels(root)
    _, _, shapes = run_prepare(tmp_path, "folder", root)
    assert shapes["a_c1"].mask.shape == (56, 56, 56)  # 48 + 2 x 4 mm
    assert "other settings" not in capsys.readouterr().err
    _, _, shapes = run_prepare(tmp_path, "folder", root, "data.margin_mm=8")
    assert "the cache" in capsys.readouterr().err
    assert shapes["a_c1"].mask.shape == (64, 64, 64)
    index = json.loads((tmp_path / "cache" / "shapes.json").read_text())
    assert index["margin_mm"] == 8 and index["components"] == 1 and index["labels"] is None
    del index["components"]  # as an earlier version wrote it
    (tmp_path / "cache" / "shapes.json").write_text(json.dumps(index))
    run_prepare(tmp_path, "folder", root, "data.margin_mm=8")
    assert "by an earlier version, which did not record components" in capsys.readouterr().err
    run_prepare(tmp_path, "folder", root, "data.margin_mm=8")
    assert "preparing every case again" not in capsys.readouterr().err


def test_a_file_that_is_no_3d_labelmap_stops_prepare_in_one_line_keeping_what_was_done(tmp_path):
    root = tmp_path / "labels"
    three_labels(root)
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkUInt8), str(root / "d.nii.gz"))  # 2-D
    with pytest.raises(SystemExit, match=r"d\.nii\.gz: cannot prepare it \(a 2-D image .*3 case\(s\) done are kept"):
        run_prepare(tmp_path, "folder", root)
    index = json.loads((tmp_path / "cache" / "shapes.json").read_text())
    assert index["cases"] == ["a", "b", "c"]
    (root / "d.nii.gz").write_text("not an image")
    with pytest.raises(SystemExit, match=r"d\.nii\.gz: cannot prepare it") as caught:
        run_prepare(tmp_path, "folder", root)
    assert "\n" not in str(caught.value)


def test_a_damaged_split_file_is_named_in_one_line(tmp_path):
    root = tmp_path / "labels"
    three_labels(root)
    split = tmp_path / "split.json"
    for content, phrase in (('{"train": ["a"], "te', "is damaged"), ('{"train": ["a"], "test": ["b"]}', "has no list of val")):
        split.write_text(content)
        with pytest.raises(SystemExit, match=f"split file .*split.json {phrase}"):
            run_prepare(tmp_path, "folder", root, f"data.split_file={split}")


@pytest.mark.parametrize("override,phrase", [
    ("data.split.test=1.5", "expected fractions"),
    ("frame.extent_mm=-8", "expected a size in mm > 0"),
    ("data.margin_mm=-100", "a margin >= 0"),
    ('tasks.planes=[{"weight": 1, "kind": "paralel"}]', "kind 'paralel'"),
    ('tasks.planes=[{"weight": 1, "kind": "parallel", "axes": ["sideways"], "steps": [8]}]', "axes"),
    ("tasks.planes=foo", "expected a list of plane configurations"),
    ("data.labels=kidney", "expected a list of non-zero label values"),
])
def test_values_no_run_could_use_are_refused_when_the_config_loads(override, phrase):
    with pytest.raises(SystemExit, match=phrase):
        load_config(None, [override])
