"""Sparse labelmap in, complete shape out: the one reconstruction pipeline that the CLI, the
Slicer module and the benchmarks share.

1. the structure's mask and its observed planes (given, or found in the drawing);
2. the case placed in the prior's canonical frame, centred on the observed foreground;
3. the prior adapted to the observed voxels (whole planes: foreground and background);
4. the adapted network evaluated on the output grid, coarse-to-fine, with the evidence of
   shape-based interpolation between the observed planes where the card weighs it in;
5. on the observed planes, the output keeps what the user drew, and the parts of the output
   that touch nothing drawn are removed.
"""

import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from .adaptation import Progress, best_step, converged, report, steps_until_converged, take_steps
from .baselines import interpolated_signed_distance
from .errors import InputError
from .frame import CanonicalFrame, centre_frame, fits_in_frame, observed_foreground_points
from .geometry import Geometry
from .occupancy import WithInterpolation, evaluate_grid
from .planes import (
    ObservedPlanes,
    describe_planes,
    drop_unsupported_parts,
    finish_on_drawing,
    keep_drawn_planes,
    observed_mask,
    select_planes,
)
from .prior import Prior


@dataclass
class Reconstruction:
    labels: np.ndarray  # uint8 0/1, indexed (i, j, k) on `geometry`
    geometry: Geometry
    report: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> torch.device:
    device = str(device or "auto").strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: CUDA is not available here (no NVIDIA GPU, or a CPU-only "
                             "PyTorch); use --device cpu or auto")
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise InputError(f"--device {device}: not a device name (use auto, cpu, cuda or cuda:N)") from None
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
        return resolved
    raise InputError(f"--device {device}: expected auto, cpu or cuda")


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX-512 BF16 or AMX); elsewhere
    PyTorch emulates bfloat16, and float32 is the faster choice."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))


def check_precision(precision: str) -> str:
    precision = (precision or "auto").lower()
    if precision != "auto" and precision not in PRECISIONS:
        raise InputError(f"--precision {precision}: expected auto, {' or '.join(PRECISIONS)}")
    return precision


def precision_name(dtype: torch.dtype) -> str:
    """"float32" or "bfloat16": the name reports and results give a resolved precision."""
    return next(name for name, value in PRECISIONS.items() if value == dtype)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the network's later layers (`Siren.forward`). auto: bfloat16 on a CPU with
    native bfloat16, where adaptation and evaluation take about 0.6x the time at the same Dice
    (docs/PERFORMANCE.md), else float32."""
    precision = check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if device.type == "cpu" and native_bfloat16() else torch.float32
    return PRECISIONS[precision]


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"cuda ({properties.name}, {properties.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def structure_mask(labels: np.ndarray, label: Optional[int] = None) -> np.ndarray:
    """The structure as a boolean mask: voxels equal to `label`, or every non-zero voxel."""
    if label is None:
        mask = labels != 0
    elif label == 0:
        raise InputError("label 0 is the background; name the structure's label (e.g. --label 1)")
    else:
        mask = labels == label
        if not mask.any():
            present = np.unique(labels)
            present = present[present != 0][:20]
            raise InputError(f"label {label} is absent from the labelmap (labels present: "
                             f"{', '.join(str(int(v)) for v in present) or 'none'})")
    if not mask.any():
        raise InputError("the labelmap is empty: no foreground voxel to reconstruct from")
    if mask.all():
        raise InputError("the mask fills the whole grid: with no background there is no boundary to learn")
    return mask


def observed_context(mask: np.ndarray, geometry: Geometry, planes: ObservedPlanes, frame: CanonicalFrame):
    """Canonical coordinates (float32, N x 3) and labels (N) of the observed voxels inside the
    prior's frame; a voxel where planes of two orientations cross is counted once."""
    box = frame.index_box(geometry)
    matrix, offset = frame.index_affine(geometry)
    matrix, offset = matrix.astype(np.float32), offset.astype(np.float32)
    coords, labels = [], []
    done = {}  # planes of orientations already collected
    for axis in sorted(planes):
        u, v = [a for a in range(3) if a != axis]
        iu = np.arange(box[u].start, box[u].stop)
        iv = np.arange(box[v].start, box[v].stop)
        if len(iu) == 0 or len(iv) == 0:
            continue
        # canonical = A[:, axis] * t + A[:, u] * iu + A[:, v] * iv + b, built by broadcasting
        in_plane = (iu[:, None, None] * matrix[:, u] + iv[None, :, None] * matrix[:, v] + offset).astype(np.float32)
        fresh = np.ones((len(iu), len(iv)), dtype=bool)
        if u in done:
            fresh[np.isin(iu, done[u]), :] = False
        if v in done:
            fresh[:, np.isin(iv, done[v])] = False
        for t in planes[axis]:
            if not box[axis].start <= t < box[axis].stop:
                continue
            points = in_plane + np.float32(t) * matrix[:, axis]
            keep = fresh & np.all(np.abs(points) <= 1.0, axis=-1)
            index = [slice(None)] * 3
            index[axis] = int(t)
            index[u], index[v] = box[u], box[v]
            coords.append(points[keep])
            labels.append(mask[tuple(index)][keep])
        done[axis] = planes[axis]
    if not coords:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.float32)
    return np.concatenate(coords), np.concatenate(labels).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _drawn_dice(prediction: np.ndarray, mask: np.ndarray, planes: ObservedPlanes) -> float:
    """Dice on the observed voxels; only the box where either is foreground matters."""
    either = [np.nonzero(prediction.any(axis=others) | mask.any(axis=others))[0]
              for others in ((1, 2), (0, 2), (0, 1))]
    box = tuple(slice(int(e[0]), int(e[-1]) + 1) for e in either)
    observed = observed_mask(mask.shape, planes, box)
    return dice(prediction[box][observed], mask[box][observed])


