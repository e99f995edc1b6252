"""Image grids in physical space.

Arrays are indexed (i, j, k) like ITK indices (i fastest in memory on disk, first here).
Physical points are in LPS millimetres, as ITK and the files on disk use them; Slicer's RAS is
LPS with x and y negated.
"""

from dataclasses import dataclass
from itertools import permutations
from typing import Optional, Sequence, Tuple

import numpy as np

PATIENT_AXES = ("sagittal", "coronal", "axial")  # normal along L-R, A-P, S-I
MIN_SPACING_MM = 1e-4  # finer is a header error, not an image (and overflows the frame's voxel arithmetic)


@dataclass(frozen=True)
class Geometry:
    """A 3-D voxel grid: size in voxels (i, j, k), spacing in mm, origin in LPS mm and a
    3x3 direction matrix whose columns are the i, j, k axes in LPS."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # row-major 3x3, as SimpleITK gives it

    @staticmethod
    def create(size: Sequence[int], spacing: Sequence[float], origin: Sequence[float] = (0, 0, 0),
               direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> "Geometry":
        return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing),
                        tuple(float(o) for o in origin),
                        tuple(float(d) for d in np.asarray(direction, float).ravel()))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping continuous (i, j, k) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        m = self.index_to_physical_matrix
        return np.asarray(ijk, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, lps: np.ndarray) -> np.ndarray:
        m = np.linalg.inv(self.index_to_physical_matrix)
        return np.asarray(lps, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def patient_axis_order(self) -> Tuple[int, int, int]:
        """Image axis closest to each patient axis (sagittal, coronal, axial normals).

        Chooses the one-to-one assignment with the largest total alignment, so a 45 degree
        oblique grid still gets three distinct axes."""
        alignment = np.abs(self.direction_matrix)  # [patient axis, image axis]
        best = max(permutations(range(3)), key=lambda p: sum(alignment[a, p[a]] for a in range(3)))
        return tuple(int(a) for a in best)

    def problem(self) -> Optional[str]:
        """Why no shape can be reconstructed on this grid (None: it can)."""
        if not np.all(np.isfinite(np.r_[self.spacing, self.origin, self.direction])):
            return "its spacing, origin or direction is not finite"
        if min(self.spacing) < MIN_SPACING_MM:
            return f"spacing {self.spacing} mm is finer than {MIN_SPACING_MM} mm; check the units in the header"
        return None

    @property
    def is_rotation(self) -> bool:
        """Whether the axes are perpendicular unit vectors (not sheared), as NIfTI must store them."""
        direction = self.direction_matrix
        return bool(np.allclose(direction.T @ direction, np.eye(3), atol=1e-4))

    def same_grid(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (self.size == other.size
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))

    def lattice_offset(self, other: "Geometry", tol: float = 1e-3) -> Optional[Tuple[int, int, int]]:
        """Where this grid's first voxel lies in `other`'s indices when the two share their voxel
        centres (same axes and spacing, origins whole voxels apart: a crop or an extension of
        `other`); None otherwise. `tol` is in voxels."""
        if not (np.allclose(self.spacing, other.spacing, atol=1e-4 * min(other.spacing))
                and np.allclose(self.direction, other.direction, atol=1e-4)):
            return None
        index = other.physical_to_index(np.asarray(self.origin)[None])[0]
        whole = np.round(index)
        return tuple(int(i) for i in whole) if np.allclose(index, whole, atol=tol) else None

    def resampled(self, spacing: Sequence[float]) -> "Geometry":
        """The grid with a new spacing over the same physical extent (voxel edges kept)."""
        spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
        old_spacing = np.asarray(self.spacing)
        extent = old_spacing * np.asarray(self.size)
        size = np.maximum(1, np.round(extent / spacing)).astype(int)
        # keep the outer voxel edge where it was: shift the first centre by half a voxel change
        shift = (spacing - old_spacing) / 2.0
        origin = np.asarray(self.origin) + self.direction_matrix @ shift
        return Geometry.create(size, spacing, origin, self.direction)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing),
                "origin": list(self.origin), "direction": list(self.direction)}
