"""`export`: a trained prior -> `NAME.safetensors` + `NAME.json` for the engine and Slicer.

The model card gathers what a user of the prior needs to know: architecture, frame, inner-loop
settings, what it was trained on (with licence and attribution), its split, its training cost and
its measured results.
"""

import json
import os
from typing import Optional

from MetaShapeReconLib.prior import load_prior, save_prior

from .data import load_split
from .maml import card_meta_steps, meta_training_settings


def export_prior(config: dict, prior_path: str, name: str, results_dir: Optional[str] = None,
                 out_dir: str = "Resources/Priors") -> str:
    prior = load_prior(prior_path)
    card = prior.card
    card["name"] = name
    card["anatomy"] = config.get("anatomy") or card.get("anatomy", "")
    card["description"] = config.get("description", card.get("description", ""))
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
                              logit_offset=float(config["adaptation"].get("logit_offset") or 0.0),
                              context_sampling=card["meta_training"].get("context_sampling", "uniform"))
    card["license"] = config.get("license", card.get("license", ""))
    card["attribution"] = config.get("attribution", card.get("attribution", ""))
    try:
        split = load_split(config)
        split_file = config["data"].get("split_file") or "split.json"
        card["training_data"] = {
            "dataset": config.get("dataset_name", config["data"]["layout"]),
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
    if results_dir:
        summary = os.path.join(results_dir, "summary.json")
        if os.path.isfile(summary):
            with open(summary) as handle:
                card["results"] = json.load(handle)
    os.makedirs(out_dir, exist_ok=True)
    return save_prior(prior, os.path.join(out_dir, name))