INTERPOLATION_REFERENCE_GAP_MM = 8.0
MAX_STEPS = 100_000
EVALUATIONS = ("coarse-to-fine", "dense")


def plane_gap_mm(planes: ObservedPlanes, geometry: Geometry) -> Optional[float]:
    """The widest median gap (mm) between consecutive observed planes over the orientations
    that have two or more; None where none has (nothing to interpolate between)."""
    gaps = [float(np.median(np.diff(np.unique(indices)))) * float(geometry.spacing[axis])
            for axis, indices in planes.items() if len(np.unique(indices)) > 1]
    return max(gaps) if gaps else None


def interpolation_weight(prior: Prior, gap_mm: Optional[float], weight: Optional[float] = None) -> float:
    """Logits per mm of interpolated signed distance at this drawing's plane gap: `weight` (at
    8 mm; None: the card's `interpolation_weight`) times (8 mm / gap)^power, the power the card's
    `interpolation_gap_power`.
    Interpolation is close to the truth between close planes and degrades with the gap, faster
    on some organs than on others (across 16 mm it is behind the network on coronal and axial
    planes of the left atrium and pancreas); the power is chosen on validation shapes
    (docs/TRAINING.md, "Interpolation between parallel planes")."""
    weight = prior.adaptation["interpolation_weight"] if weight is None else weight
    if not weight or gap_mm is None:
        return 0.0
    power = float(prior.adaptation["interpolation_gap_power"])
    return float(weight) * (INTERPOLATION_REFERENCE_GAP_MM / gap_mm) ** power


def interpolation_evidence(mask: np.ndarray, planes: ObservedPlanes, geometry: Geometry, frame: CanonicalFrame,
                           weight: float, curve: str = "linear") -> Optional[tuple]:
    """The arguments of `WithInterpolation` after the network (distance, start, weight, affine),
    or None where the weight is 0: the network alone. `curve`: the card's `interpolation_curve`."""
    if weight <= 0:
        return None
    distance, box = interpolated_signed_distance(mask, planes, geometry, curve)
    return distance, [b.start for b in box], weight, frame.index_affine(geometry)


