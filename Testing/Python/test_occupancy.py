"""Evaluating an adapted network on a grid: coarse-to-fine against dense, bounded blocks and chunks."""

import numpy as np
import pytest
import torch
from MetaShapeReconLib.adaptation import adaptation_steps, steps_until_converged, to_tensors
from MetaShapeReconLib.errors import Cancelled
from MetaShapeReconLib.frame import CanonicalFrame
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.occupancy import OccupancyNetwork, evaluate_grid
from MetaShapeReconLib.pipeline import dice
from MetaShapeReconLib.prior import initial_prior
from MetaShapeReconLib.siren import logits
from shapes import ellipsoid

GRID = Geometry.create((128, 128, 128), (1.0, 1.0, 1.0), (-63.5, -63.5, -63.5))
FRAME = CanonicalFrame((0.0, 0.0, 0.0), (64.0, 64.0, 64.0))
RADII_MM = (40.0, 30.0, 20.0)
OMEGA = 10.0


@pytest.fixture(scope="module")
def fitted():
    """A small SIREN fitted to an ellipsoid (about 1 s): (adapted weights, truth on GRID)."""
    prior = initial_prior("ellipsoid", 128.0, omega_0=OMEGA, hidden_features=32, linear_layers=3)
    rng = np.random.default_rng(0)
    radii = np.array(RADII_MM) / 64.0
    uniform = rng.uniform(-1, 1, (2048, 3))
    within = rng.uniform(-1, 1, (2048, 3))
    within = within[(within ** 2).sum(axis=1) <= 1.0][:512] * radii  # the ellipsoid's inside is small
    points = np.concatenate([uniform, within]).astype(np.float32)
    inside = ((points / radii) ** 2).sum(axis=1) <= 1.0
    coords, target = to_tensors(points, inside.astype(np.float32), "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster, and immune to a busy machine
    try:
        steps = adaptation_steps(prior.model, prior.params, prior.inner_lr, coords, target, 0.0, 0, 1e-2)
        params, losses = steps_until_converged(steps, prior.params, 20, 150)
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < 0.2 * losses[0]
    return params, ellipsoid(GRID, (0.0, 0.0, 0.0), RADII_MM)


def test_coarse_to_fine_matches_dense_with_far_fewer_evaluations(fitted):
    params, truth = fitted
    coarse = OccupancyNetwork(params, OMEGA)
    dense = OccupancyNetwork(params, OMEGA)
    by_refinement = evaluate_grid(coarse, FRAME, GRID, method="coarse-to-fine")
    everywhere = evaluate_grid(dense, FRAME, GRID, method="dense")
    assert by_refinement.dtype == np.uint8 and by_refinement.shape == GRID.size
    assert dice(by_refinement, truth) >= 0.9  # the network did learn the ellipsoid
    assert dice(by_refinement, everywhere) >= 0.999
    assert dense.evaluated == 128 ** 3
    assert coarse.evaluated * 8 <= dense.evaluated


def test_logit_offset_shifts_every_logit(fitted):
    """The card's logit_offset is added to the network's logits: probabilities are the sigmoid of
    the shifted logits, and a negative offset gives a smaller structure inside the larger one."""
    params, truth = fitted
    points = np.random.default_rng(1).uniform(-1, 1, (5000, 3)).astype(np.float32)
    plain = OccupancyNetwork(params, OMEGA).probabilities(points).astype(np.float64)
    shifted = OccupancyNetwork(params, OMEGA, logit_offset=-2.0).probabilities(points)
    expected = 1.0 / (1.0 + np.exp(-(np.log(plain) - np.log1p(-plain) - 2.0)))
    np.testing.assert_allclose(shifted, expected, atol=1e-5)
    full = evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID, method="dense")
    smaller = evaluate_grid(OccupancyNetwork(params, OMEGA, logit_offset=-2.0), FRAME, GRID, method="dense")
    assert 0 < smaller.sum() < full.sum() and not (smaller & ~full).any()


def test_blocks_and_chunks_bound_the_work(fitted, monkeypatch):
    """A grid of 4 x 4 x 4 blocks and tiny chunks gives the same voxels, and no network call or
    block ever holds more than its bound."""
    params, _ = fitted
    reference = evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID, method="dense")
    network = OccupancyNetwork(params, OMEGA, chunk=1000)
    seen = {"logits": 0, "probabilities": 0}
    logits, probabilities = network.logits, network.probabilities

    def counting_logits(coords):
        seen["logits"] = max(seen["logits"], len(coords))
        return logits(coords)

    def counting_probabilities(canonical):
        seen["probabilities"] = max(seen["probabilities"], len(canonical))
        return probabilities(canonical)

    monkeypatch.setattr(network, "logits", counting_logits)
    monkeypatch.setattr(network, "probabilities", counting_probabilities)
    blocks = []
    dense = evaluate_grid(network, FRAME, GRID, method="dense", block=32,
                          progress=lambda done, total, _loss: blocks.append((done, total)))
    assert np.array_equal(dense, reference)
    assert seen["logits"] <= 1000
    assert seen["probabilities"] <= 32 ** 3
    assert blocks[-1] == (64, 64) and len(blocks) == 64

    seen.update(logits=0, probabilities=0)
    refined = evaluate_grid(network, FRAME, GRID, method="coarse-to-fine", block=32)
    assert dice(refined, reference) >= 0.999
    assert seen["logits"] <= 1000
    assert seen["probabilities"] <= 33 ** 3


