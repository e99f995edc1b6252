"""Adapting a prior to the observed voxels of one case.

`inner_step` is the meta-training inner loop's step, used unchanged here: the same loss, the
same per-parameter step sizes. It is written with `torch.func` so training can `vmap` it over a
batch of tasks and differentiate through it.
"""

from typing import Callable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .errors import Cancelled
from .siren import Params, Siren, logits, reconstruction_loss

Progress = Callable[[int, int, Optional[float]], bool]


def report(progress: Optional[Progress], step: int, total: int, loss: Optional[float] = None) -> None:
    """Call a progress callback; a False answer cancels the work."""
    if progress is not None and progress(step, total, loss) is False:
        raise Cancelled("cancelled")


CONTEXT_SAMPLING = ("uniform", "balanced")


def choose_context(labels: np.ndarray, limit: int, rng=0, sampling: str = "uniform", exact: bool = False) -> np.ndarray:
    """Indices of the observed voxels an adaptation uses: at most `limit` of them, drawn without
    replacement (`exact`: exactly `limit`, repeating some when there are fewer, as meta-training
    batches need). `uniform`: every observed voxel alike; `balanced`: half from the foreground,
    half from the background, so a small structure keeps its share of the gradient. Training
    and reconstruction both draw here, each with the prior's setting. `rng`: a seed or Generator."""
    if sampling not in CONTEXT_SAMPLING:
        raise ValueError(f"unknown context sampling {sampling!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if sampling == "uniform":
        groups = [np.arange(len(labels))]
        wanted = [limit]
    else:
        foreground = np.flatnonzero(labels > 0.5)
        background = np.flatnonzero(labels <= 0.5)
        groups = [foreground, background]
        share = limit // 2 if len(foreground) and len(background) else (limit if len(foreground) else 0)
        wanted = [share, limit - share]
        if not exact:  # a short group leaves its share to the other
            wanted[0] = min(wanted[0], len(foreground))
            wanted[1] = min(limit - wanted[0], len(background))
            wanted[0] = min(limit - wanted[1], len(foreground))
    chosen = []
    for group, count in zip(groups, wanted):
        if count <= 0 or len(group) == 0:
            continue
        if len(group) <= count and not exact:
            chosen.append(group)
        else:
            chosen.append(rng.choice(group, size=count, replace=len(group) < count))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def inner_step(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
               coords: torch.Tensor, target: torch.Tensor, weight_decay: float,
               first_order: bool = False) -> Tuple[Params, torch.Tensor]:
    """One gradient step on the context points: theta - alpha * grad L(theta)."""

    def loss_of(p):
        return reconstruction_loss(logits(model, p, coords), target, p, weight_decay)

    grads, loss = torch.func.grad_and_value(loss_of)(dict(params))
    if first_order:
        grads = {k: g.detach() for k, g in grads.items()}
    return {k: params[k] - inner_lr[k] * grads[k] for k in params}, loss


def warm_up() -> None:
    """One inner step of a tiny SIREN, so that PyTorch's one-time work on first use (torch.func
    imports its compiler stack: about 1 s) is done before a user's first reconstruction."""
    model = Siren(hidden_features=4, linear_layers=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    inner_step(model, params, {k: torch.full_like(v, 0.01) for k, v in params.items()},
               torch.zeros(2, 3), torch.tensor([0.0, 1.0]), 1.0)


def adapt(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
          coords: torch.Tensor, target: torch.Tensor, steps: int, weight_decay: float,
          progress: Optional[Progress] = None,
          first_lr: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[Params, List[float]]:
    """`steps` inner-loop steps; returns the adapted weights and the loss before each step.
    The first step takes `first_lr` as its step sizes when given (`Prior.first_step_sizes`: the
    first step from the prior gains from sizes of its own), every other step `inner_lr`."""
    losses = []
    params = dict(params)
    for step in range(steps):
        sizes = first_lr if step == 0 and first_lr is not None else inner_lr
        params, loss = inner_step(model, params, sizes, coords, target, weight_decay)
        params = {k: v.detach() for k, v in params.items()}
        losses.append(float(loss.detach()))
        report(progress, step + 1, steps, losses[-1])
    return params, losses


def adapt_until_converged(model: Siren, params: Mapping[str, torch.Tensor], coords: torch.Tensor,
                          target: torch.Tensor, weight_decay: float, lr: float, patience: int,
                          max_steps: int, progress: Optional[Progress] = None,
                          step_offset: int = 0) -> Tuple[Params, List[float]]:
    """Continue with Adam until the context loss has not improved for `patience` steps.

    Returns the best weights seen and the loss of every step."""
    current = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.Adam(current.values(), lr=lr)
    best = {k: v.detach().clone() for k, v in current.items()}
    best_loss, since_best, losses = float("inf"), 0, []
    for step in range(max_steps):
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = reconstruction_loss(logits(model, current, coords), target, current, weight_decay)
            loss.backward()
        value = float(loss.detach())
        losses.append(value)
        if value < best_loss - 1e-6:
            best_loss, since_best = value, 0
            best = {k: v.detach().clone() for k, v in current.items()}
        else:
            since_best += 1
        report(progress, step_offset + step + 1, step_offset + max_steps, value)
        if since_best >= patience:
            break
        optimiser.step()
    return best, losses


def to_tensors(coords: np.ndarray, target: np.ndarray, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(coords, np.float32), device=device),
            torch.as_tensor(np.asarray(target, np.float32), device=device))

