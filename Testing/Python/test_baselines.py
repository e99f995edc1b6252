"""The classic baselines (Fill between slices, signed-distance interpolation) on shapes with
known answers."""

import numpy as np
import pytest
from MetaShapeReconLib.baselines import fill_between_slices, interpolated_signed_distance, signed_distance_interpolation
from MetaShapeReconLib.errors import InputError
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.pipeline import dice
from shapes import ellipsoid, interpolated_field, sparse_planes


def _has_contour_interpolator() -> bool:
    try:
        import slicer
        import vtk  # noqa: F401
        return hasattr(slicer, "vtkITKMorphologicalContourInterpolator")
    except ImportError:
        return False


needs_slicer_core = pytest.mark.skipif(not _has_contour_interpolator(),
                                       reason="slicer-core (vtkITKMorphologicalContourInterpolator) not installed")
BOTH = [pytest.param(fill_between_slices, marks=needs_slicer_core, id="fill_between_slices"),
        pytest.param(signed_distance_interpolation, id="signed_distance_interpolation")]

GRID = Geometry.create((64, 64, 64), (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def sphere():
    return ellipsoid(GRID, (31.5, 31.5, 31.5), (20.0, 20.0, 20.0))


def _drawn(mask, planes):
    sparse = np.zeros(mask.shape, np.uint8)
    for axis, indices in planes.items():
        index = [slice(None)] * 3
        index[axis] = indices
        sparse[tuple(index)] = mask[tuple(index)]
    return sparse


@pytest.mark.parametrize("method", BOTH)
def test_sphere_from_every_fourth_plane(method, sphere):
    planes = {0: np.arange(2, 64, 4)}
    output = method(sparse_planes(sphere, 0, 4, 2), planes, GRID)
    assert output.dtype == np.uint8 and output.shape == sphere.shape
    assert set(np.unique(output)) <= {0, 1}
    assert dice(output, sphere) >= 0.95


@pytest.mark.parametrize("method", BOTH)
def test_keeps_the_observed_planes(method, sphere):
    planes = {0: np.arange(2, 64, 4)}
    sparse = sparse_planes(sphere, 0, 4, 2)
    sparse[30, 20:40, 20:40] = 0  # a hole the user drew on an observed plane stays a hole
    output = method(sparse, planes, GRID)
    assert np.array_equal(output[planes[0]], (sparse[planes[0]] != 0).astype(np.uint8))
    assert not output[:2].any() and not output[63:].any()  # beyond the outer planes: nothing drawn


@pytest.mark.parametrize("method", BOTH)
def test_two_orientations(method, sphere):
    planes = {0: np.arange(3, 64, 8), 2: np.arange(3, 64, 8)}
    output = method(_drawn(sphere, planes), planes, GRID)
    assert dice(output, sphere) >= 0.9
    for axis, indices in planes.items():
        assert np.array_equal(np.take(output, indices, axis=axis), np.take(sphere, indices, axis=axis))


def test_signed_distance_interpolates_a_cone_linearly():
    """Discs of radius 8 mm and 20 mm on planes 24 mm apart: shape-based interpolation gives
    the radius linearly in between (the zero level moves with the mean of the distances)."""
    grid = Geometry.create((64, 64, 40), (1.0, 1.0, 1.0))
    i, j = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    radius = np.hypot(i, j)
    sparse = np.zeros(grid.size, np.uint8)
    sparse[:, :, 8] = radius <= 8
    sparse[:, :, 32] = radius <= 20
    output = signed_distance_interpolation(sparse, {2: [8, 32]}, grid)
    for k in (14, 20, 26):
        expected = 8 + (20 - 8) * (k - 8) / 24.0
        area = output[:, :, k].sum()
        assert abs(np.sqrt(area / np.pi) - expected) < 1.0, (k, np.sqrt(area / np.pi), expected)


def test_signed_distance_uses_millimetres():
    """Thick slices: the distances are in mm, so the interpolated shape follows the ellipsoid."""
    grid = Geometry.create((64, 64, 40), (1.0, 1.0, 2.5))
    truth = ellipsoid(grid, (32, 30, 50), (20, 15, 30))
    planes = {2: np.arange(1, 40, 4)}
    output = signed_distance_interpolation(sparse_planes(truth, 2, 4, 1), planes, grid)
    assert dice(output, truth) >= 0.95


def test_signed_distance_single_planes_add_nothing(sphere):
    """Three orthogonal planes: no orientation has two planes to interpolate between."""
    planes = {0: [31], 1: [31], 2: [31]}
    sparse = _drawn(sphere, planes)
    output = signed_distance_interpolation(sparse, planes, GRID)
    assert np.array_equal(output, sparse)


def test_cubic_curve_follows_a_sphere_closer_than_the_linear_one(sphere):
    """Between planes 8 mm apart a sphere's cross-sections change along a curve: the monotone
    cubic through all planes is closer to the truth than straight lines between two."""
    planes = {2: np.arange(3, 64, 8)}
    sparse = _drawn(sphere, planes)
    scores = {curve: dice(np.nan_to_num(interpolated_field(sparse, planes, GRID, curve), nan=1.0) < 0, sphere)
              for curve in ("linear", "cubic")}
    assert scores["cubic"] > scores["linear"] + 0.005, scores
    assert scores["cubic"] > 0.96, scores


def test_cubic_curve_is_the_line_between_two_planes_and_never_overshoots():
    """With two planes the cubic has nothing to bend by: it is the straight line. With more, its
    value between two planes stays between theirs (monotone), on uneven gaps too."""
    grid = Geometry.create((64, 64, 40), (1.0, 1.0, 1.0))
    i, j = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    cone = np.zeros(grid.size, np.uint8)
    cone[:, :, 8] = np.hypot(i, j) <= 8
    cone[:, :, 32] = np.hypot(i, j) <= 20
    two = {2: [8, 32]}
    np.testing.assert_allclose(interpolated_field(cone, two, grid, "cubic"), interpolated_field(cone, two, grid, "linear"),
                               atol=1e-4, equal_nan=True)

    planes = {2: np.array([2, 9, 17, 24, 31, 38])}
    rng = np.random.default_rng(3)
    blobs = np.zeros(grid.size, np.uint8)
    for centre, radius in zip(rng.uniform(10, 30, (6, 3)), rng.uniform(4, 9, 6)):
        blobs |= ellipsoid(grid, tuple(centre), (radius, radius * 0.7, radius * 1.3))
    sparse = _drawn(blobs, planes)
    cubic = interpolated_field(sparse, planes, grid, "cubic")
    ends = interpolated_field(sparse, planes, grid, "linear")  # equals the planes' own values on the planes
    for a, b in zip(planes[2][:-1], planes[2][1:]):
        low = np.minimum(ends[:, :, a], ends[:, :, b])[:, :, None]
        high = np.maximum(ends[:, :, a], ends[:, :, b])[:, :, None]
        between = cubic[:, :, a:b + 1]
        defined = np.isfinite(between)
        assert defined.any()
        assert (between[defined] >= np.broadcast_to(low, between.shape)[defined] - 1e-4).all()
        assert (between[defined] <= np.broadcast_to(high, between.shape)[defined] + 1e-4).all()
    with pytest.raises(InputError, match="curve 'spline' is not one of linear, cubic"):
        interpolated_signed_distance(sparse, planes, grid, curve="spline")


@needs_slicer_core
def test_fill_between_slices_matches_slicer_call(sphere):
    """The same as the filter called directly the way Slicer's effect calls it (all defaults)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    sparse = sparse_planes(sphere, 1, 6, 1).astype(np.uint8)
    image = vtk.vtkImageData()
    image.SetDimensions(*sparse.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(sparse.transpose(2, 1, 0).ravel(), deep=True))
    interpolator = slicer.vtkITKMorphologicalContourInterpolator()
    interpolator.SetInputData(image)
    interpolator.Update()
    direct = numpy_support.vtk_to_numpy(interpolator.GetOutput().GetPointData().GetScalars())
    direct = direct.reshape(sparse.shape[::-1]).transpose(2, 1, 0)
    output = fill_between_slices(sparse, {1: np.arange(1, 64, 6)}, GRID)
    assert np.array_equal(output, (direct != 0).astype(np.uint8))


@pytest.mark.parametrize("method", BOTH)
def test_impossible_inputs(method, sphere):
    sparse = sparse_planes(sphere, 0, 4, 2)
    with pytest.raises(InputError, match="no observed plane"):
        method(sparse, {}, GRID)
    with pytest.raises(InputError, match="outside the image"):
        method(sparse, {0: [2, 64]}, GRID)
    with pytest.raises(InputError, match="axis"):
        method(sparse, {3: [2]}, GRID)
    with pytest.raises(InputError, match="no foreground"):
        method(sparse, {0: [0, 1]}, GRID)
    with pytest.raises(InputError, match="3-D"):
        method(sparse[0], {0: [2]}, GRID)
    with pytest.raises(InputError, match="geometry"):
        method(sparse[:32], {0: [2]}, GRID)
