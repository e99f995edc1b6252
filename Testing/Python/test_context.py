"""Which observed voxels an adaptation uses (shared by reconstruction and meta-training)."""

import numpy as np
import pytest
import torch
from MetaShapeReconLib.adaptation import choose_context, draw_context

LABELS = np.array([1.0] * 30 + [0.0] * 970)


def test_uniform_takes_everything_or_a_distinct_subset():
    assert np.array_equal(choose_context(LABELS, 2000, 0), np.arange(1000))
    chosen = choose_context(LABELS, 100, 0)
    assert len(chosen) == 100 and len(np.unique(chosen)) == 100 and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, choose_context(LABELS, 100, 0))  # seeded: reproducible


def test_balanced_gives_the_small_structure_half_the_points():
    chosen = choose_context(LABELS, 40, 0, "balanced")
    assert len(chosen) == 40 and LABELS[chosen].sum() == 20
    # fewer foreground voxels than half: all of them, the rest background, still no repeats
    chosen = choose_context(LABELS, 200, 0, "balanced")
    assert len(chosen) == 200 and LABELS[chosen].sum() == 30 and len(np.unique(chosen)) == 200


def test_exact_counts_for_training_batches():
    chosen = choose_context(LABELS, 2000, np.random.default_rng(1), "uniform", exact=True)
    assert len(chosen) == 2000 and set(chosen) <= set(range(1000))
    chosen = choose_context(LABELS, 200, np.random.default_rng(1), "balanced", exact=True)
    assert len(chosen) == 200 and LABELS[chosen].sum() == 100  # foreground repeated to its half
    only_background = np.zeros(50)
    assert len(choose_context(only_background, 20, 0, "balanced", exact=True)) == 20


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError):
        choose_context(LABELS, 10, 0, "stratified")


def test_draw_context_redraws_only_when_fresh_and_there_is_more_to_see():
    coords = np.random.default_rng(0).uniform(-1, 1, (len(LABELS), 3)).astype(np.float32)
    fixed = draw_context(coords, LABELS, 100, "balanced", fresh=False, seed=3)
    first = choose_context(LABELS, 100, 3, "balanced")  # the first draw is the one reconstruction always made
    assert fixed.redraw is None
    np.testing.assert_array_equal(fixed.coords.numpy(), coords[first])
    np.testing.assert_array_equal(fixed.target.numpy(), LABELS[first])
    fresh = draw_context(coords, LABELS, 100, "balanced", fresh=True, seed=3)
    np.testing.assert_array_equal(fresh.coords.numpy(), coords[first])
    seen = {tuple(map(tuple, fresh.coords.numpy()))}
    for _ in range(3):
        x, y = fresh.redraw()
        assert len(x) == 100 and float(y.sum()) == 30  # the same count, drawn the same way
        seen.add(tuple(map(tuple, x.numpy())))
    assert len(seen) == 4  # every draw another set of voxels
    assert draw_context(coords, LABELS, 5000, fresh=True).redraw is None  # every voxel already in


def test_later_steps_draw_their_own_number_of_context_points():
    """`later_limit`: the first draw is the one without it; every later draw has that many points,
    balanced as the first, and differs from the one before."""
    rng = np.random.default_rng(1)
    coords = rng.uniform(-1, 1, (5000, 3))
    labels = (np.linalg.norm(coords, axis=1) < 0.4).astype(np.float32)
    plain = draw_context(coords, labels, 1024, "balanced", fresh=True, seed=3)
    cheaper = draw_context(coords, labels, 1024, "balanced", fresh=True, seed=3, later_limit=256)
    assert torch.equal(plain.coords, cheaper.coords) and torch.equal(plain.target, cheaper.target)
    assert plain.later_points == 1024 and cheaper.later_points == 256
    draws = [cheaper.redraw() for _ in range(2)]
    for x, y in draws:
        assert x.shape == (256, 3) and float(y.sum()) == 128
    assert not torch.equal(draws[0][0], draws[1][0])
    assert len(plain.redraw()[1]) == 1024
    every_point = draw_context(coords[:200], labels[:200], 1024, "uniform", fresh=True, later_limit=64)
    assert len(every_point.target) == 200 and len(every_point.redraw()[1]) == 64  # all drawn, later fewer
    assert draw_context(coords[:200], labels[:200], 1024, "uniform", fresh=True).redraw is None
