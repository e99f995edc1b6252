"""`tune`: validation Dice of a prior for each value of one reconstruction setting.

Reconstruction settings (the model card's `adaptation`: steps, context points, the first step's
scale, `auto.lr` (the Adam step of the steps after the meta-learned ones), ...) are chosen after
training, on the validation shapes, never on the test split. For each value this reconstructs
every validation shape from every input setting of `evaluate` (parallel planes, three
orthogonal planes, planes in two orientations) and prints Dice and ASD after the default steps,
Dice after one step, and the time of a reconstruction.
"""

import copy
from typing import Callable, List, Optional, Sequence

import numpy as np
from MetaShapeReconLib.prior import check_adaptation, load_prior

from .config import parse_value
from .data import load_shapes, load_split
from .evaluate import check_settings, evaluate_settings, evaluation_precision
from .maml import resolve_device


def parse_setting(text: str):
    """`NAME=V1,V2,...` -> (name, [values])."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if name.startswith("adaptation."):
        name = name[len("adaptation."):]
    if not sep or not name or not values.strip():
        raise SystemExit(f"--setting {text!r}: expected NAME=V1,V2,... (e.g. first_step_scale=1,1.4,1.7)")
    return name, [parse_value(v.strip()) for v in values.split(",") if v.strip()]


def validation_shapes(config: dict):
    shapes = load_shapes(config["data"]["cache"], load_split(config)["val"], limit=int(config["validation"]["cases"]))
    if not shapes:
        raise SystemExit("no validation shapes: check the cache and the split")
    return shapes


def tune(config: dict, prior_path: str, setting: str, shapes: Sequence,
         report: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """One row per value: the mean Dice and ASD after the default steps in every input setting of
    `evaluate.settings` (planes drawn as `evaluate` draws them, the same for every value), the Dice
    after one step from `validation.slices`, and the seconds of a reconstruction; `report`
    receives each row as soon as it is measured."""
    name, values = parse_setting(setting)
    settings = list(config["evaluate"]["settings"])
    check_settings(settings)
    if config["validation"]["slices"] not in settings:
        raise SystemExit(f"validation.slices {config['validation']['slices']!r} is not one of evaluate.settings "
                         f"{settings}: the Dice after one step is measured there")
    plain = copy.deepcopy(config)
    plain["evaluate"]["trajectory_settings"] = []  # ours after 1 and the default steps only
    device = resolve_device(config["device"])
    prior = load_prior(prior_path).to(device, evaluation_precision(config, device))
    current = prior.adaptation
    names = [k for k in current if k != "auto"] + [f"auto.{k}" for k in current["auto"]]
    if name not in names:
        raise SystemExit(f"--setting {name!r} is not one of the prior's adaptation settings: {', '.join(names)}")
    in_auto = name.startswith("auto.")  # e.g. auto.lr: the Adam step of the steps after the meta-learned ones
    key = name[len("auto."):] if in_auto else name
    candidates = []  # every value checked before the first (long) evaluation starts
    for value in values:
        card = copy.deepcopy(prior.card)
        adaptation = card.setdefault("adaptation", {})
        if in_auto:
            adaptation["auto"] = dict(adaptation.get("auto") or {}, **{key: value})
        else:
            adaptation[key] = value
        try:
            check_adaptation(card)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--setting {name}={value!r}: {error}") from None
        candidates.append((value, prior.with_card(card)))
    rows = []
    for value, candidate in candidates:
        results = evaluate_settings(shapes, settings, {"maml": candidate}, plain, device, f"{name}={value}")
        default = candidate.default_steps
        rows.append({
            "value": value, "default_steps": default,
            "dice_1_step": _mean(results, "dice", config["validation"]["slices"], 1),
            "settings": {s: {"dice": _mean(results, "dice", s, default), "asd": _mean(results, "asd", s, default)}
                         for s in settings},
            "seconds": float(np.mean([r["seconds"] for r in _output_rows(results) if r["steps"] == default])),
        })
        if report is not None:
            report(rows[-1])
    return rows


def _output_rows(results: Sequence[dict]) -> List[dict]:
    """The rows of what `reconstruct` returns: with interpolation where the card weighs it in
    (at the default steps), else the network alone."""
    interpolated = {(r["shape"], r["setting"], r["steps"]) for r in results if r["method"] == "maml_interpolated"}
    return [r for r in results if r["method"] == "maml_interpolated"
            or (r["method"] == "maml" and (r["shape"], r["setting"], r["steps"]) not in interpolated)]


def _mean(results: Sequence[dict], key: str, setting: str, steps: int) -> float:
    return float(np.mean([r[key] for r in _output_rows(results) if r["setting"] == setting and r["steps"] == steps]))


def header(name: str, shapes: int, config: dict) -> str:
    settings = list(config["evaluate"]["settings"])
    return "\n".join([
        f"{shapes} validation shapes; Dice / ASD (mm) after the default steps, Dice after 1 step from "
        f"{config['validation']['slices']}, seconds of one reconstruction on the shape's crop",
        f"| {name} | steps | 1 step | " + " | ".join(settings) + " | seconds |",
        "|---" * (len(settings) + 4) + "|"])


def format_row(row: dict) -> str:
    cells = [f"{v['dice']:.4f} / {v['asd']:.2f}" for v in row["settings"].values()]
    return (f"| {row['value']} | {row['default_steps']} | {row['dice_1_step']:.4f} | " + " | ".join(cells)
            + f" | {row['seconds']:.2f} |")
