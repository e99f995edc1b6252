"""Observed planes: `--slices AXIS:STEP[:OFFSET]` rules, automatic detection, patient-axis names."""

import numpy as np
import pytest
from fitted import OBLIQUE_DIRECTION, grid_centre, rotation
from MetaShapeReconLib.errors import InputError
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.planes import (
    describe_planes,
    detect_planes,
    drop_unsupported_parts,
    keep_drawn_planes,
    observed_mask,
    parse_slices,
    select_planes,
)
from shapes import ellipsoid, sparse_planes


def planes_as_lists(planes):
    return {int(axis): [int(i) for i in indices] for axis, indices in planes.items()}


def drawn_planes(sparse, axis):
    """Indices of the planes along `axis` that hold any drawing."""
    others = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(sparse.any(axis=others))[0]]


def test_parse_slices():
    assert parse_slices("auto") is None
    assert parse_slices(None) is None
    assert parse_slices("sagittal:8:4") == [("sagittal", 8, 4)]
    assert parse_slices("Axial:5") == [("axial", 5, 0)]
    assert parse_slices("i:1, k:16:3") == [("i", 1, 0), ("k", 16, 3)]
    for bad, phrase in [("sagital:8", "AXIS"), ("axial", "AXIS"), ("axial:x", "integers"),
                        ("axial:8:8", "OFFSET < STEP"), ("axial:0", "STEP >= 1"), ("axial:8:-1", "OFFSET")]:
        with pytest.raises(InputError, match=phrase):
            parse_slices(bad)


def test_rule_selects_exactly_index_mod_step_equals_offset():
    geometry = Geometry.create((50, 40, 30), (0.8, 0.8, 2.5))
    mask = ellipsoid(geometry, grid_centre(geometry), (15, 12, 20))
    planes = select_planes("sagittal:8:4", mask, geometry)
    assert planes_as_lists(planes) == {0: [i for i in range(50) if i % 8 == 4]}
    planes = select_planes("k:3", mask, geometry)
    assert planes_as_lists(planes) == {2: list(range(0, 30, 3))}
    planes = select_planes("axial:10:2,sagittal:25", mask, geometry)
    assert planes_as_lists(planes) == {0: [0, 25], 2: [2, 12, 22]}
    with pytest.raises(InputError, match="no observed plane"):
        select_planes("coronal:50:45", mask, geometry)  # only index 45, beyond the 40 planes


def test_patient_axis_names_follow_the_direction():
    # image axes stored as (axial, sagittal, coronal), each tilted by about 20 degrees
    permuted = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], float)  # columns: i -> S-I, j -> L-R, k -> A-P
    direction = rotation(12, -8, 20) @ permuted
    geometry = Geometry.create((30, 40, 50), (2.0, 1.0, 1.2), (10, -20, 30), direction.ravel())
    assert geometry.patient_axis_order() == (1, 2, 0)  # sagittal -> j, coronal -> k, axial -> i
    mask = np.zeros(geometry.size, bool)
    planes = select_planes("sagittal:8:4", mask, geometry)
    assert planes_as_lists(planes) == {1: [i for i in range(40) if i % 8 == 4]}
    planes = select_planes("axial:7", mask, geometry)
    assert planes_as_lists(planes) == {0: [0, 7, 14, 21, 28]}
    described = describe_planes(planes, geometry)
    assert described == [{"axis": "axial", "image_axis": "i", "count": 5, "indices": [0, 7, 14, 21, 28],
                          "pattern": "axial:7:0"}]


def test_a_45_degree_grid_still_gets_three_distinct_axes():
    geometry = Geometry.create((10, 10, 10), (1, 1, 1), direction=rotation(0, 0, 45).ravel())
    order = geometry.patient_axis_order()
    assert sorted(order) == [0, 1, 2]
    assert order[2] == 2  # the axial axis is untouched by a rotation about the S-I axis


@pytest.mark.parametrize("step,offset", [(8, 4), (8, 0), (16, 12), (4, 3), (2, 1)])
def test_auto_finds_exactly_the_drawn_sagittal_planes(step, offset):
    # the half-voxel shift puts thin slivers (a line or a dot) on some end planes: they are drawn too
    geometry = Geometry.create((48, 36, 36), (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry) + 0.6, (20, 12, 10))
    sparse = sparse_planes(mask, 0, step, offset) > 0
    expected = drawn_planes(sparse, 0)
    assert len(expected) >= 2
    assert all(i % step == offset for i in expected)
    assert planes_as_lists(detect_planes(sparse)) == {0: expected}
    assert planes_as_lists(select_planes("auto", sparse, geometry)) == {0: expected}


