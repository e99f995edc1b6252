"""Surfaces: closed triangle meshes in the labelmap's LPS frame, written and read back with VTK."""

import numpy as np
import pytest
import vtk
from fitted import OBLIQUE_DIRECTION, grid_centre, oblique_geometry
from MetaShapeReconLib.errors import InputError
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.surface import SURFACE_SUFFIXES, boundary_edge_count, surface_from_labelmap, write_surface
from shapes import ellipsoid
from vtk.util import numpy_support

READERS = {".vtk": vtk.vtkPolyDataReader, ".vtp": vtk.vtkXMLPolyDataReader, ".stl": vtk.vtkSTLReader,
           ".ply": vtk.vtkPLYReader, ".obj": vtk.vtkOBJReader}


def points_of(polydata) -> np.ndarray:
    return numpy_support.vtk_to_numpy(polydata.GetPoints().GetData()).astype(np.float64)


def sphere_on_oblique_grid():
    geometry = oblique_geometry((30, 28, 22), (1.2, 1.5, 2.0), origin=(-140.0, 95.0, 310.0))
    centre = grid_centre(geometry) + np.array([2.0, -1.5, 1.0])
    radius = 13.0
    return ellipsoid(geometry, centre, [radius] * 3).astype(np.uint8), geometry, centre, radius


def only_triangles(polydata) -> bool:
    cells = polydata.GetPolys()
    sizes = numpy_support.vtk_to_numpy(cells.GetOffsetsArray())
    return polydata.GetNumberOfCells() == cells.GetNumberOfCells() and bool(np.all(np.diff(sizes) == 3))


@pytest.mark.parametrize("smoothing", [0, 15])
def test_surface_is_closed_and_in_lps_millimetres(smoothing):
    labels, geometry, centre, radius = sphere_on_oblique_grid()
    polydata = surface_from_labelmap(labels, geometry, smoothing)
    assert polydata.GetNumberOfCells() > 500 and only_triangles(polydata)
    assert boundary_edge_count(polydata) == 0
    points = points_of(polydata)
    # every vertex lies on the sphere, give or take a voxel: the mesh is where the labelmap is
    distance = np.linalg.norm(points - centre, axis=1)
    assert np.all(np.abs(distance - radius) < 2.0), (distance.min(), distance.max())
    # its bounds are those of the foreground voxels, up to half a voxel
    foreground = geometry.index_to_physical(np.argwhere(labels))
    half_voxel = 0.5 * np.abs(geometry.direction_matrix * np.asarray(geometry.spacing)).sum(axis=1)
    bounds = np.array(polydata.GetBounds()).reshape(3, 2)
    np.testing.assert_array_less(np.abs(bounds[:, 0] - foreground.min(axis=0)), half_voxel + 0.25)
    np.testing.assert_array_less(np.abs(bounds[:, 1] - foreground.max(axis=0)), half_voxel + 0.25)


def test_surface_without_smoothing_sits_half_a_voxel_outside_the_foreground():
    labels, geometry, _, _ = sphere_on_oblique_grid()
    points = points_of(surface_from_labelmap(labels, geometry, 0))
    ijk = geometry.physical_to_index(points)
    # flying edges at 0.5 puts each vertex halfway along a voxel edge from foreground to background
    offsets = np.abs(ijk - np.round(ijk))
    assert np.allclose(np.sort(offsets, axis=1)[:, :2], 0.0, atol=1e-4)
    assert np.allclose(offsets.max(axis=1), 0.5, atol=1e-4)


def test_normals_point_outward_also_on_a_mirrored_grid():
    direction = OBLIQUE_DIRECTION @ np.diag([-1.0, 1.0, 1.0])  # determinant -1
    geometry = Geometry.create((24, 24, 24), (1.0, 1.0, 1.0), (10, 20, 30), direction.ravel())
    centre = grid_centre(geometry)
    labels = ellipsoid(geometry, centre, (9, 9, 9)).astype(np.uint8)
    polydata = surface_from_labelmap(labels, geometry, 10)
    normals = numpy_support.vtk_to_numpy(polydata.GetPointData().GetNormals())
    outward = np.einsum("ij,ij->i", normals, points_of(polydata) - centre)
    assert np.mean(outward > 0) > 0.99


def test_irregular_shapes_touching_the_border_give_closed_surfaces():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    geometry = Geometry.create((28, 26, 24), (1.0, 1.3, 2.0))
    for _ in range(3):
        labels = (ndimage.gaussian_filter(rng.random(geometry.size), 1.2) > 0.51).astype(np.uint8)
        assert labels[0].any() and labels[-1].any()
        for smoothing in (0, 15):
            polydata = surface_from_labelmap(labels, geometry, smoothing)
            assert polydata.GetNumberOfCells() > 0
            assert boundary_edge_count(polydata) == 0


def test_boundary_edge_count_sees_holes():
    source = vtk.vtkSphereSource()
    source.Update()
    assert boundary_edge_count(source.GetOutput()) == 0
    source.SetEndTheta(300.0)  # a wedge cut out of the sphere
    source.Update()
    assert boundary_edge_count(source.GetOutput()) > 0


def test_empty_labelmap_gives_an_empty_surface():
    polydata = surface_from_labelmap(np.zeros((5, 5, 5), np.uint8), Geometry.create((5, 5, 5), (1, 1, 1)))
    assert polydata.GetNumberOfPoints() == 0


@pytest.mark.parametrize("suffix", SURFACE_SUFFIXES)
def test_each_format_writes_and_reads_back(tmp_path, suffix):
    labels, geometry, _, _ = sphere_on_oblique_grid()
    polydata = surface_from_labelmap(labels, geometry, 15)
    path = str(tmp_path / ("surface" + suffix))
    write_surface(path, polydata)
    assert [p.name for p in tmp_path.iterdir()] == ["surface" + suffix]  # nothing left beside it
    reader = READERS[suffix]()
    reader.SetFileName(path)
    reader.Update()
    back = reader.GetOutput()
    assert back.GetNumberOfPolys() == polydata.GetNumberOfPolys()
    np.testing.assert_allclose(back.GetBounds(), polydata.GetBounds(), atol=1e-3)
    cleaner = vtk.vtkCleanPolyData()  # formats like STL store each triangle's corners apart
    cleaner.SetInputData(back)
    cleaner.Update()
    assert boundary_edge_count(cleaner.GetOutput()) == 0
    if suffix == ".vtk":
        with open(path, "rb") as handle:
            assert b"SPACE=LPS" in handle.read(200)


def test_unsupported_surface_type(tmp_path):
    with pytest.raises(InputError, match="unsupported"):
        write_surface(str(tmp_path / "surface.gltf"), vtk.vtkPolyData())
    assert list(tmp_path.iterdir()) == []
