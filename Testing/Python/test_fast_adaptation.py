"""The reconstruction-time adaptation step (`siren_inference_step`, used by `adapt`) is the
meta-training inner step (`inner_step`), only faster; and the CPU worker threads behave."""

import numpy as np
import pytest
import torch
from MetaShapeReconLib import adaptation
from MetaShapeReconLib.adaptation import adapt, inner_step, siren_inference_step
from MetaShapeReconLib.parallel import parallel_map
from MetaShapeReconLib.prior import initial_prior


@pytest.fixture(scope="module")
def task():
    prior = initial_prior("test", 128.0, seed=3)
    generator = torch.Generator().manual_seed(0)
    coords = torch.rand(6000, 3, generator=generator) * 2 - 1
    target = (coords.norm(dim=1) < 0.5).float()
    # a per-parameter step size, as a meta-learned prior has
    inner_lr = {k: torch.rand(v.shape, generator=generator) * 0.02 for k, v in prior.params.items()}
    return prior, coords, target, inner_lr


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.0, 100.0])
def test_fast_step_is_the_inner_step(task, threads, weight_decay):
    prior, coords, target, inner_lr = task
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # 2: the points are split over two workers
        fast, fast_loss = siren_inference_step(prior.model, prior.params, inner_lr, coords, target, weight_decay)
    finally:
        torch.set_num_threads(saved)
    reference, loss = inner_step(prior.model, prior.params, inner_lr, coords, target, weight_decay)
    assert float(fast_loss) == pytest.approx(float(loss), rel=1e-6)
    for name, value in reference.items():
        change = (value - prior.params[name]).abs().max()
        assert change > 0
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-6 * float(change) + 1e-9)


def test_adapt_takes_the_fast_path_and_matches(task, monkeypatch):
    prior, coords, target, inner_lr = task
    fast, fast_losses = adapt(prior.model, prior.params, inner_lr, coords, target, 3, 100.0)
    calls = []
    monkeypatch.setattr(adaptation, "siren_inference_step", lambda *a, **k: calls.append(1) or inner_step(*a, **k))
    reference, losses = adapt(prior.model, prior.params, inner_lr, coords, target, 3, 100.0)
    assert len(calls) == 3
    np.testing.assert_allclose(fast_losses, losses, rtol=1e-5)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-6)


def test_parameters_that_need_gradients_take_the_inner_step(task, monkeypatch):
    """Meta-training differentiates through the steps: no shortcut then."""
    prior, coords, target, inner_lr = task
    params = {k: v.clone().requires_grad_(True) for k, v in prior.params.items()}
    monkeypatch.setattr(adaptation, "siren_inference_step", lambda *a, **k: pytest.fail("fast path taken"))
    adapted, _ = adapt(prior.model, params, inner_lr, coords, target, 1, 100.0)
    assert set(adapted) == set(params)


def test_parallel_map_keeps_order_and_the_callers_threads():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = parallel_map(lambda x: (x, torch.get_num_threads()), list(range(9)), 2)
        assert [x for x, _ in seen] == list(range(9))
        assert all(threads == 1 for _, threads in seen)  # each worker runs PyTorch single-threaded
        assert torch.get_num_threads() == 2
        with pytest.raises(ZeroDivisionError):
            parallel_map(lambda x: 1 // x, [1, 0, 2], 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
