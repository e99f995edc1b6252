"""Evaluating an adapted network on an output grid, in bounded memory.

Only the voxels inside the prior's canonical cube are evaluated (the rest is background), in
blocks of at most `block` voxels per axis and chunks of `chunk` points, so memory does not grow
with the grid. Coarse-to-fine evaluation (Occupancy Networks' MISE) evaluates a lattice every
`coarse_step` voxels and refines only the cells whose corners disagree about the 0.5 threshold,
so its cost grows with the surface, not the volume. Dense evaluation is kept as the reference;
both compute a voxel's coordinates and probability the same way, so where coarse-to-fine
evaluates a voxel it gets exactly the dense value.

Speed notes (2-core CPU, profiled): the network's matrix products and sines are almost all of the
time. On the CPU they run 2-3x faster in chunks of a few thousand points, whose activations
(chunk x 128 floats per layer) stay in the core's cache, than in chunks of 65k points; the chunks
go to single-threaded workers, one per core (see `parallel.py`).
"""

import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .adaptation import Progress, report
from .frame import CanonicalFrame
from .geometry import Geometry
from .parallel import cpu_workers, parallel_map

THRESHOLD = 0.5
CPU_CHUNK = 4096  # points per forward pass on the CPU: activations stay in the L2 cache
DEVICE_CHUNK = 1 << 16  # on a GPU larger chunks amortise kernel launches


class OccupancyNetwork:
    """Occupancy probabilities of an adapted SIREN at canonical points, without autograd.

    The sine layers' omega_0 is folded into the weights once, so each layer is one addmm and
    one in-place sine. Points outside [-1, 1]^3 are background and never evaluated.
    `precision`: the dtype of the layers after the first, as in `Siren.forward`. `logit_offset`
    (the card's `adaptation.logit_offset`) is added to every logit, folded into the last bias:
    meta-training's targets over-represent the structure, so after few steps the network's
    boundary lies a little outside, and a negative offset moves it in (docs/TRAINING.md)."""

    def __init__(self, params: Mapping[str, torch.Tensor], omega_0: float, device="cpu",
                 chunk: Optional[int] = None, precision: torch.dtype = torch.float32, logit_offset: float = 0.0):
        names = sorted({k.rsplit(".", 1)[0] for k in params}, key=lambda n: int(n.split(".")[-1]))
        self.layers = []
        for index, name in enumerate(names):
            scale = 1.0 if index == len(names) - 1 else omega_0
            dtype = torch.float32 if index == 0 else precision
            # scaled in float32, then rounded once: the products Siren.forward computes
            weight = (params[name + ".weight"].detach().float() * scale).to(device, dtype)
            bias = params[name + ".bias"].detach().float() * scale
            if index == len(names) - 1:
                bias = bias + float(logit_offset)
            bias = bias.to(device, dtype)
            self.layers.append((weight.t().contiguous(), bias))
        self.device = torch.device(device)
        self.precision = precision
        if chunk is None:
            chunk = CPU_CHUNK if self.device.type == "cpu" else DEVICE_CHUNK
        self.chunk = int(chunk)
        self.evaluated = 0  # points sent through the network, for benchmarks and tests

    @torch.no_grad()
    def logits(self, coords: torch.Tensor) -> torch.Tensor:
        weight_t, bias = self.layers[0]
        h = torch.addmm(bias, coords, weight_t).sin_().to(self.precision)
        for weight_t, bias in self.layers[1:-1]:
            h = torch.addmm(bias, h, weight_t).sin_()
        weight_t, bias = self.layers[-1]
        return torch.addmm(bias, h, weight_t).float().squeeze(-1)

    @torch.no_grad()
    def probabilities(self, canonical: np.ndarray) -> np.ndarray:
        """float32 probabilities at canonical points (N x 3); 0 outside the canonical cube."""
        canonical = np.asarray(canonical, dtype=np.float32).reshape(-1, 3)
        result = np.zeros(len(canonical), dtype=np.float32)
        inside = np.all(np.abs(canonical) <= 1.0, axis=1)
        count = int(inside.sum())
        if count == 0:
            return result
        points = canonical if count == len(canonical) else canonical[inside]
        points = torch.from_numpy(np.ascontiguousarray(points)).to(self.device)
        values = result if count == len(canonical) else np.empty(count, dtype=np.float32)

        def run(start: int) -> None:
            # the whole chunk in the worker, sigmoid included: the calling thread starts no
            # parallel PyTorch operation of its own between the workers' chunks
            chunk = torch.sigmoid_(self.logits(points[start:start + self.chunk]))
            values[start:start + len(chunk)] = chunk.cpu().numpy()

        parallel_map(run, range(0, count, self.chunk), cpu_workers(self.device))
        if values is not result:
            result[inside] = values
        self.evaluated += count
        return result


