"""Adapting a prior to the observed voxels of one case.

`inner_step` is the meta-training inner loop's step, used unchanged here: the same loss, the
same per-parameter step sizes. It is written with `torch.func` so training can `vmap` it over a
batch of tasks and differentiate through it.
"""

from typing import Callable, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .errors import Cancelled
from .parallel import cpu_workers, parallel_map
from .siren import Params, Siren, logits, reconstruction_loss

Progress = Callable[[int, int, Optional[float]], bool]


def report(progress: Optional[Progress], step: int, total: int, loss: Optional[float] = None) -> None:
    """Call a progress callback; a False answer cancels the work."""
    if progress is not None and progress(step, total, loss) is False:
        raise Cancelled("cancelled")


def sample_points(count: int, limit: int, seed: int = 0) -> np.ndarray:
    """Indices of a uniform random subset of `limit` of `count` items (all when count <= limit)."""
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


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


# --- the same step, faster, for reconstruction time ------------------------------------------
# Profiled on a 2-core CPU, `inner_step` spends most of its time in autograd's element-wise work
# on (points x 128) activations: omega * (Wx + b) and its backward, sine's backward. Folding
# omega into the (128 x 128) weights and back-propagating through the sine layers by hand makes
# a step 1.4-2x faster (docs/PERFORMANCE.md). The loss's gradient still comes from `reconstruction_loss` itself (autograd on the
# logits), so there is one definition of the loss; `Testing/Python/test_fast_adaptation.py`
# checks this step against `inner_step`.

_MIN_POINTS_PER_WORKER = 2048  # fewer points per worker: thread hand-over costs more than it saves


def _siren_layer_names(model, params: Mapping[str, torch.Tensor]) -> Optional[List[Tuple[str, str]]]:
    """[(weight name, bias name)] per linear layer when `params` are a plain SIREN's weights that
    need no gradient of their own (reconstruction, not meta-training); otherwise None."""
    layers = getattr(model, "layers", None)
    if not isinstance(model, Siren) or layers is None:
        return None
    names = [(f"layers.{i}.weight", f"layers.{i}.bias") for i in range(len(layers))]
    if set(params) != {n for pair in names for n in pair}:
        return None
    if any(v.requires_grad for v in params.values()):
        return None
    return names


@torch.no_grad()
def siren_inference_step(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
                         coords: torch.Tensor, target: torch.Tensor, weight_decay: float
                         ) -> Tuple[Params, torch.Tensor]:
    """`inner_step` for a SIREN without a graph to differentiate through (same result up to
    float rounding): forward with omega folded into the weights, backward by hand, the points
    split over the CPU workers of `parallel.py`."""
    names = _siren_layer_names(model, params)
    if names is None:
        raise ValueError("siren_inference_step needs a Siren's own parameters, without gradients")
    omega = float(model.omega_0)
    last = len(names) - 1
    scales = [omega if i < last else 1.0 for i in range(len(names))]
    weights = [params[w] * s for (w, _), s in zip(names, scales)]
    weights_t = [w.t() for w in weights]
    biases = [params[b] * s for (_, b), s in zip(names, scales)]
    workers = min(cpu_workers(coords.device), max(1, len(coords) // _MIN_POINTS_PER_WORKER))
    bounds = np.linspace(0, len(coords), workers + 1).astype(int)
    parts = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]

    def forward(part: slice):
        with torch.no_grad():  # grad mode is per thread
            h = coords[part]
            inputs, pre_activations = [h], []
            for i in range(last):
                a = torch.addmm(biases[i], h, weights_t[i])
                pre_activations.append(a)
                h = torch.sin(a)
                inputs.append(h)
            return torch.addmm(biases[last], h, weights_t[last]).squeeze(-1), inputs, pre_activations

    passes = parallel_map(forward, parts, workers)
    logit = torch.cat([p[0] for p in passes]) if len(passes) > 1 else passes[0][0]
    with torch.enable_grad():
        logit_leaf = logit.detach().requires_grad_(True)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = reconstruction_loss(logit_leaf, target, leaves, weight_decay)
        ordered = [n for pair in names for n in pair]
        grad_logit, *grad_direct = torch.autograd.grad(loss, [logit_leaf] + [leaves[n] for n in ordered],
                                                       allow_unused=True)  # no weight decay: unused

    def backward(index: int):
        with torch.no_grad():
            _, inputs, pre_activations = passes[index]
            g = grad_logit[parts[index]].unsqueeze(-1)  # dL/d(pre-activation) of the layer, (points, out)
            layer_grads = [None] * len(names)
            for i in range(last, -1, -1):
                layer_grads[i] = (g.t() @ inputs[i], g.sum(0))
                if i > 0:
                    g = (g @ weights[i]).mul_(pre_activations[i - 1].cos_())
            return layer_grads

    partials = parallel_map(backward, list(range(len(parts))), workers)
    grads = {n: torch.zeros_like(params[n]) if g is None else g  # the weight-decay term's gradient
             for n, g in zip(ordered, grad_direct)}
    for i, (weight_name, bias_name) in enumerate(names):
        grads[weight_name] = grads[weight_name] + scales[i] * sum(p[i][0] for p in partials)
        grads[bias_name] = grads[bias_name] + scales[i] * sum(p[i][1] for p in partials)
    return {k: params[k] - inner_lr[k] * grads[k] for k in params}, loss.detach()


def adapt(model: Siren, params: Mapping[str, torch.Tensor], inner_lr: Mapping[str, torch.Tensor],
          coords: torch.Tensor, target: torch.Tensor, steps: int, weight_decay: float,
          progress: Optional[Progress] = None) -> Tuple[Params, List[float]]:
    """`steps` inner-loop steps; returns the adapted weights and the loss before each step."""
    losses = []
    params = dict(params)
    fast = _siren_layer_names(model, params) is not None
    for step in range(steps):
        if fast:
            params, loss = siren_inference_step(model, params, inner_lr, coords, target, weight_decay)
        else:
            params, loss = inner_step(model, params, inner_lr, coords, target, weight_decay)
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

