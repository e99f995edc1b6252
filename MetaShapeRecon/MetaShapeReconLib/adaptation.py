"""Adapting a prior to the observed voxels of one case.

`inner_step` is the meta-training inner loop's step, used unchanged for the steps the prior was
meta-trained for (`adaptation_steps`): the same loss, the same per-parameter step sizes. It is
written with `torch.func` so training can `vmap` it over a batch of tasks and differentiate
through it.
"""

import itertools
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .errors import Cancelled
from .siren import Params, Siren, logits, reconstruction_loss

Progress = Callable[[int, int, Optional[float]], bool]
Step = Tuple[Params, float]  # the weights after a step, the context loss before it
OnStep = Callable[[int, Params], None]


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


@dataclass
class Context:
    """The context points an adaptation fits: `coords` (canonical, N x 3) and `target` (N) for
    the first step; `redraw`, when given, draws a fresh set for every later step; `later_points`:
    how many points each later step fits (N without `redraw`)."""

    coords: torch.Tensor
    target: torch.Tensor
    redraw: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]]
    later_points: int


def draw_context(coords: np.ndarray, labels: np.ndarray, limit: int, sampling: str = "uniform", fresh: bool = False,
                 seed: int = 0, device="cpu", later_limit: Optional[int] = None) -> Context:
    """`limit` of the observed voxels as `choose_context` draws them, on `device`. `fresh`: every
    step after the first fits another draw, so a step costs what its points cost while the steps
    together see more of the drawing (the first draw is the same either way); `later_limit`
    points each (default `limit`): the first step, the one meta-training made strongest, keeps
    its many points while the later ones cost less."""
    rng = np.random.default_rng(seed)
    chosen = choose_context(labels, limit, rng, sampling)
    later = limit if later_limit is None else int(later_limit)
    redraw = None
    if fresh and (len(chosen) < len(labels) or later < len(chosen)):
        def redraw():
            pick = choose_context(labels, later, rng, sampling)
            return to_tensors(coords[pick], labels[pick], device)
    return Context(*to_tensors(coords[chosen], labels[chosen], device), redraw,
                   min(later, len(labels)) if redraw is not None else len(chosen))


def inner_step(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
               coords: torch.Tensor, target: torch.Tensor, weight_decay: float,
               first_order: bool = False, precision: torch.dtype = torch.float32) -> Tuple[Params, torch.Tensor]:
    """One gradient step on the context points: theta - alpha * grad L(theta). `precision`: that
    of the network's later layers (`Siren.forward`); weights and gradients stay float32."""

    def loss_of(p):
        return reconstruction_loss(logits(model, p, coords, precision), target, p, weight_decay)

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


def adaptation_steps(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
                     coords: torch.Tensor, target: torch.Tensor, weight_decay: float, meta_steps: int,
                     adam_lr: float, first_lr: Optional[Mapping[str, torch.Tensor]] = None,
                     redraw: Optional[Callable[[], Tuple[torch.Tensor, torch.Tensor]]] = None,
                     precision: torch.dtype = torch.float32) -> Iterator[Step]:
    """The adaptation, one step at a time and without end: `meta_steps` steps of the inner loop
    with the meta-learned step sizes (`first_lr` for the first one when given:
    `Prior.first_step_sizes`), then Adam at `adam_lr`. The sizes were learned for the steps
    meta-training unrolled; repeated beyond them they overshoot, so later steps go to Adam.
    The first step fits `coords`, `target`; later ones fit `redraw()` when given (`Context`).
    `precision`: see `inner_step`. Yields the weights after each step and the context loss before it."""
    def context(step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return (coords, target) if step == 0 or redraw is None else redraw()

    params = {k: v.detach() for k, v in params.items()}
    for step in range(meta_steps):
        sizes = first_lr if step == 0 and first_lr is not None else inner_lr
        params, loss = inner_step(model, params, sizes, *context(step), weight_decay, precision=precision)
        params = {k: v.detach() for k, v in params.items()}
        yield params, float(loss.detach())
    current = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimiser = torch.optim.Adam(current.values(), lr=adam_lr)
    for step in itertools.count(meta_steps):
        x, y = context(step)
        optimiser.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = reconstruction_loss(logits(model, current, x, precision), y, current, weight_decay)
            loss.backward()
        optimiser.step()
        # copies: the optimiser updates `current` in place at the next step
        yield {k: v.detach().clone() for k, v in current.items()}, float(loss.detach())


def take_steps(steps: Iterator[Step], start: Mapping[str, torch.Tensor], count: int,
               progress: Optional[Progress] = None, on_step: Optional[OnStep] = None) -> Tuple[Params, List[float]]:
    """The weights after `count` steps of `steps` (`start`, the weights before them, when `count`
    is 0) and the loss before each step. `on_step(step, weights)` sees every step."""
    params, losses = dict(start), []
    for params, loss in islice(steps, count):
        losses.append(loss)
        if on_step is not None:
            on_step(len(losses), params)
        report(progress, len(losses), count, loss)
    return params, losses


IMPROVEMENT = 1e-6  # the least fall of the context loss that counts as progress (`steps_until_converged`)


def steps_until_converged(steps: Iterator[Step], start: Mapping[str, torch.Tensor], patience: int,
                          max_steps: int, progress: Optional[Progress] = None,
                          on_step: Optional[OnStep] = None) -> Tuple[Params, List[float]]:
    """Steps of `steps` until the context loss has not improved for `patience` steps (or
    `max_steps`); returns the weights of the lowest loss seen and the loss before each step
    (`best_step` says after how many steps those weights came, `converged` whether it stopped
    before `max_steps`)."""
    before, losses = dict(start), []
    best, best_loss, since_best = before, float("inf"), 0
    for after, loss in islice(steps, max_steps):
        losses.append(loss)
        if loss < best_loss - IMPROVEMENT:  # `loss` is that of the weights before this step
            best, best_loss, since_best = before, loss, 0
        else:
            since_best += 1
        if on_step is not None:
            on_step(len(losses), after)
        report(progress, len(losses), max_steps, loss)
        if since_best >= patience:
            break
        before = after
    return best, losses


def best_step(losses: List[float]) -> int:
    """After how many steps came the weights `steps_until_converged` returned with these losses
    (the loss before step n + 1 is that of the weights after n steps)."""
    best, best_loss = 0, float("inf")
    for step, loss in enumerate(losses):
        if loss < best_loss - IMPROVEMENT:
            best, best_loss = step, loss
    return best


def converged(losses: List[float], patience: int) -> bool:
    """Whether `steps_until_converged` stopped because the loss stopped improving (not at max_steps)."""
    return bool(losses) and len(losses) - 1 - best_step(losses) >= patience


def to_tensors(coords: np.ndarray, target: np.ndarray, device) -> Tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(np.asarray(coords, np.float32), device=device),
            torch.as_tensor(np.asarray(target, np.float32), device=device))

