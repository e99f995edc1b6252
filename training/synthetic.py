"""A synthetic shape family with known answers: randomly rotated superquadrics.

Used to check meta-learning end to end (a prior must adapt in one step far better than from
scratch) and in fast tests; `prepare` with `data.layout: synthetic` caches them like real data.
"""

from typing import Iterator, Tuple

import numpy as np
from MetaShapeReconLib.geometry import Geometry


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.radians(rng.uniform(-max_degrees, max_degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def superquadric(geometry: Geometry, centre, radii, exponent: float, rotation: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij")
    points = geometry.index_to_physical(np.stack([g.ravel() for g in grids], axis=1))
    local = (points - np.asarray(centre)) @ rotation
    value = (np.abs(local / np.asarray(radii)) ** (2.0 / exponent)).sum(axis=1)
    return (value <= 1.0).reshape(geometry.size)


def synthetic_family(count: int, extent_mm: float, seed: int = 0, radii_mm=(14.0, 34.0),
                     exponent=(0.7, 1.4), max_degrees: float = 25.0
                     ) -> Iterator[Tuple[str, np.ndarray, Geometry]]:
    """(case id, mask, 1 mm crop geometry) for `count` random superquadrics centred in the crop."""
    rng = np.random.default_rng(seed)
    size = int(np.ceil(extent_mm))
    geometry = Geometry.create([size] * 3, [1.0] * 3, [-(size - 1) / 2.0] * 3)
    for index in range(count):
        radii = rng.uniform(*radii_mm, size=3)
        mask = superquadric(geometry, rng.uniform(-3, 3, size=3), radii, rng.uniform(*exponent),
                            random_rotation(rng, max_degrees))
        yield f"synthetic_{index:04d}", mask, geometry
