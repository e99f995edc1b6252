"""`evaluate`: the paper's protocol on a test split, with the classic baselines beside ours.

For every test shape and input setting (parallel planes along an axis every w mm, three
orthogonal planes through the structure, a few planes in two orientations) each method gets the
same sparse input:
- maml (ours): the prior's meta-learned steps, then Adam (the engine's `--steps auto`);
- pretrain (B.(ii)) and autodecoder (B.(i)): Adam from their initialisation / latent code;
- Fill between slices (ITK morphological contour interpolation, as in Slicer) and signed-distance
  interpolation.
Dice, ASD and HD95 (mm) are measured against the whole shape on its 1 mm canonical crop, after
1, 50, 100 steps and at convergence (early stopping, patience 10), together with the steps and
seconds each baseline needs to reach our 1-step Dice. Tables shaped like the paper's Tables 1-6
go to markdown and CSV, Dice against time to a PNG like its Fig. 2, and `summary.json` feeds the
model card.
"""

import copy
import csv
import json
import os
import shlex
import time
from contextlib import ExitStack
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from MetaShapeReconLib.adaptation import choose_context, steps_until_converged, take_steps, to_tensors
from MetaShapeReconLib.baselines import fill_between_slices, signed_distance_interpolation
from MetaShapeReconLib.frame import FrameSpec, centre_frame
from MetaShapeReconLib.geometry import PATIENT_AXES
from MetaShapeReconLib.labelmap_io import atomic_output
from MetaShapeReconLib.occupancy import WithInterpolation, evaluate_grid
from MetaShapeReconLib.pipeline import (
    dice,
    interpolation_evidence,
    interpolation_weight,
    observed_context,
    plane_gap_mm,
    precision_name,
    resolve_precision,
)
from MetaShapeReconLib.planes import ObservedPlanes, finish_on_drawing, planes_from_rules
from MetaShapeReconLib.prior import Prior, load_prior
from scipy import ndimage

from .config import load_config
from .data import Shape, load_shapes, load_split
from .maml import resolve_device
from .progress import progress_bar
from .validate import sparse_input

STEP_SCHEDULE = (0, 1, 2, 3, 5, 8, 13, 20, 30, 50, 75, 100, 150, 200, 300)


# --- metrics -------------------------------------------------------------------------------------

def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> Tuple[float, float]:
    """(average symmetric surface distance, 95th percentile Hausdorff distance) in mm."""
    if not a.any() or not b.any():
        return float("inf"), float("inf")
    either = np.nonzero((a | b).any(axis=(1, 2)))[0], np.nonzero((a | b).any(axis=(0, 2)))[0], \
        np.nonzero((a | b).any(axis=(0, 1)))[0]
    box = tuple(slice(max(int(e[0]) - 2, 0), int(e[-1]) + 3) for e in either)
    a, b = a[box], b[box]
    border_a = a & ~ndimage.binary_erosion(a)
    border_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~border_b, sampling=spacing)[border_a]
    to_a = ndimage.distance_transform_edt(~border_a, sampling=spacing)[border_b]
    distances = np.concatenate([to_b, to_a])
    return float(distances.mean()), float(np.percentile(distances, 95))


def metrics(prediction: np.ndarray, truth: np.ndarray, spacing) -> Dict[str, float]:
    asd, hd95 = surface_distances(prediction.astype(bool), truth, spacing)
    return {"dice": dice(prediction, truth), "asd": asd, "hd95": hd95}


# --- input settings ------------------------------------------------------------------------------

def setting_planes(setting: str, shape: Shape, rng: np.random.Generator) -> ObservedPlanes:
    """Observed planes of a named setting: AXIS:W (offset drawn from rng), orthogonal,
    two_orientations (3 axial + 3 sagittal planes evenly through the structure)."""
    low, high = shape.foreground.min(axis=0), shape.foreground.max(axis=0)
    order = shape.geometry.patient_axis_order()
    if setting == "orthogonal":
        centre = np.round((low + high) / 2.0).astype(int)
        return {a: np.array([centre[a]]) for a in range(3)}
    if setting == "two_orientations":
        planes = {}
        for axis in (order[2], order[0]):
            planes[axis] = np.unique(np.round(np.linspace(low[axis], high[axis], 5)[1:-1]).astype(np.int64))
        return planes
    axis_name, step = setting.split(":")[:2]
    step = int(round(float(step) / shape.geometry.spacing[0]))
    return planes_from_rules([(axis_name, step, int(rng.integers(step)))], shape.geometry)


# --- adaptation trajectories --------------------------------------------------------------------