def test_auto_finds_a_thin_tip_plane():
    """The last drawn plane holds a single line of voxels: still an observed plane."""
    geometry = Geometry.create((48, 36, 36), (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry) + 0.6, (20, 12, 10))
    sparse = sparse_planes(mask, 0, 8, 4) > 0
    tip = sparse[44]
    assert 0 < tip.sum() <= 5, "the test needs a sliver on plane 44"
    assert planes_as_lists(detect_planes(sparse)) == {0: [12, 20, 28, 36, 44]}


@pytest.mark.parametrize("size,radii,shift", [((48, 40, 44), (18, 14, 16), 0.0), ((48, 40, 44), (18, 14, 16), 0.6),
                                              ((40, 40, 40), (5, 12, 10), 0.3)])
def test_auto_detects_mixed_axial_and_sagittal_planes(size, radii, shift):
    geometry = Geometry.create(size, (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry) + shift, radii)
    sparse = (sparse_planes(mask, 0, 8, 4) > 0) | (sparse_planes(mask, 2, 5, 2) > 0)
    expected = {0: [i for i in range(size[0]) if i % 8 == 4 and mask[i].any()],
                2: [k for k in range(size[2]) if k % 5 == 2 and mask[:, :, k].any()]}
    assert planes_as_lists(detect_planes(sparse)) == expected


def test_auto_detects_a_handful_of_irregular_planes_in_two_orientations():
    """Say 5 axial and 3 sagittal planes, at no regular spacing."""
    geometry = Geometry.create((40, 40, 40), (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry), (15, 13, 16))
    sparse = np.zeros_like(mask)
    axial, sagittal = [7, 12, 20, 23, 31], [10, 19, 27]
    sparse[:, :, axial] = mask[:, :, axial]
    sparse[sagittal] = mask[sagittal]
    assert planes_as_lists(detect_planes(sparse)) == {0: sagittal, 2: axial}


def test_auto_finds_nothing_in_a_dense_mask():
    geometry = Geometry.create((30, 30, 30), (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry), (10, 10, 10))
    assert detect_planes(mask) == {}
    with pytest.raises(InputError, match="no observed plane found"):
        select_planes("auto", mask, geometry)
    # a dense mask on named planes is fine
    assert planes_as_lists(select_planes("axial:1", mask, geometry)) == {2: list(range(30))}


def test_auto_on_an_oblique_grid_names_the_closest_patient_axis():
    # image axis k lies closest to L-R: drawn k-planes are sagittal
    direction = OBLIQUE_DIRECTION @ np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    geometry = Geometry.create((36, 30, 48), (1.2, 1.0, 0.9), (5, 5, 5), direction.ravel())
    assert geometry.patient_axis_order()[0] == 2
    mask = ellipsoid(geometry, grid_centre(geometry), (16, 12, 12))
    sparse = sparse_planes(mask, 2, 8, 4) > 0
    planes = select_planes("auto", sparse, geometry)
    assert planes_as_lists(planes) == {2: drawn_planes(sparse, 2)}
    assert planes_as_lists(select_planes("sagittal:8:4", sparse, geometry)) == {2: list(range(4, 48, 8))}
    (entry,) = describe_planes(planes, geometry)
    assert entry["axis"] == "sagittal" and entry["image_axis"] == "k"


def test_observed_mask_marks_whole_planes():
    planes = {0: np.array([1, 5]), 2: np.array([0])}
    observed = observed_mask((8, 4, 3), planes)
    assert observed[1].all() and observed[5].all() and observed[:, :, 0].all()
    assert observed.sum() == 2 * 12 + 8 * 4 - 2 * 4
    region = (slice(4, 8), slice(0, 4), slice(1, 3))
    assert observed_mask((8, 4, 3), planes, region).sum() == 8  # plane 5 only, k = 0 outside


def test_parts_the_drawing_does_not_touch_are_dropped():
    """A result part counts only when it reaches the drawing on an observed plane."""
    drawn = np.zeros((20, 20, 20), np.uint8)
    drawn[5, 4:9, 4:9] = 1  # the structure drawn on sagittal plane 5 (plane 15 is drawn empty)
    planes = {0: np.array([5, 15])}
    output = np.zeros_like(drawn)
    output[3:8, 3:10, 3:10] = 1  # through the drawing: kept
    output[10:13, 15:18, 15:18] = 1  # between the planes, touching nothing drawn: dropped
    output[14:17, 0:3, 0:3] = 1  # across plane 15, where nothing is drawn: split there and dropped
    output[8, 10, 10] = 1  # touches the kept part only at a corner (26-connected): kept
    keep_drawn_planes(output, drawn, planes)
    kept = output.copy()
    kept[10:13, 15:18, 15:18] = 0
    kept[14:17, 0:3, 0:3] = 0
    assert drop_unsupported_parts(output, planes) == (3, 27 + 18)
    np.testing.assert_array_equal(output, kept)
    assert drop_unsupported_parts(output, planes) == (0, 0)  # nothing left to drop
    assert drop_unsupported_parts(np.zeros_like(output), planes) == (0, 0)
