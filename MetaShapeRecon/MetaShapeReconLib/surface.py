"""Closed triangle surfaces of labelmaps, in the labelmap's physical frame (LPS, as Slicer
expects in model files)."""

import os

import numpy as np

from .errors import InputError
from .geometry import Geometry
from .labelmap_io import atomic_output, check_writable, error_reason

SURFACE_SUFFIXES = (".vtk", ".vtp", ".stl", ".ply", ".obj")


def surface_from_labelmap(labels: np.ndarray, geometry: Geometry, smoothing_iterations: int = 15):
    """vtkPolyData of the 0.5 iso-surface of a binary labelmap, LPS millimetres.

    The labelmap is padded with background, so the surface is closed. Windowed-sinc smoothing
    (0 iterations: none) removes voxel steps without shrinking the shape."""
    import vtk
    from vtk.util import numpy_support

    found = np.nonzero(labels)
    polydata = vtk.vtkPolyData()
    if len(found[0]) == 0:
        return polydata
    low = np.array([f.min() for f in found])
    high = np.array([f.max() for f in found]) + 1
    crop = np.pad((labels[tuple(slice(a, b) for a, b in zip(low, high))] > 0).astype(np.uint8), 1)
    image = vtk.vtkImageData()
    image.SetDimensions(*crop.shape)
    scalars = numpy_support.numpy_to_vtk(crop.ravel(order="F"), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)

    contour = vtk.vtkFlyingEdges3D()
    contour.SetInputData(image)
    contour.SetValue(0, 0.5)
    contour.ComputeNormalsOff()
    contour.ComputeGradientsOff()
    algorithm = contour
    if smoothing_iterations > 0:
        smoother = vtk.vtkWindowedSincPolyDataFilter()
        smoother.SetInputConnection(algorithm.GetOutputPort())
        smoother.SetNumberOfIterations(int(smoothing_iterations))
        smoother.SetPassBand(0.1)
        smoother.BoundarySmoothingOff()
        smoother.FeatureEdgeSmoothingOff()
        smoother.NonManifoldSmoothingOn()
        smoother.NormalizeCoordinatesOn()
        algorithm = smoother

    # crop index (with the one-voxel pad) -> image index -> LPS
    to_index = np.eye(4)
    to_index[:3, 3] = low - 1
    matrix = geometry.index_to_physical_matrix @ to_index
    transform = vtk.vtkTransform()
    transform.SetMatrix(matrix.ravel().tolist())
    transformer = vtk.vtkTransformPolyDataFilter()
    transformer.SetInputConnection(algorithm.GetOutputPort())
    transformer.SetTransform(transform)

    normals = vtk.vtkPolyDataNormals()  # outward normals, also when the grid is mirrored
    normals.SetInputConnection(transformer.GetOutputPort())
    normals.SplittingOff()
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.Update()
    polydata.DeepCopy(normals.GetOutput())
    return polydata


def boundary_edge_count(polydata) -> int:
    """Edges used by one triangle only: 0 for a closed surface."""
    import vtk

    edges = vtk.vtkFeatureEdges()
    edges.SetInputData(polydata)
    edges.BoundaryEdgesOn()
    edges.FeatureEdgesOff()
    edges.ManifoldEdgesOff()
    edges.NonManifoldEdgesOn()
    edges.Update()
    return edges.GetOutput().GetNumberOfCells()


def write_surface(path: str, polydata, atomic: bool = True) -> None:
    """Write a surface by file type (through a temporary file unless atomic=False)."""
    import vtk

    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SURFACE_SUFFIXES:
        raise InputError(f"surface {path}: unsupported type; use one of {', '.join(SURFACE_SUFFIXES)}")
    writers = {".vtk": vtk.vtkPolyDataWriter, ".vtp": vtk.vtkXMLPolyDataWriter, ".stl": vtk.vtkSTLWriter,
               ".ply": vtk.vtkPLYWriter, ".obj": vtk.vtkOBJWriter}
    writer = writers[suffix]()
    if suffix == ".vtk":
        writer.SetHeader("3D Slicer output. SPACE=LPS")  # how Slicer marks LPS model files
    if suffix in (".stl", ".ply"):
        writer.SetFileTypeToBinary()
    writer.SetInputData(polydata)
    if not atomic:
        writer.SetFileName(path)
        if not writer.Write():
            raise InputError(f"could not write surface {path}")
        return
    check_writable(path, "surface", SURFACE_SUFFIXES)
    try:
        with atomic_output(path) as temporary:
            write_surface(temporary, polydata, atomic=False)
    except OSError as error:
        raise InputError(f"surface {path} could not be written ({error_reason(error)})") from None