class Trajectory:
    """Records metrics of snapshots taken at chosen steps of an optimisation, with the time
    spent adapting up to the snapshot plus the time to evaluate that snapshot's output."""

    def __init__(self, evaluate: Callable, truth: np.ndarray, spacing, record_steps: Sequence[int],
                 planes: Optional[ObservedPlanes] = None):
        self.evaluate, self.truth, self.spacing, self.planes = evaluate, truth, spacing, planes
        self.record_steps = set(record_steps)
        self.rows: List[dict] = []
        self.adapt_seconds = 0.0
        # other outputs of the same weights, recorded at some steps: {method: (evaluate, steps, rows)}
        self.variants: Dict[str, Tuple[Callable, set, List[dict]]] = {}

    def snapshot(self, step: int, state) -> None:
        outputs = [(self.evaluate, self.rows)] + [(evaluate, rows) for evaluate, steps, rows in self.variants.values()
                                                 if step in steps]
        for evaluate, rows in outputs:
            started = time.perf_counter()
            output = evaluate(state)
            if self.planes is not None:
                finish_on_drawing(output, self.truth, self.planes)  # as the product does
            seconds = self.adapt_seconds + time.perf_counter() - started
            rows.append(dict(metrics(output, self.truth, self.spacing), steps=step, seconds=seconds))


def evaluation_precision(config: dict, device) -> torch.dtype:
    """The config's `precision` as `reconstruct` resolves it, so results measure what users get."""
    return resolve_precision(str(config["precision"]), device)  # load_config checked the value


def siren_trajectory(prior: Prior, coords: np.ndarray, target: np.ndarray, meta_steps: int, adam_lr: float,
                     record: Trajectory, max_steps: int, patience: int, frame, geometry, device,
                     converge: bool = True, evidence: Optional[tuple] = None, evidence_steps: Sequence[int] = ()) -> dict:
    """The engine's adaptation (`adaptation_steps`: `meta_steps` meta-learned steps, then Adam)
    until the context loss stops improving (`converge`, at most `max_steps`) or for `max_steps`,
    on context points the prior draws from the observed voxels `coords`, `target` (`Prior.context`).
    Snapshots at record.record_steps and, when converging, of the weights it settles on; with
    `evidence` (`interpolation_evidence`) also the output with interpolation at `evidence_steps`,
    as `maml_interpolated`."""
    prior = prior.to(device)
    context = prior.context(coords, target, 0, device)
    record.evaluate = lambda params: evaluate_grid(prior.network(params, device), frame, geometry)
    if evidence is not None:
        record.variants["maml_interpolated"] = (
            lambda params: evaluate_grid(WithInterpolation(prior.network(params, device), *evidence), frame, geometry),
            set(evidence_steps), [])
    if 0 in record.record_steps:
        record.snapshot(0, prior.params)  # the initialisation itself, before any step
    steps = prior.adaptation_steps(context, meta_steps, adam_lr)
    last = time.perf_counter()

    def on_step(step, params):
        nonlocal last
        record.adapt_seconds += time.perf_counter() - last  # adapting only: snapshots are timed apart
        if step in record.record_steps:
            record.snapshot(step, params)
        last = time.perf_counter()

    precision = precision_name(prior.precision)
    if not converge:
        take_steps(steps, prior.params, max_steps, on_step=on_step)
        return {"converged_steps": max_steps, "precision": precision}
    params, losses = steps_until_converged(steps, prior.params, patience, max_steps, on_step=on_step)
    record.snapshot(-len(losses), params)  # negative steps mark "at convergence" (early stopping)
    return {"converged_steps": len(losses), "precision": precision}


def autodecoder_trajectory(model, coords, target, lr, latent_prior, record: Trajectory, max_steps, patience,
                           frame, geometry, device):
    from .autodecoder import LatentField, fit_latent

    x, y = to_tensors(coords, target, device)
    record.evaluate = lambda latent: evaluate_grid(LatentField(model, latent), frame, geometry)
    state = {"best": float("inf"), "since": 0, "latent": None, "step": 0, "last": time.perf_counter()}
    if 0 in record.record_steps:
        record.snapshot(0, torch.zeros(model.latent_size, device=x.device))  # the mean shape (zero code)
        state["last"] = time.perf_counter()

    def callback(step, latent, loss):
        record.adapt_seconds += time.perf_counter() - state["last"]
        if loss < state["best"] - 1e-6:
            state.update(best=loss, since=0)
        else:
            state["since"] += 1
        if step in record.record_steps:
            record.snapshot(step, latent)
        state.update(latent=latent, step=step)
        state["last"] = time.perf_counter()
        return state["since"] >= patience

    fit_latent(model, x, y, max_steps, lr, latent_prior, callback)
    record.snapshot(-state["step"], state["latent"])
    return {"converged_steps": state["step"]}


