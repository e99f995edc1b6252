"""Configuration: defaults, YAML files and `--set key.path=value` overrides.

The defaults are the settings known to work on these anatomies (see docs/TRAINING.md): the
paper's architecture and loss (7 x 128 SIREN, BCE + Dice + lambda/q ||theta||^2, lambda = 100,
5 inner steps), with Meta-SGD step sizes initialised at 0.01 and outer Adam at 1e-4, which train
far faster on a CPU than the paper's 1e-5 / 1e-5.
"""

import copy
import json
from typing import Any, Dict, List, Optional

DEFAULTS: Dict[str, Any] = {
    "name": "prior",
    "anatomy": "",
    "seed": 0,
    "device": "auto",
    "precision": "auto",             # network arithmetic at evaluation (`reconstruct`'s): auto,
                                     # float32 or bfloat16; meta-training has its own (maml.precision)
    "threads": 0,                    # CPU threads for torch (0: torch's default); 1 is most efficient
                                     # for these small matrices on a busy 2-core machine
    # what `export` writes into the model card (empty: not given)
    "dataset_name": "",
    "description": "",
    "license": "",
    "attribution": "",
    "training_note": "",
    "data": {
        "layout": "folder",          # kits19 | verse | msd | folder | synthetic
        "root": "",
        "labels": None,              # label values merged into the structure (None: every non-zero)
        "components": 1,             # connected structures per case kept as separate shapes
        "min_component_fraction": 0.1,
        "cache": "cache/prior",
        "spacing_mm": 1.0,
        "margin_mm": 16.0,           # cached crop = frame extent + 2 margins (the frame moves with the context)
        "split": {"test": 0.2, "val": 0.1, "folds": 5},
        "split_file": "",            # committed split file; written by prepare when absent
        "max_cases": 0,              # 0: all (smoke runs use a handful)
        "synthetic": {"count": 64, "seed": None},  # layout synthetic: shapes drawn (seed None: the config's)
    },
    "frame": {"extent_mm": 128.0},
    "model": {"hidden_features": 128, "linear_layers": 7, "omega_0": 30.0},
    "loss": {"weight_decay": 100.0},
    "tasks": {
        "context_points": 2048,
        "target_points": 2048,
        "target_mix": {"uniform": 0.4, "foreground": 0.3, "boundary": 0.3},
        "boundary_mm": 2.0,
        "mirror": False,             # left/right mirroring as augmentation
        # observed-plane configurations drawn per task, with weights
        "planes": [
            {"weight": 0.5, "kind": "parallel", "axes": ["sagittal"], "steps": [8]},
            {"weight": 0.2, "kind": "parallel", "axes": ["sagittal", "coronal", "axial"], "steps": [8, 16]},
            {"weight": 0.15, "kind": "orthogonal"},
            {"weight": 0.15, "kind": "two_orientations", "planes_per_axis": [2, 4]},
        ],
        "drop_empty_planes": 0.5,    # share of tasks that see only the drawn planes (as `--slices auto`)
    },
    "maml": {
        "inner_steps": 5,
        "inner_lr": 0.01,
        "learn_inner_lr": True,
        "first_step_lr": False,       # the first inner step learns step sizes of its own
        "first_step_lr_init": 1.0,    # ... starting from the shared ones times this
        "first_order_iterations": 0,  # a cheaper first-order phase before second order
        "multi_step_loss": True,      # also train the result after each inner step (good 1-step priors)
        "first_step_loss_weight": 1.0,  # with multi_step_loss: the first step's loss counts this many times a later one's
        "freeze_weights": False,      # theta_0 kept as it is (maml.init's): only the step sizes learn
        "outer_lr": 1.0e-4,
        "warmup_iterations": 0,       # outer_lr ramped up over a run's first iterations (continuing a prior)
        "meta_batch": 4,
        "iterations": 3000,
        "grad_clip": 1.0,
        "init": "",                   # start from this prior file instead of a SIREN initialisation
        "precision": "auto",          # the network's later layers in the inner and outer loop, as
                                      # `reconstruct` resolves it: bfloat16 on a CPU with native bfloat16
                                      # (~1.4x the iterations per hour at the same Dice), else float32
    },
    "pretrain": {"lr": 1.0e-4, "batch_shapes": 4, "iterations": 3000},
    "autodecoder": {
        "latent_size": 128, "hidden_features": 128, "layers": 8, "lr": 5.0e-4, "latent_lr": 1.0e-3,
        "latent_prior": 1.0e-4, "iterations": 3000, "batch_shapes": 8,
        "test_lr": 1.0e-2,
    },
    # reconstruction-time settings written into the prior's model card; context_sampling is
    # also how meta-training draws its context (uniform, or balanced: half foreground);
    # first_step_scale lengthens the first inner step, fresh_context gives every later step a new
    # draw of context points, later_context_points of them (null: context_points); all chosen
    # after training with `tune`; interpolation_weight weighs shape-based interpolation between
    # parallel drawn planes into the output (0: the network alone; validation measures the network),
    # at 8 mm plane gaps, times (8 mm / gap)^interpolation_gap_power at others, along
    # interpolation_curve between the planes (cubic: monotone, through every plane; or linear);
    # logit_offset is added to the adapted network's logits before the threshold (negative: the
    # boundary moves in; the targets of tasks.target_mix over-represent the structure)
    # meta_steps: the steps with learned sizes (null: as many as the run's maml.inner_steps);
    # auto: the Adam steps after them (lr) and when `--steps auto` stops (patience, max_steps)
    "adaptation": {"steps": 5, "context_points": 8192, "context_sampling": "uniform", "fresh_context": False,
                   "later_context_points": None, "first_step_scale": 1.0, "interpolation_weight": 0.0,
                   "interpolation_gap_power": 4.0, "interpolation_curve": "cubic", "logit_offset": 0.0,
                   "meta_steps": None, "auto": {"lr": 1e-4, "patience": 10, "max_steps": 1000}},
    "validation": {"every": 250, "cases": 12, "slices": "sagittal:8"},
    "checkpoint": {"every": 100},
    "evaluate": {
        "methods": ["maml", "pretrain", "autodecoder", "fill_between_slices", "sdf_interpolation"],
        "settings": ["sagittal:8", "sagittal:16", "coronal:8", "coronal:16", "axial:8", "axial:16", "orthogonal",
                     "two_orientations"],
        # settings with the paper's whole protocol (1/50/100 steps, convergence, B.(i) and B.(ii));
        # the others compare ours (1 and default steps) with the classic tools
        "trajectory_settings": ["sagittal:8", "sagittal:16"],
        "steps": [1, 50, 100],
        "converge": {"patience": 10, "max_steps": 300},
        "cases": 20,                  # test shapes evaluated (0: all)
        "transfer_cases": 6,          # shapes of each other anatomy in the transfer table
    },
}


