"""Prior files: `NAME.safetensors` (tensors) + `NAME.json` (model card).

The safetensors file holds the initial weights under `weights.<parameter>` and, for priors with
learned inner-loop step sizes (Meta-SGD), one step size per weight under `inner_lr.<parameter>`;
priors meta-trained with step sizes of the first inner step's own hold those under
`first_step_lr.<parameter>`.
The model card holds everything else; see `docs/PRIOR_FORMAT.md`. Loading never runs code
from the file.
"""

import copy
import hashlib
import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Optional

import numpy as np
import torch

from .adaptation import CONTEXT_SAMPLING, Context, Step, adaptation_steps, draw_context
from .baselines import INTERPOLATION_CURVES
from .catalog import FORMAT, PRIORS_ENV, bundled_prior_dirs, list_bundled_priors  # noqa: F401 (re-exported)
from .errors import InputError
from .frame import FrameSpec
from .labelmap_io import atomic_output
from .occupancy import OccupancyNetwork
from .siren import Siren

FORMAT_VERSION = 1
WEIGHTS = "weights."
INNER_LR = "inner_lr."
FIRST_STEP_LR = "first_step_lr."

DEFAULT_ADAPTATION = {
    "steps": 5,
    "context_points": 8192,
    "weight_decay": 100.0,
    "context_sampling": "uniform",
    "first_step_scale": 1.0,
    "fresh_context": False,
    "later_context_points": None,  # fresh_context only: the points of each step after the first (None: context_points)
    "interpolation_weight": 0.0,  # logits per mm of shape-based interpolation at 8 mm plane gaps (pipeline.py)
    "interpolation_gap_power": 4.0,  # ... times (8 mm / gap)^this at other gaps
    # between the planes: "cubic" (monotone) or "linear"; cards from before the choice were made with linear
    "interpolation_curve": "linear",
    "logit_offset": 0.0,  # added to the adapted network's logits before the 0.5 threshold (occupancy.py)
    "auto": {"optimizer": "adam", "lr": 1e-4, "patience": 10, "max_steps": 1000},
}


def merged_adaptation(card: Mapping) -> dict:
    """The model card's adaptation settings over the defaults."""
    merged = copy.deepcopy(DEFAULT_ADAPTATION)
    settings = card.get("adaptation") or {}
    merged.update({k: v for k, v in settings.items() if k != "auto"})
    merged["auto"].update(settings.get("auto") or {})
    if "meta_steps" not in merged:  # cards from before meta_steps: the steps meta-training unrolled
        meta_training = card.get("meta_training") if isinstance(card.get("meta_training"), dict) else {}
        merged["meta_steps"] = meta_training.get("inner_steps", merged["steps"])
    return merged


def check_adaptation(card: Mapping) -> None:
    """Raise ValueError/TypeError unless the card's adaptation settings are usable numbers."""
    settings = card.get("adaptation", {})
    if not isinstance(settings, dict) or not isinstance(settings.get("auto", {}), dict):
        raise ValueError("adaptation must be a JSON object")
    merged = merged_adaptation(card)
    auto = merged["auto"]
    checks = [("steps", merged["steps"], int, 0), ("meta_steps", merged["meta_steps"], int, 0),
              ("context_points", merged["context_points"], int, 1),
              ("weight_decay", merged["weight_decay"], float, 0.0), ("auto.lr", auto["lr"], float, 0.0),
              ("auto.patience", auto["patience"], int, 1), ("auto.max_steps", auto["max_steps"], int, 0),
              ("first_step_scale", merged["first_step_scale"], float, 0.0),
              ("interpolation_weight", merged["interpolation_weight"], float, 0.0),
              ("interpolation_gap_power", merged["interpolation_gap_power"], float, 0.0)]
    if "inner_lr" in merged:
        checks.append(("inner_lr", merged["inner_lr"], float, 0.0))
    if not isinstance(merged["fresh_context"], bool):
        raise ValueError(f"adaptation.fresh_context = {merged['fresh_context']!r} is not true or false")
    if merged["later_context_points"] is not None:
        checks.append(("later_context_points", merged["later_context_points"], int, 1))
        if not merged["fresh_context"]:
            raise ValueError("adaptation.later_context_points needs fresh_context: true (the later steps' own "
                             "draws); without it every step fits the first draw")
    if merged["interpolation_curve"] not in INTERPOLATION_CURVES:
        raise ValueError(f"adaptation.interpolation_curve = {merged['interpolation_curve']!r} is not one of "
                         f"{', '.join(INTERPOLATION_CURVES)}")
    if merged["context_sampling"] not in CONTEXT_SAMPLING:
        raise ValueError(f"adaptation.context_sampling = {merged['context_sampling']!r} is not one of "
                         f"{', '.join(CONTEXT_SAMPLING)}")
    for name, value, kind, lowest in checks:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and value != int(value)) or value < lowest:
            raise ValueError(f"adaptation.{name} = {value!r} is not a {'whole ' if kind is int else ''}"
                             f"number >= {lowest}")
    offset = merged["logit_offset"]
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise ValueError(f"adaptation.logit_offset = {offset!r} is not a finite number")
    if merged["first_step_scale"] == 0:
        raise ValueError("adaptation.first_step_scale = 0 would make the first step do nothing: expected a number > 0")


