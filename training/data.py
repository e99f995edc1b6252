"""Cached canonical shapes and the tasks drawn from them.

A task is one shape seen through some observed planes: its context is exactly what the engine
adapts to at reconstruction time (the engine's `centre_frame` and `observed_context`), its target
is points over the whole frame, enriched near the foreground and the boundary.
"""

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from MetaShapeReconLib.adaptation import choose_context
from MetaShapeReconLib.frame import FrameSpec, centre_frame
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.pipeline import observed_context
from MetaShapeReconLib.planes import ObservedPlanes, planes_from_rules
from scipy import ndimage

from .files import read_json, read_split


@dataclass
class Shape:
    name: str
    case: str
    mask: np.ndarray  # bool, (i, j, k) on `geometry`
    geometry: Geometry
    foreground: np.ndarray  # (N, 3) voxel indices
    boundary: np.ndarray  # (M, 3) voxel indices within the boundary band

    def mirrored(self) -> "Shape":
        """Left-right mirror image (the crop is LPS-aligned: axis i is L-R)."""
        n = self.mask.shape[0] - 1
        flip = np.array([-1, 1, 1])
        shift = np.array([n, 0, 0])
        return Shape(self.name + "_mirror", self.case, self.mask[::-1], self.geometry,
                     self.foreground * flip + shift, self.boundary * flip + shift)


def load_index(cache: str) -> dict:
    path = os.path.join(cache, "shapes.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: run `python -m training prepare` first")
    return read_json(path, "cache index", "run `python -m training prepare` again")


def load_split(config: dict) -> dict:
    data = config["data"]
    path = data.get("split_file") or os.path.join(data["cache"], "split.json")
    if not os.path.isfile(path):
        raise SystemExit(f"split file {path} not found: run `python -m training prepare` first")
    return read_split(path)


def load_shapes(cache: str, cases: Optional[Sequence[str]] = None, boundary_mm: float = 2.0,
                limit: int = 0) -> List[Shape]:
    index = load_index(cache)
    wanted = set(cases) if cases is not None else None
    # a split naming cases the cache lacks would train on a subset unnoticed (max_cases: a deliberate one)
    if wanted and not index.get("max_cases"):
        cached = set(index.get("cases") or [entry["case"] for entry in index["shapes"]])
        missing = sorted(wanted - cached)
        if missing:
            raise SystemExit(f"{len(missing)} case(s) of the split are not in the cache {cache}: "
                             f"{', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''} "
                             "(prepare them, or check data.split_file)")
    shapes = []
    for entry in index["shapes"]:
        if wanted is not None and entry["case"] not in wanted:
            continue
        with np.load(os.path.join(cache, entry["file"])) as stored:
            size = tuple(int(s) for s in stored["shape"])
            mask = np.unpackbits(stored["packed"], count=int(np.prod(size))).reshape(size).astype(bool)
        g = entry["geometry"]
        geometry = Geometry.create(g["size"], g["spacing"], g["origin"], g["direction"])
        band = max(1, int(round(boundary_mm / geometry.spacing[0])))
        boundary = ndimage.binary_dilation(mask, iterations=band) & ~ndimage.binary_erosion(mask, iterations=band)
        shapes.append(Shape(entry["name"], entry["case"], mask, geometry,
                            np.argwhere(mask).astype(np.int32), np.argwhere(boundary).astype(np.int32)))
        if limit and len(shapes) >= limit:
            break
    return shapes


