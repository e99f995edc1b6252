"""Evaluating an adapted network on an output grid, in bounded memory.

Only the voxels inside the prior's canonical cube are evaluated (the rest is background), in
blocks of at most `block` voxels per axis and chunks of `chunk` points, so memory does not grow
with the grid. Coarse-to-fine evaluation (Occupancy Networks' MISE) evaluates a lattice every
`coarse_step` voxels and refines only the cells whose corners disagree about the 0.5 threshold,
so its cost grows with the surface, not the volume. Dense evaluation is kept as the reference.
"""

import math
from typing import Mapping, Optional, Tuple

import numpy as np
import torch

from .adaptation import Progress, report
from .frame import CanonicalFrame
from .geometry import Geometry

THRESHOLD = 0.5


class OccupancyNetwork:
    """Occupancy probabilities of an adapted SIREN at canonical points, without autograd.

    The sine layers' omega_0 is folded into the weights once, so each layer is one addmm and
    one in-place sine. Points outside [-1, 1]^3 are background and never evaluated."""

    def __init__(self, params: Mapping[str, torch.Tensor], omega_0: float, device="cpu",
                 chunk: int = 1 << 16):
        names = sorted({k.rsplit(".", 1)[0] for k in params}, key=lambda n: int(n.split(".")[-1]))
        self.layers = []
        for index, name in enumerate(names):
            scale = 1.0 if index == len(names) - 1 else omega_0
            weight = (params[name + ".weight"].detach() * scale).to(device, torch.float32)
            bias = (params[name + ".bias"].detach() * scale).to(device, torch.float32)
            self.layers.append((weight.t().contiguous(), bias))
        self.device = device
        self.chunk = chunk
        self.evaluated = 0  # points sent through the network, for benchmarks and tests

    @torch.no_grad()
    def logits(self, coords: torch.Tensor) -> torch.Tensor:
        h = coords
        for weight_t, bias in self.layers[:-1]:
            h = torch.addmm(bias, h, weight_t).sin_()
        weight_t, bias = self.layers[-1]
        return torch.addmm(bias, h, weight_t).squeeze(-1)

    def probabilities(self, canonical: np.ndarray) -> np.ndarray:
        canonical = np.asarray(canonical, dtype=np.float32).reshape(-1, 3)
        result = np.zeros(len(canonical), dtype=np.float32)
        inside = np.nonzero(np.all(np.abs(canonical) <= 1.0, axis=1))[0]
        for start in range(0, len(inside), self.chunk):
            rows = inside[start:start + self.chunk]
            coords = torch.from_numpy(canonical[rows]).to(self.device)
            result[rows] = torch.sigmoid(self.logits(coords)).cpu().numpy()
        self.evaluated += len(inside)
        return result


def _blocks(box: Tuple[slice, ...], block: int):
    ranges = [range(b.start, b.stop, block) for b in box]
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                yield tuple(slice(s, min(s + block, b.stop)) for s, b in zip((i, j, k), box))


def _lattice_probabilities(network: OccupancyNetwork, affine, origin_index, step: int,
                           counts, where: Optional[np.ndarray] = None) -> np.ndarray:
    """Probabilities on the lattice origin_index + step * (a, b, c), a < counts[0] ...;
    only where `where` is True (elsewhere 0) when given."""
    matrix, offset = affine
    if where is None:
        grids = np.meshgrid(*[np.arange(n) for n in counts], indexing="ij")
        lattice = np.stack([g.ravel() for g in grids], axis=1)
    else:
        lattice = np.argwhere(where)
    ijk = origin_index + step * lattice.astype(np.float64)
    values = network.probabilities(ijk @ matrix.T + offset)
    if where is None:
        return values.reshape(counts)
    dense = np.zeros(counts, dtype=np.float32)
    dense[where] = values
    return dense


def _upsample(values: np.ndarray) -> np.ndarray:
    """Linear interpolation to a lattice twice as fine (size 2n - 1 per axis)."""
    for axis in range(3):
        n = values.shape[axis]
        shape = list(values.shape)
        shape[axis] = 2 * n - 1
        finer = np.empty(shape, dtype=np.float32)
        even = [slice(None)] * 3
        odd = [slice(None)] * 3
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        finer[tuple(even)] = values
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        finer[tuple(odd)] = 0.5 * (values[tuple(low)] + values[tuple(high)])
        values = finer
    return values


def _coarse_to_fine_block(network: OccupancyNetwork, affine, start, shape, coarse_step: int) -> np.ndarray:
    cells = [max(1, math.ceil((n - 1) / coarse_step)) for n in shape]
    step = coarse_step
    values = _lattice_probabilities(network, affine, start, step, [c + 1 for c in cells])
    while step > 1:
        inside = values >= THRESHOLD
        cx, cy, cz = cells
        corners = [inside[a:a + cx, b:b + cy, e:e + cz] for a, b, e in np.ndindex(2, 2, 2)]
        mixed = np.logical_or.reduce(corners) & ~np.logical_and.reduce(corners)
        values = _upsample(values)
        step //= 2
        cells = [2 * c for c in cells]
        need = np.zeros(values.shape, dtype=bool)
        for a, b, e in np.ndindex(3, 3, 3):
            need[a:a + cells[0]:2, b:b + cells[1]:2, e:e + cells[2]:2] |= mixed
        need[::2, ::2, ::2] = False  # known from the coarser level
        if need.any():
            refined = _lattice_probabilities(network, affine, start, step, values.shape, where=need)
            values[need] = refined[need]
    return values[:shape[0], :shape[1], :shape[2]]


def _dense_block(network: OccupancyNetwork, affine, start, shape) -> np.ndarray:
    return _lattice_probabilities(network, affine, start, 1, list(shape))


def evaluate_grid(network: OccupancyNetwork, frame: CanonicalFrame, geometry: Geometry,
                  method: str = "coarse-to-fine", coarse_step_mm: float = 4.0, block: int = 128,
                  progress: Optional[Progress] = None) -> np.ndarray:
    """Binary occupancy (uint8, indexed i, j, k) of `geometry`'s voxels.

    `coarse_step_mm` sets the coarse lattice: the largest power-of-two voxel step whose
    spacing stays within it (structures thinner than that may be missed; dense is exact)."""
    if method not in ("coarse-to-fine", "dense"):
        raise ValueError(f"unknown evaluation method {method!r}")
    output = np.zeros(geometry.size, dtype=np.uint8)
    box = frame.index_box(geometry)
    if any(b.stop <= b.start for b in box):
        return output
    affine = frame.index_affine(geometry)
    coarse_step = 1
    while coarse_step * 2 * max(geometry.spacing) <= coarse_step_mm and coarse_step * 2 <= block // 2:
        coarse_step *= 2
    blocks = list(_blocks(box, block))
    for done, region in enumerate(blocks):
        start = np.array([r.start for r in region], dtype=np.float64)
        shape = [r.stop - r.start for r in region]
        if method == "dense" or coarse_step == 1:
            values = _dense_block(network, affine, start, shape)
        else:
            values = _coarse_to_fine_block(network, affine, start, shape, coarse_step)
        output[region] = values >= THRESHOLD
        report(progress, done + 1, len(blocks))
    return output