@dataclass
class Prior:
    """A shape prior: the network's initial weights, its inner-loop step sizes and its model card.
    `first_step_lr`: the first inner step's own step sizes, if meta-training learned them (None:
    the first step takes `inner_lr` like the others). `precision`: the dtype its adaptation
    computes the network's later layers in (`Siren.forward`; set by `to`)."""

    model: Siren
    params: Dict[str, torch.Tensor]
    inner_lr: Dict[str, torch.Tensor]
    card: dict
    path: Optional[str] = field(default=None)
    first_step_lr: Optional[Dict[str, torch.Tensor]] = field(default=None)
    precision: torch.dtype = field(default=torch.float32)

    @property
    def name(self) -> str:
        return str(self.card.get("name", "unnamed"))

    @property
    def frame_spec(self) -> FrameSpec:
        return FrameSpec.from_metadata(self.card["frame"])

    @property
    def adaptation(self) -> dict:
        return merged_adaptation(self.card)

    @property
    def default_steps(self) -> int:
        return int(self.adaptation["steps"])

    @property
    def meta_steps(self) -> int:
        """How many steps take the meta-learned step sizes; Adam takes the later ones."""
        return int(self.adaptation["meta_steps"])

    @property
    def first_step_scale(self) -> float:
        return float(self.adaptation["first_step_scale"])

    @property
    def logit_offset(self) -> float:
        """Added to the adapted network's logits before thresholding (`OccupancyNetwork`)."""
        return float(self.adaptation["logit_offset"])

    def network(self, params: Mapping[str, torch.Tensor], device="cpu") -> OccupancyNetwork:
        """The adapted weights `params` as an occupancy network, in this prior's precision and with
        its card's logit offset: how reconstruction and evaluation threshold the network."""
        return OccupancyNetwork(params, self.model.omega_0, device, precision=self.precision,
                                logit_offset=self.logit_offset)

    def first_step_sizes(self) -> Dict[str, torch.Tensor]:
        """The step sizes of the first inner step: its own (or the shared ones) times the card's
        first_step_scale."""
        sizes = self.first_step_lr if self.first_step_lr is not None else self.inner_lr
        scale = self.first_step_scale
        return dict(sizes) if scale == 1.0 else {k: v * scale for k, v in sizes.items()}

    def context(self, coords: np.ndarray, labels: np.ndarray, seed: int = 0, device="cpu") -> Context:
        """The context points of an adaptation, drawn from the observed voxels (canonical
        coordinates, labels) as the card says: how many, how, and whether each step draws afresh."""
        settings = self.adaptation
        return draw_context(coords, labels, int(settings["context_points"]), settings["context_sampling"],
                            bool(settings["fresh_context"]), seed, device, settings["later_context_points"])

    def adaptation_steps(self, context: Context, meta_steps: Optional[int] = None,
                         adam_lr: Optional[float] = None) -> Iterator[Step]:
        """This prior's adaptation to `context` (`Prior.context`), one step at a time (see
        `adaptation.adaptation_steps`), with the card's settings unless `meta_steps` or `adam_lr`
        are given (the pre-trained baseline: Adam at its own rate from the first step)."""
        settings = self.adaptation
        return adaptation_steps(self.model, self.params, self.inner_lr, context.coords, context.target,
                                float(settings["weight_decay"]), self.meta_steps if meta_steps is None else meta_steps,
                                float(settings["auto"]["lr"]) if adam_lr is None else adam_lr,
                                self.first_step_sizes(), context.redraw, self.precision)

    def with_card(self, card: dict) -> "Prior":
        """The same tensors under another model card (e.g. other adaptation settings)."""
        return Prior(self.model, self.params, self.inner_lr, card, self.path, self.first_step_lr, self.precision)

    def to(self, device, precision: Optional[torch.dtype] = None) -> "Prior":
        """This prior on `device`, adapting in `precision` (default: unchanged)."""
        first = None if self.first_step_lr is None else {k: v.to(device) for k, v in self.first_step_lr.items()}
        return Prior(self.model.to(device), {k: v.to(device) for k, v in self.params.items()},
                     {k: v.to(device) for k, v in self.inner_lr.items()}, self.card, self.path, first,
                     self.precision if precision is None else precision)