# --- the run -------------------------------------------------------------------------------------

def evaluate_case(shape: Shape, setting: str, methods: Dict[str, object], config: dict, rng, device) -> List[dict]:
    planes = setting_planes(setting, shape, rng)
    sparse = sparse_input(shape.mask, planes)
    if not sparse.any():
        return []
    spacing = shape.geometry.spacing
    ev = config["evaluate"]
    full = setting in ev["trajectory_settings"]  # the paper's protocol; elsewhere ours at 1 and default steps
    default_steps = methods["maml"].default_steps if methods.get("maml") is not None else 1
    # the default steps are recorded even where the schedule skips them (10, 12, 15...): tables
    # report ours after them, and an unrecorded step would stand for the recorded one before it
    record_steps = (sorted(set(STEP_SCHEDULE) | set(int(s) for s in ev["steps"]) | {default_steps}) if full
                    else [1, default_steps])
    max_steps = int(ev["converge"]["max_steps"]) if full else default_steps
    patience = int(ev["converge"]["patience"])
    rows = []

    def add(method, entries, extra=None):
        for entry in entries:
            rows.append(dict(entry, method=method, setting=setting, shape=shape.name, **(extra or {})))

    for name in ("fill_between_slices", "sdf_interpolation"):
        if name in methods:
            function = fill_between_slices if name == "fill_between_slices" else signed_distance_interpolation
            started = time.perf_counter()
            output = function(sparse, planes, shape.geometry)
            seconds = time.perf_counter() - started  # the tool's own time, as ours is timed: not the metrics'
            add(name, [dict(metrics(output, shape.mask, spacing), steps=0, seconds=seconds)])
    for name in ("maml", "pretrain"):
        prior = methods.get(name)
        if prior is None or (name != "maml" and not full):
            continue
        frame = centre_frame(prior.frame_spec, shape.geometry, shape.mask, planes)
        coords, target = observed_context(shape.mask, shape.geometry, planes, frame)
        record = Trajectory(None, shape.mask, spacing, record_steps, planes)
        meta_steps = prior.meta_steps if name == "maml" else 0  # B.(ii): Adam from the first step
        adam_lr = float(prior.adaptation["auto"]["lr"]) if name == "maml" else float(config["pretrain"]["lr"])
        evidence = None
        if name == "maml":  # the card's interpolation, as `reconstruct` weighs it in
            weight = interpolation_weight(prior, plane_gap_mm(planes, shape.geometry))
            evidence = interpolation_evidence(shape.mask, planes, shape.geometry, frame, weight,
                                              prior.adaptation["interpolation_curve"])
        info = siren_trajectory(prior, coords, target, meta_steps, adam_lr, record, max_steps, patience,
                                frame, shape.geometry, device, converge=full, evidence=evidence,
                                evidence_steps=[default_steps])
        add(name, record.rows, info)
        for variant, (_, _, variant_rows) in record.variants.items():
            add(variant, variant_rows, info)
    if methods.get("autodecoder") is not None and full:
        model, card = methods["autodecoder"]
        frame = centre_frame(FrameSpec.from_metadata(card["frame"]), shape.geometry, shape.mask, planes)
        coords, target = observed_context(shape.mask, shape.geometry, planes, frame)
        pick = choose_context(target, int(config["adaptation"]["context_points"]), 0,
                              config["adaptation"].get("context_sampling", "uniform"))
        record = Trajectory(None, shape.mask, spacing, record_steps, planes)
        info = autodecoder_trajectory(model, coords[pick], target[pick], float(card["test_time"]["lr"]),
                                      float(card["test_time"]["latent_prior"]), record, max_steps, patience,
                                      frame, shape.geometry, device)
        add("autodecoder", record.rows, info)
    return rows


METHODS = ("maml", "pretrain", "autodecoder", "fill_between_slices", "sdf_interpolation")


def check_settings(settings: Sequence[str], key: str = "evaluate.settings") -> None:
    """Input setting names as `setting_planes` reads them, refused before any work starts."""
    for setting in settings:
        if setting in ("orthogonal", "two_orientations"):
            continue
        axis, _, width = str(setting).partition(":")
        try:
            valid = axis in PATIENT_AXES and float(width) > 0
        except ValueError:
            valid = False
        if not valid:
            raise SystemExit(f"{key}: unknown input setting {setting!r}: expected AXIS:W (AXIS one of "
                             f"{', '.join(PATIENT_AXES)}, W in mm), orthogonal or two_orientations")


