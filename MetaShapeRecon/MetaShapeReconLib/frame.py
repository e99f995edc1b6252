"""The prior's canonical frame.

A prior works in physical millimetres along patient axes (LPS), centred on the observed
foreground and scaled so that its crop extent maps to [-1, 1] on every axis. Training and
reconstruction both place a case in this frame with `centre_frame`, so a prior sees cases
exactly as it saw them while learning.
"""

from dataclasses import dataclass
from numbers import Real
from typing import Mapping, Sequence, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry
from .planes import ObservedPlanes

CENTRE_OBSERVED_BOX = "observed_foreground_box"


@dataclass(frozen=True)
class FrameSpec:
    """What a prior's model card says about its frame."""

    extent_mm: Tuple[float, float, float]
    centre: str = CENTRE_OBSERVED_BOX

    @staticmethod
    def from_metadata(frame: Mapping) -> "FrameSpec":
        extent = frame["extent_mm"]
        extent = extent if isinstance(extent, (list, tuple)) else [extent] * 3
        numbers = all(isinstance(e, Real) and not isinstance(e, bool) for e in extent)
        if not numbers or len(extent) != 3 or not all(0 < e < float("inf") for e in extent):
            raise ValueError(f"frame extent_mm must be three positive numbers, got {frame['extent_mm']}")
        centre = frame.get("centre", CENTRE_OBSERVED_BOX)
        if centre != CENTRE_OBSERVED_BOX:
            raise ValueError(f"unknown frame centring {centre!r}")
        return FrameSpec(tuple(float(e) for e in extent), centre)

    def to_metadata(self) -> dict:
        return {"axes": "LPS", "units": "mm", "extent_mm": list(self.extent_mm), "centre": self.centre,
                "normalisation": "canonical = (point_lps - centre) / (extent_mm / 2)"}


@dataclass(frozen=True)
class CanonicalFrame:
    """A case placed in a prior's frame: canonical = (lps - centre) / half_extent."""

    centre: Tuple[float, float, float]
    half_extent: Tuple[float, float, float]

    def to_canonical(self, lps: np.ndarray) -> np.ndarray:
        return (np.asarray(lps, np.float64) - self.centre) / self.half_extent

    def to_physical(self, canonical: np.ndarray) -> np.ndarray:
        return np.asarray(canonical, np.float64) * self.half_extent + self.centre

    def index_affine(self, geometry: Geometry) -> Tuple[np.ndarray, np.ndarray]:
        """(A, b) with canonical = ijk @ A.T + b for voxel indices of `geometry`."""
        m = geometry.index_to_physical_matrix
        scale = 1.0 / np.asarray(self.half_extent)
        return m[:3, :3] * scale[:, None], (m[:3, 3] - self.centre) * scale

    def index_box(self, geometry: Geometry) -> Tuple[slice, slice, slice]:
        """The voxel box of `geometry` that holds the canonical cube [-1, 1]^3 (clipped to the grid)."""
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
        ijk = geometry.physical_to_index(self.to_physical(corners))
        low = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, np.asarray(geometry.size))
        high = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 0, np.asarray(geometry.size))
        return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def observed_foreground_points(mask: np.ndarray, planes: ObservedPlanes, geometry: Geometry) -> np.ndarray:
    """LPS positions (mm) of the foreground voxels on the observed planes."""
    points = []
    for axis, indices in planes.items():
        plane_voxels = np.take(mask, indices, axis=axis)
        found = np.argwhere(plane_voxels)
        if len(found):
            found[:, axis] = indices[found[:, axis]]
            points.append(found)
    if not points:
        return np.zeros((0, 3))
    return geometry.index_to_physical(np.concatenate(points))


def centre_frame(spec: FrameSpec, geometry: Geometry, mask: np.ndarray, planes: ObservedPlanes) -> CanonicalFrame:
    """Place a case in the prior's frame, centred on the bounding box of the observed foreground."""
    points = observed_foreground_points(mask, planes, geometry)
    if len(points) == 0:
        raise InputError("the observed planes hold no foreground: nothing to reconstruct")
    centre = (points.min(axis=0) + points.max(axis=0)) / 2.0
    return CanonicalFrame(tuple(float(c) for c in centre), tuple(float(e) / 2.0 for e in spec.extent_mm))


def fits_in_frame(frame: CanonicalFrame, points_lps: Sequence) -> bool:
    return bool(np.all(np.abs(frame.to_canonical(points_lps)) <= 1.0))