PRECISIONS = ("auto", "float32", "bfloat16")  # `reconstruct`'s, without importing the engine here


def deep_update(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        import yaml

        return yaml.safe_load(text)


# settings whose value is one number or a list of them (one per axis), beside the default's number
NUMBER_OR_LIST = {"frame.extent_mm"}
# counts that must be at least this (a 0 divides by zero or trains nothing; validation.every 0: never)
MINIMUM = {"maml.iterations": 1, "maml.meta_batch": 1, "maml.inner_steps": 1, "pretrain.iterations": 1,
           "pretrain.batch_shapes": 1, "autodecoder.iterations": 1, "autodecoder.batch_shapes": 1,
           "checkpoint.every": 1, "validation.every": 0}


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Dict[str, Any]:
    """DEFAULTS, updated by the YAML file, updated by `key.path=value` overrides; unknown keys,
    values of the wrong type and impossible counts are refused before anything runs."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        import yaml

        with open(path) as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{path}: expected a mapping of settings (key: value), not a {type(loaded).__name__}")
        deep_update(config, loaded)
    for override in overrides or []:
        if "=" not in override:
            raise SystemExit(f"--set {override!r}: expected key.path=value")
        key, text = override.split("=", 1)
        node, default = config, DEFAULTS
        parts = key.split(".")
        for index, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {override!r}: {'.'.join(parts[:index + 1])} is a single value, "
                                 "not a section")
            default = default.get(part) if isinstance(default, dict) else None
        value = parse_value(text)
        if isinstance(default, dict) and isinstance(default.get(parts[-1]), str) and value is not None \
                and not isinstance(value, str):
            value = text  # a name or path that reads as a number or is empty stays the text given
        if value is None and isinstance(default, dict) and isinstance(default.get(parts[-1]), str):
            value = ""  # null for a name or path: none, as the default
        node[parts[-1]] = value
    check_config(config, DEFAULTS)
    for key, value in (("precision", config["precision"]), ("maml.precision", config["maml"]["precision"])):
        if str(value).lower() not in PRECISIONS:  # refused before any long run starts
            raise SystemExit(f"{key} {value!r}: expected {', '.join(PRECISIONS)}")
    for key, least in MINIMUM.items():
        section, name = key.split(".")
        if config[section][name] < least:
            raise SystemExit(f"{key} {config[section][name]!r}: expected a count >= {least}")
    check_values(config)
    return config


PLANE_KINDS = ("parallel", "orthogonal", "two_orientations")  # TaskSampler.planes
AXES = ("sagittal", "coronal", "axial", "i", "j", "k")


def check_values(config: Dict[str, Any]) -> None:
    """Values whose type is right but which no run could use, refused before any work (and
    before a run folder is made)."""
    extent = config["frame"]["extent_mm"]
    if not all(_is_number(e) and e > 0 for e in (extent if isinstance(extent, list) else [extent])):
        raise SystemExit(f"frame.extent_mm {extent!r}: expected a size in mm > 0 (or three)")
    data = config["data"]
    if not data["spacing_mm"] > 0 or data["margin_mm"] < 0:
        raise SystemExit(f"data.spacing_mm {data['spacing_mm']!r} / data.margin_mm {data['margin_mm']!r}: expected "
                         "a spacing > 0 and a margin >= 0")
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(v, int) and not isinstance(v, bool) and v != 0 for v in labels)):
        raise SystemExit(f"data.labels {labels!r}: expected a list of non-zero label values, e.g. [1, 2] "
                         "(or null: every non-zero voxel)")
    split = data["split"]
    if not (0 <= split["test"] < 1 and 0 <= split["val"] < 1 and split["test"] + split["val"] < 1):
        raise SystemExit(f"data.split test {split['test']!r} and val {split['val']!r}: expected fractions of the "
                         "cases in [0, 1) that leave some for training")
    planes = config["tasks"]["planes"]
    if not isinstance(planes, list) or not planes:
        raise SystemExit(f"tasks.planes {planes!r}: expected a list of plane configurations, "
                         'e.g. [{"weight": 1, "kind": "parallel", "axes": ["sagittal"], "steps": [8]}]')
    for entry in planes:
        if not isinstance(entry, dict) or entry.get("kind") not in PLANE_KINDS:
            kind = entry.get("kind") if isinstance(entry, dict) else entry
            raise SystemExit(f"tasks.planes: kind {kind!r}: expected one of {', '.join(PLANE_KINDS)}")
        if not _is_number(entry.get("weight")) or entry["weight"] <= 0:
            raise SystemExit(f"tasks.planes ({entry['kind']}): weight {entry.get('weight')!r}: expected a number > 0")
        if entry["kind"] == "parallel":
            axes, steps = entry.get("axes"), entry.get("steps")
            if not isinstance(axes, list) or not axes or not all(a in AXES for a in axes):
                raise SystemExit(f"tasks.planes (parallel): axes {axes!r}: expected a list of {', '.join(AXES)}")
            if not isinstance(steps, list) or not steps or not all(_is_number(s) and s > 0 for s in steps):
                raise SystemExit(f"tasks.planes (parallel): steps {steps!r}: expected a list of plane gaps in mm > 0")


def check_config(config: Dict[str, Any], defaults: Dict[str, Any], prefix: str = "") -> None:
    """Every key one of the defaults' (within sections whose default is a dict of settings),
    every value of its default's type (a number, bool or string; None and lists: anything)."""
    import difflib

    for key, value in config.items():
        name = prefix + str(key)
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=3)
            hint = (f"did you mean {' or '.join(prefix + c for c in close)}?" if close
                    else f"expected one of {', '.join(map(str, defaults))}")
            raise SystemExit(f"unknown config key {name!r}: {hint}")
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise SystemExit(f"{name} {value!r}: expected a section of settings ({', '.join(default)})")
            check_config(value, default, name + ".")
        elif name in NUMBER_OR_LIST and isinstance(value, list):
            if not value or not all(_is_number(v) for v in value):
                raise SystemExit(f"{name} {value!r}: expected a number or a list of numbers")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise SystemExit(f"{name} {value!r}: expected true or false")
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise SystemExit(f"{name} {value!r}: expected a whole number")
        elif isinstance(default, float):
            if isinstance(value, str) and _is_number(_float_or_none(value)):
                config[key] = value = float(value)  # YAML reads 3e-5 (no decimal point) as text
            if not _is_number(value):
                raise SystemExit(f"{name} {value!r}: expected a number")
        elif isinstance(default, str) and not isinstance(value, str):
            raise SystemExit(f"{name} {value!r}: expected a string")


def _float_or_none(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_prior_matches_config(prior, config: dict, prior_path: str, use: str) -> None:
    """Refuse a prior that the config's network and frame could not have trained (`use`: what to
    do with it, e.g. "export it", "resume it"): a card takes its settings from the config, and a
    run continued in another frame would train on tasks drawn at another scale."""
    architecture, model = prior.model.architecture(), config["model"]
    for key in ("hidden_features", "linear_layers", "omega_0"):
        if float(architecture.get(key, -1)) != float(model[key]):
            raise SystemExit(f"{prior_path}: architecture {key} {architecture.get(key)} differs from the config's "
                             f"model.{key} {model[key]}: {use} with the config it was trained with")
    extent = config["frame"]["extent_mm"]
    extent = [float(e) for e in (extent if isinstance(extent, (list, tuple)) else [extent] * 3)]
    if [float(e) for e in prior.frame_spec.extent_mm] != extent:
        raise SystemExit(f"{prior_path}: frame extent_mm {list(prior.frame_spec.extent_mm)} differs from the config's "
                         f"frame.extent_mm {config['frame']['extent_mm']}: {use} with the config it was trained with")