def initial_prior(name: str, extent_mm, omega_0: float = 30.0, hidden_features: int = 128,
                  linear_layers: int = 7, inner_lr: float = 0.01, seed: int = 0,
                  adaptation: Optional[Mapping] = None, **card_fields) -> Prior:
    """A SIREN-initialised, untrained prior: the starting point of training (and of tests that
    fit a network themselves). Never ship one of these as an anatomy prior."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Siren(hidden_features=hidden_features, linear_layers=linear_layers, omega_0=omega_0)
    finally:
        torch.random.set_rng_state(generator_state)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    lrs = {k: torch.full_like(v, inner_lr) for k, v in params.items()}
    extent = extent_mm if isinstance(extent_mm, (list, tuple)) else [extent_mm] * 3
    card = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
            "architecture": model.architecture(),
            "frame": FrameSpec(tuple(float(e) for e in extent)).to_metadata(),
            "adaptation": dict(copy.deepcopy(DEFAULT_ADAPTATION), **(adaptation or {}))}
    card.update(card_fields)
    return Prior(model, params, lrs, card)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safetensors_bytes(tensors: Dict[str, torch.Tensor]) -> bytes:
    """The safetensors file of `tensors`, byte for byte the same for the same tensors: the
    library writes its metadata entries in a random order, which would give every save of the
    same prior another checksum. Reordered in place, the header keeps its length."""
    from safetensors.torch import save

    data = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    if len(text) != length:  # a library that writes its header otherwise: keep its bytes
        return data
    return data[:8] + text + data[8 + length:]


def save_prior(prior: Prior, path: str) -> str:
    """Write `path` (.safetensors, or a stem) and the model card beside it; returns the card path.
    Both land together or neither does (an interrupted checkpoint keeps the earlier pair)."""
    stem = path[:-len(".safetensors")] if path.endswith(".safetensors") else path
    tensors = {WEIGHTS + k: v.detach().float().cpu().contiguous() for k, v in prior.params.items()}
    tensors.update({INNER_LR + k: v.detach().float().cpu().contiguous() for k, v in prior.inner_lr.items()})
    tensors.update({FIRST_STEP_LR + k: v.detach().float().cpu().contiguous()
                    for k, v in (prior.first_step_lr or {}).items()})
    data = _safetensors_bytes(tensors)
    card = dict(prior.card)
    card["format"], card["format_version"] = FORMAT, FORMAT_VERSION
    card["architecture"] = prior.model.architecture()
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()
    with ExitStack() as outputs:
        for suffix, content in ((".safetensors", data), (".json", (json.dumps(card, indent=2) + "\n").encode())):
            with open(outputs.enter_context(atomic_output(stem + suffix)), "wb") as handle:
                handle.write(content)
    return stem + ".json"


def resolve_prior_path(name_or_path: str) -> str:
    """The .safetensors file of a prior. A bare name is a prior found by name ($METASHAPERECON_PRIORS,
    then the bundled ones), never a file in the current folder; a value with a path separator or
    ending in .safetensors or .json is a file."""
    separators = [os.path.sep] + ([os.path.altsep] if os.path.altsep else [])
    if any(sep in name_or_path for sep in separators) or name_or_path.endswith((".safetensors", ".json")):
        candidate = name_or_path
        for suffix in (".safetensors", ".json"):
            if candidate.endswith(suffix):
                candidate = candidate[:-len(suffix)]
        return candidate + ".safetensors"
    available = list_bundled_priors()
    if name_or_path in available:
        return available[name_or_path]
    here = (f" (for the file in this folder, pass ./{name_or_path}.safetensors)"
            if os.path.isfile(name_or_path + ".safetensors") else "")
    if not available:
        raise InputError(f"prior {name_or_path!r} not found: no prior is bundled yet; pass a prior file "
                         f"with --prior PATH.safetensors (train one with `python -m training`){here}")
    raise InputError(f"prior {name_or_path!r} not found; bundled priors: {', '.join(sorted(available))}{here}")


def _check_card(card: dict, where: str) -> Siren:
    """The card's network, on the meta device (shapes, no storage), once the card is usable."""
    if card.get("format") != FORMAT:
        raise InputError(f"{where}: not a MetaShapeRecon model card (format {card.get('format')!r})")
    if card.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where}: prior format version {card.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    try:
        architecture = card["architecture"]
        if not isinstance(architecture, dict):
            raise ValueError("architecture must be a JSON object")
        if architecture.get("type") != "siren":
            raise ValueError(f"architecture type {architecture.get('type')!r}, expected 'siren'")
        sizes = {"hidden_features": (1, 8192), "linear_layers": (2, 64), "in_features": (3, 3)}
        for key, (lowest, highest) in sizes.items():
            value = architecture.get(key, 3) if key == "in_features" else architecture[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
                raise ValueError(f"architecture {key} = {value!r}, expected a whole number in [{lowest}, {highest}]")
        omega_0 = architecture["omega_0"]
        if isinstance(omega_0, bool) or not isinstance(omega_0, (int, float)) or not 0 < omega_0 < 1e6:
            raise ValueError(f"architecture omega_0 = {omega_0!r}, expected a positive number")
        with torch.device("meta"):  # its shapes only: a card may not make us allocate before the file is checked
            model = Siren.from_architecture(architecture)
        if not isinstance(card["frame"], dict):
            raise ValueError("frame must be a JSON object")
        FrameSpec.from_metadata(card["frame"])
        check_adaptation(card)
    except KeyError as error:
        raise InputError(f"{where}: incompatible model card (no {error} entry)") from None
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: incompatible model card ({error})") from None
    return model


def load_prior(name_or_path: str = "kidney", device="cpu") -> Prior:
    """Load and validate a prior by bundled name or file path."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    tensor_path = resolve_prior_path(name_or_path)
    card_path = tensor_path[:-len(".safetensors")] + ".json"
    if not os.path.isfile(tensor_path):
        raise InputError(f"prior file not found: {tensor_path}")
    if not os.path.isfile(card_path):
        raise InputError(f"prior model card not found: {card_path} (a prior is NAME.safetensors with its "
                         "NAME.json beside it)")
    try:
        with open(card_path) as handle:
            card = json.load(handle)
        if not isinstance(card, dict):
            raise ValueError("not a JSON object")
    except OSError as error:
        raise InputError(f"cannot read prior model card {card_path}: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"prior model card {card_path} is not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(f"prior model card {card_path} is not a model card (nested too deeply)") from None
    shapes = {k: tuple(v.shape) for k, v in _check_card(card, card_path).named_parameters()}
    try:
        with open(tensor_path, "rb"):  # a permission problem is not a corrupt file
            pass
        expected_hash = card.get("weights_sha256")
        if expected_hash and expected_hash != _sha256(tensor_path):
            raise InputError(f"prior {tensor_path} is corrupt: its checksum does not match the model card")
    except OSError as error:
        raise InputError(f"cannot read prior {tensor_path}: {error.strerror or error}") from None
    try:
        with safe_open(tensor_path, framework="pt") as handle:  # the header alone: names and shapes
            stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"prior {tensor_path} is corrupt or not a safetensors file ({error})") from None
    for name, shape in shapes.items():
        if WEIGHTS + name not in stored:
            raise InputError(f"prior {tensor_path} does not match its architecture: tensor {WEIGHTS}{name} "
                             "is missing")
        for prefix in (WEIGHTS, INNER_LR, FIRST_STEP_LR):
            if prefix + name in stored and stored[prefix + name] != shape:
                what = " does not match its architecture:" if prefix == WEIGHTS else ":"
                raise InputError(f"prior {tensor_path}{what} {prefix}{name} has shape {stored[prefix + name]}, "
                                 f"expected {shape}")
    first_names = [k for k in shapes if FIRST_STEP_LR + k in stored]
    if first_names and len(first_names) != len(shapes):
        missing = sorted(FIRST_STEP_LR + k for k in shapes if k not in first_names)
        raise InputError(f"prior {tensor_path} holds the first step's step sizes of some weights only "
                         f"({', '.join(missing)} missing)")
    known = {prefix + k for k in shapes for prefix in (WEIGHTS, INNER_LR, FIRST_STEP_LR)}
    unexpected = set(stored) - known
    if unexpected:
        raise InputError(f"prior {tensor_path} has unexpected tensors: {', '.join(sorted(unexpected))}")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"prior {tensor_path} is corrupt or not a safetensors file ({error})") from None

    params, lrs, first = {}, {}, {}
    default_lr = float(merged_adaptation(card).get("inner_lr", 0.01))
    for name, shape in shapes.items():
        params[name] = tensors[WEIGHTS + name].float()
        lr = tensors.get(INNER_LR + name)
        lrs[name] = torch.full(shape, default_lr) if lr is None else lr.float()
        if name in first_names:
            first[name] = tensors[FIRST_STEP_LR + name].float()
    if not all(torch.isfinite(t).all() for t in list(params.values()) + list(lrs.values()) + list(first.values())):
        raise InputError(f"prior {tensor_path} holds non-finite values")
    model = Siren.from_architecture(card["architecture"])
    model.load_state_dict(params)
    model.requires_grad_(False)
    return Prior(model, params, lrs, card, tensor_path, first or None).to(device)