class TaskSampler:
    """Draws observed-plane configurations and context/target points for shapes."""

    def __init__(self, config: dict, seed: int = 0):
        self.tasks = config["tasks"]
        self.frame_spec = FrameSpec.from_metadata(config["frame"])
        self.context_sampling = config["adaptation"].get("context_sampling", "uniform")
        self.rng = np.random.default_rng(seed)
        weights = np.array([p["weight"] for p in self.tasks["planes"]], float)
        self.plane_weights = weights / weights.sum()

    # -- observed planes ------------------------------------------------------------------------
    def planes(self, shape: Shape, configuration: Optional[dict] = None) -> ObservedPlanes:
        rng = self.rng
        if configuration is None:
            configuration = self.tasks["planes"][rng.choice(len(self.tasks["planes"]), p=self.plane_weights)]
        spacing = shape.geometry.spacing[0]
        kind = configuration["kind"]
        low, high = shape.foreground.min(axis=0), shape.foreground.max(axis=0)
        if kind == "parallel":
            axis = str(rng.choice(configuration["axes"]))
            step = max(1, int(round(float(rng.choice(configuration["steps"])) / spacing)))
            planes = planes_from_rules([(axis, step, int(rng.integers(step)))], shape.geometry)
        elif kind == "orthogonal":
            point = shape.foreground[rng.integers(len(shape.foreground))]
            centre = (low + high) / 2.0
            point = np.round(centre + 0.5 * (point - centre)).astype(int)  # through the structure's middle half
            planes = {a: np.array([point[a]]) for a in range(3)}
        elif kind == "two_orientations":
            axes = rng.choice(3, size=2, replace=False)
            count_low, count_high = configuration.get("planes_per_axis", [2, 4])
            planes = {}
            for a in axes:
                count = int(rng.integers(count_low, count_high + 1))
                positions = np.linspace(low[a], high[a], count + 2)[1:-1]
                jitter = (high[a] - low[a]) / (count + 1) / 4.0
                positions = positions + rng.uniform(-jitter, jitter, size=count)
                planes[int(a)] = np.unique(np.clip(np.round(positions), low[a], high[a]).astype(np.int64))
        else:
            raise ValueError(f"unknown plane configuration {kind!r}")
        if kind == "parallel" and rng.random() < float(self.tasks["drop_empty_planes"]):
            planes = self.drawn_only(shape.mask, planes)
        return planes

    @staticmethod
    def drawn_only(mask: np.ndarray, planes: ObservedPlanes) -> ObservedPlanes:
        kept = {}
        for axis, indices in planes.items():
            others = tuple(a for a in range(3) if a != axis)
            drawn = np.nonzero(mask.any(axis=others))[0]
            inside = indices[np.isin(indices, drawn)]
            if len(inside):
                kept[axis] = inside
        return kept or planes

    # -- points --------------------------------------------------------------------------------
    def task(self, shape: Shape, planes: Optional[ObservedPlanes] = None, context: bool = True) -> Tuple:
        """(context coords, context labels, target coords, target labels), float32, canonical frame.
        Without `context` (pre-training, auto-decoder) only the targets: the frame is still
        centred on the observed planes, as at reconstruction time."""
        rng = self.rng
        if self.tasks.get("mirror") and rng.random() < 0.5:
            shape = shape.mirrored()
        for _ in range(10):
            chosen = planes if planes is not None else self.planes(shape)
            if self._has_foreground(shape.mask, chosen):
                break
        frame = centre_frame(self.frame_spec, shape.geometry, shape.mask, chosen)
        if not context:
            return self.targets(shape, frame)
        coords, labels = observed_context(shape.mask, shape.geometry, chosen, frame)
        pick = choose_context(labels, int(self.tasks["context_points"]), rng, self.context_sampling, exact=True)
        context = (coords[pick], labels[pick])
        return context + self.targets(shape, frame)

    @staticmethod
    def _has_foreground(mask: np.ndarray, planes: ObservedPlanes) -> bool:
        return any(np.take(mask, indices, axis=axis).any() for axis, indices in planes.items())

    def targets(self, shape: Shape, frame) -> Tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        count = int(self.tasks["target_points"])
        mix = self.tasks["target_mix"]
        box = frame.index_box(shape.geometry)
        low = np.array([b.start for b in box])
        high = np.array([b.stop for b in box])
        counts = rng.multinomial(count * 2, [mix["uniform"], mix["foreground"], mix["boundary"]])
        ijk = np.concatenate([
            rng.integers(low, high, size=(counts[0], 3)),
            shape.foreground[rng.integers(len(shape.foreground), size=counts[1])],
            shape.boundary[rng.integers(len(shape.boundary), size=counts[2])],
        ])
        matrix, offset = frame.index_affine(shape.geometry)
        coords = (ijk @ matrix.T + offset).astype(np.float32)
        inside = np.nonzero(np.all(np.abs(coords) <= 1.0, axis=1))[0]
        keep = rng.permutation(inside)[:count]
        if len(keep) < count:
            keep = rng.choice(inside, size=count, replace=True)
        return coords[keep], shape.mask[tuple(ijk[keep].T)].astype(np.float32)

    def batch(self, shapes: Sequence[Shape], context: bool = True) -> Dict[str, np.ndarray]:
        parts = [self.task(s, context=context) for s in shapes]
        keys = ("context_x", "context_y", "target_x", "target_y") if context else ("target_x", "target_y")
        return {key: np.stack([p[i] for p in parts]) for i, key in enumerate(keys)}
