"""`export`: a trained prior -> `NAME.safetensors` + `NAME.json` for the engine and Slicer.

The model card gathers what a user of the prior needs to know: architecture, frame, inner-loop
settings, what it was trained on (with licence and attribution), its split, its training cost and
its measured results.
"""

import os
from typing import Optional

from MetaShapeReconLib.prior import load_prior, save_prior

from .config import check_prior_matches_config
from .data import load_split
from .files import read_json
from .maml import card_meta_steps, meta_training_settings


def export_prior(config: dict, prior_path: str, name: str, results_dir: Optional[str] = None,
                 out_dir: str = "Resources/Priors") -> str:
    if not name or name != os.path.basename(name) or name.startswith("."):
        raise SystemExit(f"--name {name!r}: expected a plain file name such as kidney (the files go into --out)")
    prior = load_prior(prior_path)
    card = prior.card
    check_prior_matches_config(prior, config, prior_path, "export it")
    method = card.get("training", {}).get("method")
    if method != "maml":  # a B.(ii) network has no learned step sizes: the card's steps would lie
        raise SystemExit(f"{prior_path}: training.method is {method!r}; only meta-learned priors (maml) are exported")
    # the card says under which terms and from whose data it was trained: never blank, and never
    # an earlier card's (a run continued from another anatomy's prior inherits that card)
    missing = [key for key in ("license", "attribution") if not str(config.get(key) or "").strip()]
    if missing:
        raise SystemExit(f"the config has no {' and no '.join(missing)}: add the training data's "
                         f"{' and '.join(missing)} to it (top-level keys) before exporting")
    summary = os.path.join(results_dir, "summary.json") if results_dir else None
    if summary and not os.path.isfile(summary):
        raise SystemExit(f"--results {results_dir}: no summary.json there (an evaluation folder of "
                         "`python -m training evaluate`)")
    card["name"] = name
    card["anatomy"] = config.get("anatomy") or card.get("anatomy", "")
    card["description"] = config.get("description") or card.get("description", "")
    # the run's own settings (recorded by `train`); older priors: those of the config given here
    card["meta_training"] = card.get("training", {}).get("settings") or meta_training_settings(config)
    # reconstruction draws its context the way the prior was meta-trained, whatever this config says;
    # the steps with learned sizes as `train` sets them, from the inner steps the run recorded
    inner_steps = card["meta_training"].get("inner_steps", config["maml"]["inner_steps"])
    card["adaptation"].update(steps=int(config["adaptation"]["steps"]), meta_steps=card_meta_steps(config, inner_steps),
                              context_points=int(config["adaptation"]["context_points"]),
                              first_step_scale=float(config["adaptation"]["first_step_scale"]),
                              fresh_context=bool(config["adaptation"].get("fresh_context", False)),
                              later_context_points=config["adaptation"].get("later_context_points"),
                              interpolation_weight=float(config["adaptation"].get("interpolation_weight") or 0.0),
                              interpolation_gap_power=float(config["adaptation"]["interpolation_gap_power"]),
                              interpolation_curve=str(config["adaptation"]["interpolation_curve"]),
                              logit_offset=float(config["adaptation"].get("logit_offset") or 0.0),
                              auto=dict(card["adaptation"].get("auto") or {}, **config["adaptation"]["auto"]),
                              context_sampling=card["meta_training"].get("context_sampling", "uniform"))
    card["license"], card["attribution"] = str(config["license"]), str(config["attribution"])
    try:
        split = load_split(config)
        # the file load_split read, as the config gives it
        split_file = config["data"].get("split_file") or os.path.join(config["data"]["cache"], "split.json")
        card["training_data"] = {
            "dataset": config.get("dataset_name") or config["data"]["layout"],
            "layout": config["data"]["layout"], "labels": config["data"].get("labels"),
            "split_file": split_file, "cases": {k: len(split[k]) for k in ("train", "val", "test")},
            "canonical_spacing_mm": config["data"]["spacing_mm"], "mirroring": bool(config["tasks"].get("mirror")),
        }
    except SystemExit:
        pass
    training = card.setdefault("training", {})
    phases, earlier = [], training
    while isinstance(earlier, dict) and earlier:  # a run continued from an earlier prior (maml.init)
        phases.append(earlier)
        earlier = earlier.get("initialised_from")
    training["total"] = {"phases": len(phases),
                         "iterations": sum(int(p.get("iterations", 0)) for p in phases),
                         "hours": round(sum(float(p.get("seconds", 0)) for p in phases) / 3600, 2),
                         "device": training.get("device", "")}
    if config.get("training_note"):
        training["note"] = config["training_note"]
    if summary:
        card["results"] = read_json(summary, "evaluation summary", "run `python -m training evaluate` again")
        evaluated = (card["results"].get("prior") or {}).get("weights_sha256")
        if evaluated and evaluated != card.get("weights_sha256"):
            raise SystemExit(f"--results {results_dir}: an evaluation of another prior "
                             f"({card['results']['prior'].get('name')!r}, other weights than {prior_path}); "
                             "evaluate this prior and export it with that evaluation")
    os.makedirs(out_dir, exist_ok=True)
    return save_prior(prior, os.path.join(out_dir, name))