def reconstruct(labels: np.ndarray, geometry: Geometry, prior: Prior, steps: Union[int, str, None] = None,
                slices: str = "auto", label: Optional[int] = None, device: str = "auto",
                output_geometry: Optional[Geometry] = None, evaluation: str = "coarse-to-fine",
                progress: Optional[Progress] = None, seed: int = 0, precision: str = "auto",
                interpolation: Optional[float] = None) -> Reconstruction:
    """Reconstruct the complete structure from a sparse labelmap.

    labels: integer array indexed (i, j, k) on `geometry`; steps: an int (`Prior.adaptation_steps`:
    the meta-learned steps, then Adam), "auto" (until the context loss stops improving) or None
    (the prior's default);
    precision: "auto", "float32" or "bfloat16" (`resolve_precision`);
    interpolation: the weight of shape-based interpolation's evidence (`interpolation_weight`;
    0: the network alone; None: the card's `adaptation.interpolation_weight`);
    progress(step, total, loss) -> bool is called through adaptation and evaluation and may
    cancel by returning False. Raises InputError on unusable input, Cancelled on cancel."""
    started = time.perf_counter()
    device = str(device or "auto").strip().lower()  # once: the GPU -> CPU fallback below compares it
    auto_steps = isinstance(steps, str) and steps.lower() == "auto"
    if steps is None or auto_steps:
        fixed_steps = prior.default_steps
    else:
        try:
            fixed_steps = int(steps)
            if isinstance(steps, bool) or (isinstance(steps, float) and steps != fixed_steps):
                raise ValueError(steps)
        except (ValueError, TypeError, OverflowError):
            raise InputError(f"--steps {steps!r}: expected a whole number of steps or auto") from None
        if fixed_steps < 0:
            raise InputError("--steps must be 0 or more")
        if fixed_steps > MAX_STEPS:
            raise InputError(f"--steps {fixed_steps}: at most {MAX_STEPS:,} (--steps auto stops by itself when the "
                             "loss stops improving)")
    if evaluation not in EVALUATIONS:
        raise InputError(f"--evaluation {evaluation!r}: expected one of {', '.join(EVALUATIONS)}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, np.integer))):
        raise InputError(f"--label {label!r}: expected a whole number")
    if labels.ndim != 3 or tuple(labels.shape) != geometry.size:
        raise InputError(f"labelmap array {labels.shape} does not match its geometry {geometry.size}")
    for grid, what in ((geometry, "the labelmap's grid"), (output_geometry, "the output grid")):
        if grid is not None and grid.problem():
            raise InputError(f"{what}: {grid.problem()}")
    output_geometry = output_geometry or geometry
    torch_device = resolve_device(device)
    precision = check_precision(precision)
    try:
        card_weight = prior.adaptation["interpolation_weight"] if interpolation is None else float(interpolation)
    except (TypeError, ValueError):
        card_weight = float("nan")
    if not (card_weight >= 0 and np.isfinite(card_weight)):
        raise InputError(f"--interpolation {interpolation!r}: expected a number >= 0")

    mask = structure_mask(labels, label)
    planes = select_planes(slices, mask, geometry)
    frame = centre_frame(prior.frame_spec, geometry, mask, planes)
    coords, target = observed_context(mask, geometry, planes, frame)
    if len(coords) == 0:
        raise InputError("no observed voxel lies inside the prior's frame")
    warnings = []
    ignored = _drawn_off_planes(mask, planes)
    if ignored:
        warnings.append(f"{ignored} drawn voxel(s) lie off the observed planes and were ignored "
                        "(see --slices)")
    if not fits_in_frame(frame, observed_foreground_points(mask, planes, geometry)):
        warnings.append(f"the drawn structure is larger than the prior's {prior.frame_spec.extent_mm} mm frame; "
                        "parts outside it are not reconstructed")

    interpolating = time.perf_counter()
    gap = plane_gap_mm(planes, geometry)
    weight = interpolation_weight(prior, gap, card_weight)
    evidence = interpolation_evidence(mask, planes, geometry, frame, weight, prior.adaptation["interpolation_curve"])
    interpolate_seconds = time.perf_counter() - interpolating

    attempts = [torch_device]
    if device == "auto" and torch_device.type == "cuda":
        attempts.append(torch.device("cpu"))  # graceful fallback when the GPU is too small
    for attempt in attempts:
        try:
            result = _adapt_and_evaluate(prior, attempt, coords, target, seed, fixed_steps, auto_steps,
                                         frame, output_geometry, evaluation, progress, precision, evidence)
            torch_device = attempt
            break
        except torch.OutOfMemoryError:
            if attempt.type == "cuda":
                torch.cuda.empty_cache()
            if attempt is attempts[-1]:
                raise InputError(f"out of memory on {attempt}: try --device cpu or a coarser --output-spacing") from None
            warnings.append("the GPU ran out of memory; reconstructed on the CPU instead")
    output, losses, network, timings, steps_taken, context = result
    steps_used = steps_taken
    if auto_steps:
        steps_used = best_step(losses)
        max_steps = int(prior.adaptation["auto"]["max_steps"])
        if max_steps and not converged(losses, int(prior.adaptation["auto"]["patience"])):
            warnings.append(f"--steps auto: the loss was still improving after max_steps = {max_steps} "
                            "(the prior's adaptation.auto.max_steps); the result may not have converged")
    if evidence is not None:
        timings = dict(interpolate=interpolate_seconds, **timings)

    offset = output_geometry.lattice_offset(geometry)
    overlap = None if offset is None else _overlap(offset, output.shape, mask.shape)
    keeps_drawing = overlap is not None
    if keeps_drawing:  # the drawing's grid, or a crop or extension of it: the drawing is the truth there
        drawn_dice, removed_parts, removed_voxels = _finish_on_lattice(output, mask, planes, offset, overlap)
    else:
        drawn_dice = dice(network.probabilities(context.coords.cpu().numpy()) >= 0.5, context.target.cpu().numpy())
        removed_parts = removed_voxels = 0
    if not output.any():
        warnings.append("the reconstruction is empty")

    voxel_ml = float(np.prod(output_geometry.spacing)) / 1000.0
    record = {
        "prior": prior.name,
        "prior_path": os.path.abspath(prior.path) if prior.path else None,
        "label": label,
        "steps": steps_taken,
        "steps_used": steps_used,
        "steps_mode": "auto" if auto_steps else "fixed",
        "device": device_description(torch_device),
        "precision": precision_name(network.precision),
        "observed_planes": describe_planes(planes, geometry),
        "context_points": {"observed": int(len(coords)), "used": int(len(context.target)),
                           "fresh_each_step": context.redraw is not None,
                           "used_each_later_step": int(context.later_points)},
        "frame": {"centre_lps_mm": list(frame.centre), "extent_mm": list(prior.frame_spec.extent_mm)},
        "loss": losses,
        "interpolation": {"weight": card_weight, "plane_gap_mm": gap, "logits_per_mm": weight,
                          "curve": prior.adaptation["interpolation_curve"]},
        "logit_offset": prior.logit_offset,
        "dice_observed_planes": drawn_dice,
        "evaluation": {"method": evaluation, "network_evaluations": network.evaluated},
        "output": dict(output_geometry.to_dict(), foreground_voxels=int(output.sum()),
                       volume_ml=float(output.sum()) * voxel_ml, keeps_drawn_planes=keeps_drawing,
                       unsupported_parts_removed={"parts": removed_parts, "voxels": removed_voxels}),
        "warnings": warnings,
        "timings_s": dict(timings, reconstruct=time.perf_counter() - started),
    }
    return Reconstruction(output, output_geometry, record)


def _overlap(offset, output_shape, drawing_shape):
    """The box where a grid `offset` voxels into the drawing's grid overlaps it, in drawing
    indices (None when they do not overlap)."""
    low = np.maximum(offset, 0)
    high = np.minimum(np.add(offset, output_shape), drawing_shape)
    return None if np.any(high <= low) else tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def _planes_within(planes: ObservedPlanes, low, high) -> ObservedPlanes:
    """The planes that cross the box [low, high) (indices), numbered from its corner."""
    inside = {axis: indices[(indices >= low[axis]) & (indices < high[axis])] - low[axis]
              for axis, indices in planes.items()}
    return {axis: indices for axis, indices in inside.items() if len(indices)}


def _finish_on_lattice(output: np.ndarray, mask: np.ndarray, planes: ObservedPlanes, offset, overlap):
    """`finish_on_drawing` for an output grid on the drawing's lattice whose first voxel is the
    drawing's voxel `offset` (`overlap`: where the two grids meet, `_overlap`): (Dice on the drawn
    planes, parts removed, voxels removed), in place.
    Both live in one box (drawing indices) that holds the output and the drawn structure, so a
    part inside the output is kept when what supports it was drawn just outside. On the planes,
    voxels outside the drawing's grid were never seen: they keep the network's value and support
    nothing."""
    if tuple(offset) == (0, 0, 0) and output.shape == mask.shape:
        drawn_dice = _drawn_dice(output, mask, planes)
        return (drawn_dice,) + finish_on_drawing(output, mask, planes)
    inside = tuple(slice(o.start - a, o.stop - a) for o, a in zip(overlap, offset))  # the overlap, output indices
    in_overlap = _planes_within(planes, [o.start for o in overlap], [o.stop for o in overlap])
    seen = output[inside].any() or mask[overlap].any()
    drawn_dice = _drawn_dice(output[inside], mask[overlap], in_overlap) if seen else 1.0  # as `dice` of nothing

    drawn = [np.nonzero(mask.any(axis=others))[0] for others in ((1, 2), (0, 2), (0, 1))]
    low = np.minimum(offset, [d[0] for d in drawn])
    high = np.maximum(np.add(offset, output.shape), [d[-1] + 1 for d in drawn])
    drawing_part = tuple(slice(int(max(lo, 0)), int(min(hi, n))) for lo, hi, n in zip(low, high, mask.shape))
    where_drawing = tuple(slice(int(d.start - lo), int(d.stop - lo)) for d, lo in zip(drawing_part, low))
    where_output = tuple(slice(int(o - lo), int(o - lo + n)) for o, lo, n in zip(offset, low, output.shape))
    result = np.zeros(tuple(int(n) for n in high - low), dtype=output.dtype)
    result[where_output] = output
    truth = result.copy()  # off the drawing's grid: what the network says
    truth[where_drawing] = mask[drawing_part]
    in_box = _planes_within(planes, low, high)
    keep_drawn_planes(result, truth, in_box)
    removed = drop_unsupported_parts(result, in_box, seen=where_drawing)
    output[...] = result[where_output]
    return (drawn_dice,) + removed


def _drawn_off_planes(mask: np.ndarray, planes: ObservedPlanes) -> int:
    """How many foreground voxels of the drawing lie on no observed plane (never used)."""
    either = [np.nonzero(mask.any(axis=others))[0] for others in ((1, 2), (0, 2), (0, 1))]
    box = tuple(slice(int(e[0]), int(e[-1]) + 1) for e in either)
    return int(mask.sum()) - int(mask[box][observed_mask(mask.shape, planes, box)].sum())


def _adapt_and_evaluate(prior: Prior, device: torch.device, coords: np.ndarray, target: np.ndarray, seed: int,
                        fixed_steps: int, auto_steps: bool, frame: CanonicalFrame, output_geometry: Geometry,
                        evaluation: str, progress: Optional[Progress], precision: str, evidence=None):
    adaptation = prior.adaptation
    auto = adaptation["auto"]
    blocks = _block_count(frame, output_geometry)
    adapt_total = int(auto["max_steps"]) if auto_steps else fixed_steps
    total = adapt_total + blocks

    def adapt_progress(step, _total, loss):
        return progress is None or progress(step, total, loss)

    started = time.perf_counter()
    dtype = resolve_precision(precision, device)
    prior = prior.to(device, dtype)
    context = prior.context(coords, target, seed, device)
    steps = prior.adaptation_steps(context)
    if auto_steps:
        params, losses = steps_until_converged(steps, prior.params, int(auto["patience"]), int(auto["max_steps"]),
                                               adapt_progress)
    else:
        params, losses = take_steps(steps, prior.params, fixed_steps, adapt_progress)
    steps_taken = len(losses)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    adapted = time.perf_counter()

    network = prior.network(params, device)  # in `dtype`: the prior was moved to it above

    def evaluate_progress(step, _total, loss):
        return progress is None or progress(adapt_total + step, total, None)

    field = network if evidence is None else WithInterpolation(network, *evidence)
    output = evaluate_grid(field, frame, output_geometry, method=evaluation, progress=evaluate_progress)
    report(progress, total, total)
    timings = {"adapt": adapted - started, "evaluate": time.perf_counter() - adapted}
    return output, losses, network, timings, steps_taken, context


def _block_count(frame: CanonicalFrame, geometry: Geometry, block: int = 128) -> int:
    box = frame.index_box(geometry)
    count = 1
    for b in box:
        count *= max(1, -(-(b.stop - b.start) // block))
    return count