def check_evaluation(config: dict) -> None:
    """The evaluate section's methods and settings, refused before any work starts."""
    ev = config["evaluate"]
    if not ev["settings"] or not ev["methods"]:
        raise SystemExit("evaluate.settings and evaluate.methods must each name at least one")
    unknown = [m for m in ev["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"evaluate.methods: unknown method {unknown[0]!r}: expected some of {', '.join(METHODS)}")
    check_settings(ev["settings"])
    check_settings(ev["trajectory_settings"], "evaluate.trajectory_settings")


def transfer_targets(specs: Sequence[str], config: dict) -> List[Tuple[str, List[Shape]]]:
    """`--transfer NAME=CONFIG` -> (name, test shapes of that config), read before the long run."""
    targets = []
    for spec in specs:
        name, sep, other_path = spec.partition("=")
        if not sep or not name.strip() or not other_path.strip():
            raise SystemExit(f"--transfer {spec!r}: expected NAME=CONFIG (e.g. left_atrium=training/configs/left_atrium.yaml)")
        if not os.path.isfile(other_path):
            raise SystemExit(f"--transfer {spec}: config {other_path} not found")
        other = load_config(other_path)
        other_shapes = load_shapes(other["data"]["cache"], load_split(other)["test"], 2.0,
                                   limit=int(config["evaluate"]["transfer_cases"]))
        if not other_shapes:
            raise SystemExit(f"--transfer {spec}: no test shapes in {other['data']['cache']} (check its cache and split)")
        targets.append((name, other_shapes))
    return targets


def run_evaluation(config: dict, args) -> None:
    from .autodecoder import load_autodecoder

    # read and check everything before the long run: a wrong file or setting fails at once
    check_evaluation(config)
    earlier_rows = read_rows(args.reuse) if getattr(args, "reuse", None) else []
    earlier_transfer = read_rows(args.reuse_transfer, "--reuse-transfer") if getattr(args, "reuse_transfer", None) else []
    for row in earlier_transfer:
        row.setdefault("setting", "sagittal:8")  # the transfer table's only input (older files omit it)
    split = load_split(config)
    shapes = load_shapes(config["data"]["cache"], split["test"], float(config["tasks"]["boundary_mm"]),
                         limit=int(config["evaluate"]["cases"]))
    if not shapes:
        raise SystemExit(f"no test shapes: none of the split's {len(split['test'])} test cases is in "
                         f"{config['data']['cache']} (check the cache and the split)")
    targets = transfer_targets(getattr(args, "transfer", []), config)
    device = resolve_device(config["device"])
    precision = evaluation_precision(config, device)
    methods: Dict[str, object] = {}
    wanted = config["evaluate"]["methods"]
    if args.prior and "maml" in wanted:
        methods["maml"] = load_prior(args.prior).to(device, precision)
    if args.pretrain and "pretrain" in wanted:
        methods["pretrain"] = load_prior(args.pretrain).to(device, precision)
    if args.autodecoder and "autodecoder" in wanted:
        methods["autodecoder"] = load_autodecoder(args.autodecoder, device)
    for name in ("fill_between_slices", "sdf_interpolation"):
        if name in wanted:
            methods[name] = True
    if not methods:
        raise SystemExit(f"nothing to evaluate: evaluate.methods {wanted} names none of the files given "
                         "(--prior, --pretrain, --autodecoder)")
    settings = list(config["evaluate"]["settings"])
    rows = evaluate_settings(shapes, settings, methods, config, device, "evaluate")
    if not rows:
        raise SystemExit("no results: no setting drew a plane through any test shape")
    transfer_rows = []
    for name, other_shapes in targets:
        siren_methods = {k: v for k, v in methods.items() if k in ("maml", "pretrain")}
        for row in evaluate_settings(other_shapes, ["sagittal:8"], siren_methods, config, device, f"transfer {name}"):
            transfer_rows.append(dict(row, target=name))
    reused = set()
    for table, earlier, option, key in ((rows, earlier_rows, "reuse", "setting"),
                                        (transfer_rows, earlier_transfer, "reuse_transfer", "target")):
        path = getattr(args, option, None)
        if path:
            check_same_inputs(table, earlier, f"--{option.replace('_', '-')} {path}", key)
            produced = set(methods) | {r["method"] for r in table}  # e.g. maml_interpolated, from maml
            carried = [r for r in earlier if r["method"] not in produced]
            table += carried
            reused |= {r["method"] for r in carried}
    write_results(args.out, rows, transfer_rows, config, methods, args, sorted(reused))


# rows of an earlier evaluation: the methods a run does not evaluate (B.(i), B.(ii) when only the
# prior changed) can be carried over, provided the inputs are the same
NUMBERS = {"steps": int, "dice": float, "asd": float, "hd95": float, "seconds": float, "converged_steps": int}


def read_rows(path: str, option: str = "--reuse") -> List[dict]:
    """The rows of a results.csv or transfer.csv written by `write_results`, with their numbers."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise SystemExit(f"{option} {path}: {error.strerror}") from None
    if not rows or "method" not in rows[0] or "shape" not in rows[0]:
        raise SystemExit(f"{option} {path}: not a results table of `training evaluate`")
    for row in rows:
        for key, kind in NUMBERS.items():
            if key in row:
                row[key] = kind(row[key]) if row[key] not in ("", None) else ""
    return rows


def check_same_inputs(rows: List[dict], earlier: List[dict], source: str, key: str = "setting") -> None:
    """Carried-over rows are only comparable on the same sparse inputs: the same shapes and
    settings (`key`: "target" for the transfer table), and, where both runs have them, the same
    Dice for the deterministic classic tools (the same planes). Exits before anything is written
    otherwise."""
    def cases(table):
        return {(r.get(key), r["shape"]) for r in table}

    if rows and cases(rows) != cases(earlier):
        raise SystemExit(f"{source}: it was evaluated on other shapes or settings than this run "
                         "(check evaluate.cases, evaluate.settings, --transfer and the split)")
    classic = {(r["method"], r.get(key), r["shape"]): r["dice"] for r in rows
               if r["method"] in ("fill_between_slices", "sdf_interpolation")}
    for r in earlier:
        case = (r["method"], r.get(key), r["shape"])
        if case in classic and abs(classic[case] - r["dice"]) > 1e-6:
            raise SystemExit(f"{source}: {r['method']} on {r['shape']} ({r.get(key)}) gives Dice "
                             f"{classic[case]:.6f} here and {r['dice']:.6f} there: the sparse inputs differ "
                             "(another seed or config?)")


def warm_up(shapes, settings, methods, config, device) -> None:
    """One untimed reconstruction of the first shape, each method for one step, result discarded:
    the first of a process carries one-time costs (kernel set-up, allocations) that would otherwise
    count against the first shape's seconds. Its own generator: the timed inputs stay those of the seed."""
    if not shapes or not settings:
        return
    brief = copy.deepcopy(config)
    brief["evaluate"].update(trajectory_settings=[settings[0]], steps=[1])
    brief["evaluate"]["converge"]["max_steps"] = 1
    evaluate_case(shapes[0], settings[0], methods, brief, np.random.default_rng(int(config["seed"])), device)


def evaluate_settings(shapes, settings, methods, config, device, label) -> List[dict]:
    warm_up(shapes, settings, methods, config, device)
    rng = np.random.default_rng(int(config["seed"]))
    rows = []
    bar = progress_bar(total=len(shapes) * len(settings), desc=label, unit="input")
    for shape in shapes:
        for setting in settings:
            rows += evaluate_case(shape, setting, methods, config, rng, device)
            bar.update(1)
    bar.close()
    return rows


# --- tables and plots ----------------------------------------------------------------------------

NAMES = {"maml": "Ours (meta-learned)", "maml_interpolated": "Ours + interpolation",
         "pretrain": "B.(ii) pre-trained", "autodecoder": "B.(i) auto-decoder",
         "fill_between_slices": "Fill between slices", "sdf_interpolation": "Signed-distance interpolation"}


def _select(rows, **where):
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def _mean_std(values) -> str:
    values = [v for v in values if np.isfinite(v)]
    return "n/a" if not values else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _at_step(rows, method, setting, step, key="dice"):
    if method in ("fill_between_slices", "sdf_interpolation"):
        return [r[key] for r in _select(rows, method=method, setting=setting)]
    if step == "conv":
        return [r[key] for r in rows if r["method"] == method and r["setting"] == setting and r["steps"] < 0]
    values = []
    for shape in sorted({r["shape"] for r in _select(rows, method=method, setting=setting)}):
        trajectory = [r for r in _select(rows, method=method, setting=setting, shape=shape) if r["steps"] >= 0]
        done = [r for r in trajectory if r["steps"] <= step]
        if done:  # stopped early: its last snapshot stands for the later steps
            values.append(max(done, key=lambda r: r["steps"])[key])
    return values


def _reach(rows, method, setting, targets: Dict[str, float]):
    """Steps and seconds each shape needs to reach its target Dice (None: never)."""
    steps, seconds = [], []
    for shape, goal in targets.items():
        trajectory = sorted((r for r in _select(rows, method=method, setting=setting, shape=shape) if r["steps"] > 0),
                            key=lambda r: r["steps"])
        hit = next((r for r in trajectory if r["dice"] >= goal), None)
        steps.append(hit["steps"] if hit else None)
        seconds.append(hit["seconds"] if hit else None)
    return steps, seconds


def _format_reach(values, unit=""):
    reached = [v for v in values if v is not None]
    missed = len(values) - len(reached)
    if not reached:
        return f"never ({missed}/{len(values)})"
    text = f"{np.mean(reached):.2f}{unit} ± {np.std(reached):.2f}"
    return text + (f" ({missed} never)" if missed else "")


def write_results(out: str, rows: List[dict], transfer_rows: List[dict], config: dict, methods, args,
                  reused: Sequence[str] = ()) -> None:
    """The tables, summary and plot of one evaluation, written to temporaries and moved into `out`
    together: a failure leaves the folder's earlier evaluation as it was, never a mix."""
    os.makedirs(out, exist_ok=True)
    with ExitStack() as outputs:
        temporary = {name: outputs.enter_context(atomic_output(os.path.join(out, name)))
                     for name in ("results.csv", "transfer.csv", "dice_time.png", "results.md", "summary.json")}
        written = _write_results(temporary, rows, transfer_rows, config, methods, args, reused)
    for name in ("transfer.csv", "dice_time.png"):  # an earlier evaluation's, not this one's
        if name not in written and os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def _write_results(temporary: Dict[str, str], rows: List[dict], transfer_rows: List[dict], config: dict, methods,
                   args, reused: Sequence[str]) -> List[str]:
    written = ["results.csv", "results.md", "summary.json"]
    with open(temporary["results.csv"], "w", newline="") as handle:
        columns = ["method", "setting", "shape", "steps", "dice", "asd", "hd95", "seconds", "converged_steps",
                   "precision"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if transfer_rows:
        written.append("transfer.csv")
        with open(temporary["transfer.csv"], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["target", "method", "setting", "shape", "steps", "dice", "asd"],
                                    extrasaction="ignore")
            writer.writeheader()
            writer.writerows(transfer_rows)
    settings = sorted({r["setting"] for r in rows}, key=lambda s: (s.split(":")[0], s))
    present = [m for m in NAMES if any(r["method"] == m for r in rows)]
    learned = [m for m in ("autodecoder", "pretrain", "maml") if m in present]
    classic = [m for m in ("fill_between_slices", "sdf_interpolation") if m in present]
    default_steps = methods["maml"].default_steps if "maml" in methods else 1
    shapes = sorted({r["shape"] for r in rows})
    lines = [f"# Evaluation: {config['name']}", "",
             f"{len(shapes)} test shapes ({config['data']['layout']} test split, "
             f"`{config['data'].get('split_file') or os.path.join(config['data']['cache'], 'split.json')}`); "
             f"Dice, ASD and HD95 against the whole shape on "
             f"its {config['data']['spacing_mm']} mm canonical crop. Command: `python -m training evaluate "
             f"{shlex.join(_command_args(args))}`", ""]
    if reused:
        earlier = _earlier_command(args.reuse, args.config) if getattr(args, "reuse", None) else None
        lines += [f"Rows of {', '.join(NAMES[m] for m in reused)} are carried over from an earlier evaluation on the "
                  f"same inputs ({', '.join(p for p in (args.reuse, getattr(args, 'reuse_transfer', None)) if p)}); "
                  f"their seconds were measured there{_carried_precision(rows, reused)}, under that run's "
                  "conditions (threads, other jobs): compare their steps with ours, not their seconds."
                  + (f" That evaluation: `{earlier}`" if earlier else ""), ""]

    interpolated = "maml_interpolated" in present
    ours = [("ours_1_step", "maml", 1), ("ours_default_steps", "maml", default_steps)]
    labels = ["Ours 1 step", f"Ours {default_steps} steps"]
    lines += ["## Ours against the classic tools on the same inputs", "",
              f"Ours after 1 step and after the prior's default {default_steps} steps (model card)."]
    if interpolated:
        card = methods["maml"].adaptation if "maml" in methods else {}
        weight, power, curve = (card.get(k, "?") for k in ("interpolation_weight", "interpolation_gap_power",
                                                           "interpolation_curve"))
        ours.append(("ours_interpolated", "maml_interpolated", default_steps))
        labels.append(f"Ours {default_steps} steps + interpolation")
        lines[-1] += (f" \"+ interpolation\": the same network's evidence plus shape-based interpolation's "
                      f"(card's `interpolation_weight` {weight} logits per mm at 8 mm plane gaps, times "
                      f"(8 mm / gap)^{power}, along the {curve} curve between the planes), what "
                      "`reconstruct` returns where two or more parallel planes are drawn; n/a where none are.")
    lines += ["", "| input | " + " | ".join(labels + [NAMES[m] for m in classic]) + " |",
              "|---" * (1 + len(labels) + len(classic)) + "|"]
    summary = {"default_steps": default_steps, "settings": {}}
    for setting in settings:
        cells, entry = [], {}
        for label, method, step in ours + [(m, m, 0) for m in classic]:
            d = _at_step(rows, method, setting, step)
            a = _at_step(rows, method, setting, step, "asd")
            cells.append(f"Dice {_mean_std(d)}<br>ASD {_mean_std(a)} mm" if d else "n/a")
            if d:
                entry[label] = {"dice": float(np.mean(d)), "asd_mm": float(np.mean([v for v in a if np.isfinite(v)]))}
        summary["settings"][setting] = entry
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines.append("")

    times = {}
    for method in ["maml"] + (["maml_interpolated"] if interpolated else []) + classic:
        values = [r["seconds"] for r in rows if r["method"] == method
                  and r["steps"] in ((default_steps,) if method.startswith("maml") else (0,))]
        if values:
            times[method] = float(np.median(values))
    precision = precision_name(methods["maml"].precision) if "maml" in methods else None
    if times:
        arithmetic = f", network in {precision}" if precision else ""
        named = dict(NAMES, maml=f"Ours ({default_steps} steps)",
                     maml_interpolated=f"Ours + interpolation ({default_steps} steps)")
        lines += [f"Median seconds per reconstruction on this machine (CPU, canonical crop{arithmetic}): " + ", ".join(
            f"{named[m]} {t:.2f} s" for m, t in times.items()), ""]
    summary["median_seconds"] = times
    summary["precision"] = precision

    for setting in [s for s in settings if s in config["evaluate"]["trajectory_settings"]]:
        lines += [f"## Table 2 — Dice, {setting}", "",
                  "| method | DSC_0 | DSC_1 | DSC_50 | DSC_100 | DSC_conv |", "|---|---|---|---|---|---|"]
        for method in learned:
            lines.append(f"| {NAMES[method]} | " + " | ".join(_mean_std(_at_step(rows, method, setting, s))
                                                                for s in (0, 1, 50, 100, "conv")) + " |")
        converge = config["evaluate"]["converge"]
        lines += ["", f"## Table 5 — at convergence (early stopping, patience {converge['patience']}, "
                      f"at most {converge['max_steps']} steps), {setting}", "",
                  "| method | DSC_conv | steps | seconds |", "|---|---|---|---|"]
        for method in learned:
            converged = [r for r in _select(rows, method=method, setting=setting) if r["steps"] < 0]
            lines.append(f"| {NAMES[method]} | {_mean_std([r['dice'] for r in converged])} | "
                         f"{_mean_std([-r['steps'] for r in converged])} | {_mean_std([r['seconds'] for r in converged])} |")
        lines += ["", f"## Table 6 — ASD (mm), {setting}", "", "| method | ASD_1 | ASD_100 | HD95_1 | HD95_100 |",
                  "|---|---|---|---|---|"]
        for method in learned:
            lines.append(f"| {NAMES[method]} | " + " | ".join(
                _mean_std(_at_step(rows, method, setting, s, k)) for k in ("asd", "hd95") for s in (1, 100)) + " |")
        lines.append("")
        if "maml" in learned:
            targets = {r["shape"]: r["dice"] for r in _select(rows, method="maml", setting=setting, steps=1)}
            lines += [f"## Table 1 — steps and seconds to reach our 1-step Dice, {setting}", "",
                      "| method | steps to DSC_1 | seconds |", "|---|---|---|"]
            for method in learned:
                steps, seconds = _reach(rows, method, setting, targets)
                lines.append(f"| {NAMES[method]} | {_format_reach(steps)} | {_format_reach(seconds, ' s')} |")
            lines.append("")

    other = [s for s in settings if s in config["evaluate"]["trajectory_settings"] and s != "sagittal:8"]
    if other and learned:
        lines += ["## Table 3 — other inputs (Dice after 1 and 100 steps)", "",
                  "| method | " + " | ".join(f"{s} DSC_1 | {s} DSC_100" for s in other) + " |",
                  "|---" * (1 + 2 * len(other)) + "|"]
        for method in learned:
            lines.append(f"| {NAMES[method]} | " + " | ".join(
                f"{_mean_std(_at_step(rows, method, s, 1))} | {_mean_std(_at_step(rows, method, s, 100))}" for s in other) + " |")
        lines.append("")
    if transfer_rows:
        lines += ["## Table 4 — transfer (prior of this anatomy on other anatomies, sagittal:8)", "",
                  "| target | method | DSC_1 | DSC_100 |", "|---|---|---|---|"]
        for target in sorted({r["target"] for r in transfer_rows}):
            for method in learned:
                subset = _select(transfer_rows, target=target)
                if _select(subset, method=method):
                    lines.append(f"| {target} | {NAMES[method]} | {_mean_std(_at_step(subset, method, 'sagittal:8', 1))}"
                                 f" | {_mean_std(_at_step(subset, method, 'sagittal:8', 100))} |")
                    summary.setdefault("transfer", {})[f"{target}/{method}"] = {
                        "dice_1": float(np.mean(_at_step(subset, method, "sagittal:8", 1))),
                        "dice_100": float(np.mean(_at_step(subset, method, "sagittal:8", 100)))}
        lines.append("")
    # the plot goes into its temporary folder under its own name (dice_time.png)
    plot = plot_dice_time(rows, os.path.dirname(temporary["dice_time.png"]),
                          [s for s in settings if s.startswith("sagittal")][:1] or settings[:1])
    if plot:
        written.append("dice_time.png")
        lines += [f"![Dice against reconstruction time]({os.path.basename(plot)})", ""]
    with open(temporary["results.md"], "w") as handle:
        handle.write("\n".join(lines))
    summary.update(test_shapes=len(shapes), evaluated=time.strftime("%Y-%m-%d"))
    if "maml" in methods:  # which prior these are the results of (export checks it)
        summary["prior"] = {"name": methods["maml"].name, "weights_sha256": methods["maml"].card.get("weights_sha256")}
    with open(temporary["summary.json"], "w") as handle:
        json.dump(summary, handle, indent=2)
    print("\n".join(lines))
    return written


def _carried_precision(rows: List[dict], reused: Sequence[str]) -> str:
    """How the carried-over SIREN rows computed, for their seconds; files without the column come
    from evaluations before the precision setting, which computed in float32."""
    found = sorted({r.get("precision") or "float32" for r in rows if r["method"] in reused and r["method"] != "autodecoder"})
    return f" (network in {' and '.join(found)})" if found else ""


def _earlier_command(reused_csv: str, config_path: Optional[str]) -> Optional[str]:
    """The command of the evaluation that measured the baselines of `reused_csv`, as its results.md
    (an evaluation folder) or RESULTS.md (published) beside it gives it, so the carried-over rows
    keep their provenance."""
    folder = os.path.dirname(os.path.abspath(reused_csv))
    for name in ("results.md", "RESULTS.md"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as handle:
            text = handle.read()
        for command in text.split("`")[1::2]:  # the quoted spans
            if command.startswith(f"python -m training evaluate --config {shlex.quote(str(config_path))} ") and \
                    ("--pretrain" in command or "--autodecoder" in command):
                return command
    return None


def _command_args(args) -> List[str]:
    """The command's arguments, one per item: `shlex.join` quotes them so the line pastes back."""
    parts = []
    for key in ("config", "prior", "pretrain", "autodecoder"):
        if getattr(args, key, None):
            parts += [f"--{key}", str(getattr(args, key))]
    for option, values in (("--set", getattr(args, "overrides", [])), ("--transfer", getattr(args, "transfer", []))):
        for value in values:
            parts += [option, value]
    for key in ("reuse", "reuse_transfer"):
        if getattr(args, key, None):
            parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    parts += ["--out", str(args.out)]
    return parts


def plot_dice_time(rows: List[dict], out: str, settings: Sequence[str]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not settings:
        return None
    setting = settings[0]
    figure, ax = plt.subplots(figsize=(6, 4))
    for method in ("maml", "pretrain", "autodecoder"):
        points = []
        for step in (1, 50, 100, "conv"):
            if step == "conv":
                subset = [r for r in _select(rows, method=method, setting=setting) if r["steps"] < 0]
            else:
                subset = _select(rows, method=method, setting=setting, steps=step)
            if subset:
                points.append((np.mean([r["seconds"] for r in subset]), np.mean([r["dice"] for r in subset]),
                               np.std([r["dice"] for r in subset])))
        if points:
            t, d, s = map(np.array, zip(*points))
            ax.plot(t, d, marker="o", label=NAMES[method])
            ax.fill_between(t, d - s, d + s, alpha=0.15)
    for method in ("fill_between_slices", "sdf_interpolation"):
        subset = _select(rows, method=method, setting=setting)
        if subset:
            ax.scatter([np.mean([r["seconds"] for r in subset])], [np.mean([r["dice"] for r in subset])],
                       marker="s", label=NAMES[method])
    ax.set_xscale("log")
    ax.set_xlabel("reconstruction time (s, CPU)")
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice against time, {setting} (steps 1, 50, 100, converged)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path = os.path.join(out, "dice_time.png")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