class WithInterpolation:
    """An adapted network's evidence plus shape-based interpolation's: at each point, the
    network's logit minus `weight` times the interpolated signed distance (mm, negative inside;
    `baselines.interpolated_signed_distance`) of the input voxel the point falls in. `distance`
    covers the input voxels from index `start` on; outside it, where the distance is undefined
    (no planes bracket the voxel) and outside the canonical cube the network alone decides.
    Stands in for the network wherever `evaluate_grid` takes one."""

    def __init__(self, network: OccupancyNetwork, distance: np.ndarray, start: Sequence[int], weight: float,
                 affine: Tuple[np.ndarray, np.ndarray]):
        self.network = network
        self.distance = distance
        self.start = np.asarray(start, dtype=np.int64)
        self.weight = float(weight)
        matrix, offset = affine  # canonical = ijk @ matrix.T + offset on the input grid
        self.to_index = np.linalg.inv(np.asarray(matrix, dtype=np.float64))
        self.origin = np.asarray(offset, dtype=np.float64)

    @property
    def evaluated(self) -> int:
        return self.network.evaluated

    def probabilities(self, canonical: np.ndarray) -> np.ndarray:
        canonical = np.asarray(canonical, dtype=np.float32).reshape(-1, 3)
        result = self.network.probabilities(canonical)
        ijk = np.rint((canonical.astype(np.float64) - self.origin) @ self.to_index.T).astype(np.int64) - self.start
        size = np.asarray(self.distance.shape)
        usable = np.all((ijk >= 0) & (ijk < size), axis=1) & np.all(np.abs(canonical) <= 1.0, axis=1)
        distance = np.full(len(canonical), np.nan, dtype=np.float32)
        distance[usable] = self.distance[tuple(ijk[usable].T)]
        known = np.flatnonzero(~np.isnan(distance))
        if len(known):
            p = np.clip(result[known], 1e-7, 1 - 1e-7)
            fused = np.log(p) - np.log1p(-p) - self.weight * distance[known]
            result[known] = 0.5 + 0.5 * np.tanh(0.5 * fused)  # the sigmoid, without overflow
        return result


def _blocks(box: Tuple[slice, ...], block: int):
    ranges = [range(b.start, b.stop, block) for b in box]
    for i in ranges[0]:
        for j in ranges[1]:
            for k in ranges[2]:
                yield tuple(slice(s, min(s + block, b.stop)) for s, b in zip((i, j, k), box))


