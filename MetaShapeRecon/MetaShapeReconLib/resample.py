"""Resampling segmentations onto canonical grids, smoothly.

A binary mask is resampled through its signed distance (mm) with linear interpolation and cut
at zero, so a structure drawn on thick slices comes out smooth instead of as a staircase. Used
by `training prepare` and the benchmark's real-shape inputs.
"""

from typing import Sequence

import numpy as np

from .geometry import Geometry


def centred_grid(centre_lps: Sequence[float], extent_mm: Sequence[float], spacing_mm: float) -> Geometry:
    """An LPS-aligned isotropic grid covering `extent_mm` around `centre_lps`."""
    size = np.ceil(np.asarray(extent_mm, float) / spacing_mm).astype(int)
    origin = np.asarray(centre_lps, float) - (size - 1) / 2.0 * spacing_mm
    return Geometry.create(size, [spacing_mm] * 3, origin)


def signed_distance(binary_image):
    """Signed distance in mm, negative inside, zero halfway between a boundary voxel and its
    outside neighbour. (Maurer's map alone is zero on the inside boundary voxels: cutting it at
    zero would shave one voxel off every structure.)"""
    import SimpleITK as sitk

    def maurer(image):
        return sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)

    mask = sitk.Cast(binary_image != 0, sitk.sitkUInt8)
    return (maurer(mask) - maurer(sitk.Cast(mask == 0, sitk.sitkUInt8))) * 0.5


def resample_smooth(binary_image, grid: Geometry) -> np.ndarray:
    """A binary SimpleITK image resampled onto `grid` through its signed distance; (i, j, k) bool."""
    import SimpleITK as sitk

    distance = signed_distance(binary_image)
    reference = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction)
    resampled = sitk.Resample(distance, reference, sitk.Transform(), sitk.sitkLinear, 1e6, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0) < 0