def test_only_the_canonical_cube_is_evaluated(fitted):
    """A grid far larger than the prior's frame: voxels outside it are background, unevaluated."""
    params, _ = fitted
    large = Geometry.create((200, 160, 180), (1.0, 1.0, 1.0), (-99.5, -79.5, -89.5))
    network = OccupancyNetwork(params, OMEGA)
    output = evaluate_grid(network, FRAME, large, method="dense")
    inside = [slice(36, 164), slice(16, 144), slice(26, 154)]  # the 128 mm cube in this grid
    assert network.evaluated == 128 ** 3
    outside = output.copy()
    outside[tuple(inside)] = 0
    assert not outside.any()
    assert np.array_equal(output[tuple(inside)], evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID,
                                                               method="dense"))


def test_probabilities_outside_the_cube_are_zero(fitted):
    params, _ = fitted
    network = OccupancyNetwork(params, OMEGA)
    points = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, -2.0, 0.0], [0.1, 0.1, 0.1]], np.float32)
    result = network.probabilities(points)
    assert result.dtype == np.float32 and result.shape == (4,)
    assert result[0] > 0.5 and result[1] == 0.0 and result[2] == 0.0
    assert network.evaluated == 2


def test_evaluation_is_the_same_with_one_or_two_threads(fitted):
    params, _ = fitted
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID)
        torch.set_num_threads(2)
        pooled = evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID)
        assert torch.get_num_threads() == 2  # the worker threads leave the caller's setting alone
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(single, pooled)


def test_bfloat16_evaluation_is_the_adaptations_network_and_keeps_the_shape(fitted):
    params, truth = fitted
    single = OccupancyNetwork(params, OMEGA)
    half = OccupancyNetwork(params, OMEGA, precision=torch.bfloat16)
    points = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, (4096, 3)), dtype=torch.float32)
    model = initial_prior("ellipsoid", 128.0, omega_0=OMEGA, hidden_features=32, linear_layers=3).model
    # the same products as the forward pass adaptation differentiates (`Siren.forward`)
    torch.testing.assert_close(half.logits(points), logits(model, params, points, torch.bfloat16).detach(),
                               rtol=0, atol=1e-2)
    assert (half.logits(points) - single.logits(points)).abs().max() < 0.1
    dense = evaluate_grid(half, FRAME, GRID, method="dense")
    assert np.array_equal(evaluate_grid(half, FRAME, GRID), dense)  # coarse-to-fine is exact here too
    assert dice(dense, evaluate_grid(single, FRAME, GRID, method="dense")) > 0.995


def test_cancel_between_blocks(fitted):
    params, _ = fitted
    with pytest.raises(Cancelled):
        evaluate_grid(OccupancyNetwork(params, OMEGA), FRAME, GRID, block=64,
                      progress=lambda done, total, _loss: done < 2)


def test_interpolation_evidence_moves_the_decision_only_where_its_distance_is_defined(fitted):
    """WithInterpolation: the network's probability wherever the distance is NaN (no planes bracket
    the voxel), the interpolation's sign where its weight dominates, the sum of both logits between."""
    from MetaShapeReconLib.occupancy import WithInterpolation

    params, truth = fitted
    network = OccupancyNetwork(params, OMEGA, "cpu")
    affine = FRAME.index_affine(GRID)
    # a made-up field: defined on the lower half of axis 0 only, -5 mm (inside) on a slab, +5 elsewhere
    distance = np.full(GRID.size, np.nan, np.float32)
    distance[:64] = 5.0
    distance[:64, 40:60] = -5.0
    alone = evaluate_grid(network, FRAME, GRID, method="dense")
    with_evidence = evaluate_grid(WithInterpolation(network, distance, (0, 0, 0), 100.0, affine), FRAME, GRID,
                                  method="dense")
    np.testing.assert_array_equal(with_evidence[64:], alone[64:])
    np.testing.assert_array_equal(with_evidence[:64], np.broadcast_to(distance[:64] < 0, (64, 128, 128)))
    # a field held on a box of the grid (from index 20 along axis 0): the network outside it, coarse-to-fine
    boxed = evaluate_grid(WithInterpolation(network, distance[20:100], (20, 0, 0), 100.0, affine), FRAME, GRID)
    np.testing.assert_array_equal(boxed[:20], alone[:20])
    np.testing.assert_array_equal(boxed[20:], with_evidence[20:])

    # a small weight: the logits add up (p = sigmoid(logit - w d))
    points = np.array([[-0.6, 0.0, 0.0], [-0.6, -0.6, 0.0], [0.6, 0.0, 0.0]], np.float32)
    p = network.probabilities(points)
    fused = WithInterpolation(network, distance, (0, 0, 0), 0.1, affine).probabilities(points)
    ijk = np.rint((points - affine[1]) @ np.linalg.inv(affine[0]).T).astype(int)
    d = distance[tuple(ijk.T)]
    expected = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - 0.1 * np.nan_to_num(d))))
    np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-6)
    assert np.isnan(d[2]) and fused[2] == p[2] and not np.isnan(d[:2]).any()