def _canonical(affine, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Canonical coordinates (float32, N x 3) of voxel indices i, j, k (float64 arrays that
    broadcast together). Dense and coarse-to-fine evaluation both come here, so the same voxel
    always gets bit-identical coordinates."""
    matrix, offset = affine
    shape = np.broadcast(i, j, k).shape
    coords = np.empty(shape + (3,), dtype=np.float32)
    for row in range(3):
        coords[..., row] = i * matrix[row, 0] + j * matrix[row, 1] + k * matrix[row, 2] + offset[row]
    return coords.reshape(-1, 3)


def _lattice_probabilities(network: OccupancyNetwork, affine, origin_index: Sequence[float], step: int,
                           counts: Sequence[int]) -> np.ndarray:
    """Probabilities on the whole lattice origin_index + step * (a, b, c), a < counts[0] ..."""
    axes = [origin_index[n] + step * np.arange(counts[n], dtype=np.float64) for n in range(3)]
    coords = _canonical(affine, axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
    return network.probabilities(coords).reshape(tuple(counts))


def _refine(network: OccupancyNetwork, affine, origin_index: Sequence[float], step: int,
            values: np.ndarray, need: np.ndarray) -> None:
    """Evaluate the lattice points where `need` is True, in place in `values`."""
    flat = np.flatnonzero(need)
    if len(flat) == 0:
        return
    a, b, c = np.unravel_index(flat, need.shape)
    coords = _canonical(affine, origin_index[0] + step * a.astype(np.float64),
                        origin_index[1] + step * b.astype(np.float64),
                        origin_index[2] + step * c.astype(np.float64))
    values.reshape(-1)[flat] = network.probabilities(coords)


def _mixed_cells(inside: np.ndarray) -> np.ndarray:
    """Cells (between lattice points) whose 8 corners disagree about the threshold."""
    anyone = inside[:-1] | inside[1:]
    everyone = inside[:-1] & inside[1:]
    anyone = anyone[:, :-1] | anyone[:, 1:]
    everyone = everyone[:, :-1] & everyone[:, 1:]
    anyone = anyone[:, :, :-1] | anyone[:, :, 1:]
    everyone = everyone[:, :, :-1] & everyone[:, :, 1:]
    return anyone & ~everyone


def _cell_points(mixed: np.ndarray) -> np.ndarray:
    """Points of the twice finer lattice (2n + 1 per axis) that lie in or on the given cells.

    A cell c covers fine points 2c, 2c + 1, 2c + 2 along each axis; the set is a product, so it
    is built axis by axis (3 x 3 operations instead of 27 on the whole fine lattice)."""
    points = mixed
    for axis in range(3):
        n = points.shape[axis]
        shape = list(points.shape)
        shape[axis] = 2 * n + 1
        finer = np.zeros(shape, dtype=bool)
        for shift in range(3):
            index = [slice(None)] * 3
            index[axis] = slice(shift, shift + 2 * n, 2)
            finer[tuple(index)] |= points
        points = finer
    return points


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
        odd_values = finer[tuple(odd)]
        np.add(values[tuple(low)], values[tuple(high)], out=odd_values)
        odd_values *= 0.5
        values = finer
    return values


def _coarse_to_fine_block(network: OccupancyNetwork, affine, start, shape, coarse_step: int) -> np.ndarray:
    """Boolean occupancy of one block, evaluating the network only near the surface."""
    cells = [max(1, math.ceil((n - 1) / coarse_step)) for n in shape]
    step = coarse_step
    values = _lattice_probabilities(network, affine, start, step, [c + 1 for c in cells])
    inside = values >= THRESHOLD
    mixed = _mixed_cells(inside)
    if not mixed.any():  # neighbouring cells share corners: no mixed cell means a uniform block
        return np.full(tuple(shape), bool(inside.flat[0]))
    while step > 1:
        values = _upsample(values)
        step //= 2
        need = _cell_points(mixed)
        need[::2, ::2, ::2] = False  # known from the coarser level
        _refine(network, affine, start, step, values, need)
        if step > 1:
            mixed = _mixed_cells(values >= THRESHOLD)
    return values[:shape[0], :shape[1], :shape[2]] >= THRESHOLD


def _dense_block(network: OccupancyNetwork, affine, start, shape) -> np.ndarray:
    return _lattice_probabilities(network, affine, start, 1, list(shape)) >= THRESHOLD


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
        start = [float(r.start) for r in region]
        shape = [r.stop - r.start for r in region]
        if method == "dense" or coarse_step == 1:
            occupied = _dense_block(network, affine, start, shape)
        else:
            occupied = _coarse_to_fine_block(network, affine, start, shape, coarse_step)
        output[region] = occupied
        report(progress, done + 1, len(blocks))
    return output
