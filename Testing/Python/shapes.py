"""Synthetic shapes with known answers for tests."""

from typing import Sequence

import numpy as np
from MetaShapeReconLib.geometry import Geometry


def voxel_centres(geometry: Geometry) -> np.ndarray:
    """LPS centres of every voxel, shaped (i, j, k, 3)."""
    grids = np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij")
    ijk = np.stack(grids, axis=-1).reshape(-1, 3)
    return geometry.index_to_physical(ijk).reshape(tuple(geometry.size) + (3,))


def ellipsoid(geometry: Geometry, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of an axis-aligned (in LPS) ellipsoid; centre and radii in mm."""
    points = voxel_centres(geometry)
    return (((points - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(axis=-1) <= 1.0


def interpolated_field(sparse: np.ndarray, planes, geometry: Geometry, curve: str = "linear") -> np.ndarray:
    """`baselines.interpolated_signed_distance` on the whole grid (NaN where no planes bracket a voxel)."""
    from MetaShapeReconLib.baselines import interpolated_signed_distance

    in_box, box = interpolated_signed_distance(sparse, planes, geometry, curve=curve)
    field = np.full(sparse.shape, np.nan, np.float32)
    field[box] = in_box
    return field


def sparse_planes(mask: np.ndarray, axis: int, step: int, offset: int) -> np.ndarray:
    """Keep the planes index % step == offset along `axis`, as int labels (1 = structure)."""
    sparse = np.zeros(mask.shape, dtype=np.int32)
    index = [slice(None)] * 3
    index[axis] = slice(offset, None, step)
    sparse[tuple(index)] = mask[tuple(index)]
    return sparse
