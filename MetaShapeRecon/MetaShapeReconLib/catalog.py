"""Finding priors and reading their model cards without importing torch, so the Slicer
module's UI can list them before PyTorch is loaded (or installed)."""

import json
import os
from typing import Dict, List

from .errors import InputError

FORMAT = "metashaperecon-prior"
PRIORS_ENV = "METASHAPERECON_PRIORS"


def bundled_prior_dirs() -> List[str]:
    """Where priors are looked up by name: $METASHAPERECON_PRIORS, then the bundled folders
    (the source tree's Resources/Priors, and the module's Resources/Priors inside Slicer)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.environ.get(PRIORS_ENV, ""),
                  os.path.join(here, "..", "..", "Resources", "Priors"),
                  os.path.join(here, "..", "Resources", "Priors")]
    return [os.path.normpath(c) for c in candidates if c and os.path.isdir(c)]


def list_bundled_priors() -> Dict[str, str]:
    """{name: safetensors path} of every prior found by name (first folder wins)."""
    found: Dict[str, str] = {}
    for folder in bundled_prior_dirs():
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".safetensors") and os.path.isfile(os.path.join(folder, entry[:-12] + ".json")):
                found.setdefault(entry[:-12], os.path.join(folder, entry))
    return found


def prior_card(path: str) -> dict:
    """The model card beside a prior file (.safetensors or its .json).
    Raises InputError when it is missing or not a MetaShapeRecon model card."""
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    stem = stem[:-len(".json")] if stem.endswith(".json") else stem
    for suffix in (".safetensors", ".json"):
        if not os.path.isfile(stem + suffix):
            raise InputError(f"prior file not found: {stem + suffix}")
    try:
        with open(stem + ".json", encoding="utf-8") as handle:
            card = json.load(handle)
    except (OSError, ValueError) as error:
        raise InputError(f"prior model card {stem}.json cannot be read ({error})") from None
    except RecursionError:
        raise InputError(f"{stem}.json is not a MetaShapeRecon model card (nested too deeply)") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise InputError(f"{stem}.json is not a MetaShapeRecon model card")
    return card
