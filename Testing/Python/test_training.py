"""training/: context voxels, frame round trip, loss values, MAML learning, export -> engine."""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from MetaShapeReconLib.frame import CanonicalFrame, FrameSpec, centre_frame
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.pipeline import native_bfloat16, observed_context
from MetaShapeReconLib.prior import load_prior
from MetaShapeReconLib.siren import logits, reconstruction_loss

from training.bench import bench_outer_step, gradient_parts
from training.config import load_config
from training.data import Shape, TaskSampler
from training.maml import MetaLearner, meta_training_settings, new_prior, train_maml
from training.synthetic import synthetic_family

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(**overrides):
    config = load_config(None, [
        "name=test", "frame.extent_mm=48", "tasks.context_points=256", "tasks.target_points=256",
        "tasks.mirror=false", "maml.inner_steps=2", "maml.meta_batch=4", "maml.outer_lr=3e-4",
        "validation.every=0", "checkpoint.every=1000", "adaptation.context_points=1024",
        "license=test data licence", "attribution=synthetic test shapes",  # export requires them
    ])
    return with_values(config, overrides)


def with_values(config, values):
    """`config` with the nested keys of `values` ("maml.iterations": 3, ...) set as given (not parsed)."""
    for key, value in values.items():
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return config


def shapes_from_family(count, extent=64, seed=0):
    from scipy import ndimage

    shapes = []
    for case, mask, geometry in synthetic_family(count, extent, seed=seed, radii_mm=(8, 18)):
        boundary = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_erosion(mask, iterations=2)
        shapes.append(Shape(case, case, mask, geometry, np.argwhere(mask).astype(np.int32),
                            np.argwhere(boundary).astype(np.int32)))
    return shapes


def test_context_is_exactly_the_observed_voxels_inside_the_frame():
    geometry = Geometry.create((20, 16, 12), (1.5, 1.0, 2.0), (-10, -5, 3))
    mask = np.zeros(geometry.size, bool)
    mask[5:15, 4:12, 3:9] = True
    planes = {0: np.array([2, 6, 10, 14]), 2: np.array([5])}
    frame = CanonicalFrame(tuple(geometry.index_to_physical(np.array([[10, 8, 6]]))[0]), (12.0, 100.0, 100.0))
    coords, labels = observed_context(mask, geometry, planes, frame)
    # expected: every voxel on i in {2,6,10,14} or k == 5, whose canonical x is within [-1, 1]
    ijk = np.argwhere(np.ones(geometry.size, bool))
    on_plane = np.isin(ijk[:, 0], planes[0]) | (ijk[:, 2] == 5)
    canonical = frame.to_canonical(geometry.index_to_physical(ijk))
    expected = on_plane & np.all(np.abs(canonical) <= 1.0, axis=1)
    assert len(coords) == expected.sum()  # crossing lines counted once
    order_expected = np.lexsort(np.round(canonical[expected], 5).T)
    order_got = np.lexsort(np.round(coords.astype(float), 5).T)
    assert np.allclose(canonical[expected][order_expected], coords[order_got], atol=1e-5)
    assert np.array_equal(mask[tuple(ijk[expected].T)][order_expected], labels[order_got].astype(bool))
    # the frame's 12 mm half extent along L-R keeps planes i = 6, 10, 14 (0, 6, 6 mm away) but not
    # i = 2 (12 mm, on the edge: inside) ... and the axial plane only within 8 voxels of i = 10
    kept_i = set(np.unique(ijk[expected][:, 0]))
    assert {2, 6, 10, 14} <= kept_i and min(kept_i) >= 2 and max(kept_i) <= 18


def test_frame_round_trip_and_centring_on_observed_foreground():
    direction = np.array([[0.8, -0.6, 0], [0.6, 0.8, 0], [0, 0, 1]]).ravel()
    geometry = Geometry.create((30, 30, 30), (0.7, 0.7, 2.5), (5, -3, 11), direction)
    mask = np.zeros(geometry.size, bool)
    mask[10:20, 8:22, 5:12] = True
    planes = {0: np.array([12, 16])}
    frame = centre_frame(FrameSpec((64.0, 64.0, 48.0)), geometry, mask, planes)
    points = np.random.default_rng(0).uniform(-50, 50, size=(100, 3))
    assert np.allclose(frame.to_physical(frame.to_canonical(points)), points)
    # the observed foreground's bounding box is centred at the canonical origin
    observed = np.array([[i, j, k] for i in planes[0] for j, k in np.argwhere(mask[i])], float)
    canonical = frame.to_canonical(geometry.index_to_physical(observed))
    assert np.allclose((canonical.min(axis=0) + canonical.max(axis=0)) / 2, 0, atol=1e-9)
    assert np.allclose(frame.half_extent, (32.0, 32.0, 24.0))
    matrix, offset = frame.index_affine(geometry)
    ijk = np.array([[3.0, 4.0, 5.0]])
    assert np.allclose(ijk @ matrix.T + offset, frame.to_canonical(geometry.index_to_physical(ijk)))


def test_loss_matches_hand_computed_values():
    logit = torch.tensor([0.0, 2.0, -1.0])
    target = torch.tensor([1.0, 1.0, 0.0])
    p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
    bce = -np.mean([math.log(p[0]), math.log(p[1]), math.log(1 - p[2])])
    dice = 1 - (2 * (p[0] + p[1]) + 1) / (p.sum() + 2 + 1)
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    expected = bce + dice + 10.0 / 3 * (1 + 4 + 9)
    assert reconstruction_loss(logit, target, params, 10.0).item() == pytest.approx(expected, rel=1e-6)
    assert reconstruction_loss(logit, target, params, 0.0).item() == pytest.approx(bce + dice, rel=1e-6)


def _post_adaptation_loss(learner: MetaLearner, batch) -> float:
    from MetaShapeReconLib.adaptation import inner_step

    total = 0.0
    for t in range(len(batch["context_x"])):
        x, y, tx, ty = (torch.as_tensor(batch[k][t]) for k in ("context_x", "context_y", "target_x", "target_y"))
        params = {k: v.detach() for k, v in learner.params.items()}
        lrs = {k: v.detach() for k, v in learner.inner_lr.items()}
        for _ in range(int(learner.config["maml"]["inner_steps"])):
            params, _ = inner_step(learner.model, params, lrs, x, y, learner.weight_decay)
        total += float(reconstruction_loss(logits(learner.model, params, tx), ty, params, learner.weight_decay))
    return total / len(batch["context_x"])


def test_maml_outer_steps_lower_the_post_adaptation_loss():
    torch.manual_seed(0)
    config = small_config(**{"maml.outer_lr": 3e-4})
    shapes = shapes_from_family(10)
    held_out = TaskSampler(config, seed=123).batch(shapes[8:] * 2)
    learner = MetaLearner(new_prior(config), config, torch.device("cpu"))
    before = _post_adaptation_loss(learner, held_out)
    sampler = TaskSampler(config, seed=1)
    rng = np.random.default_rng(0)
    for _ in range(40):
        chosen = [shapes[i] for i in rng.choice(8, size=4, replace=False)]
        learner.outer_step(sampler.batch(chosen), first_order=False)
    after = _post_adaptation_loss(learner, held_out)
    assert after < 0.75 * before, (before, after)  # measured: 1.33 -> 0.80


def test_outer_step_warms_up_over_a_runs_first_iterations():
    """maml.warmup_iterations: the outer step ramps up linearly, so a fresh Adam's first updates
    (about the whole step on every weight) move a continued prior by a fraction of it."""
    config = small_config(**{"maml.outer_lr": 1e-3, "maml.warmup_iterations": 4})
    shapes = shapes_from_family(4)
    batch = TaskSampler(config, seed=1).batch(shapes)
    warm = MetaLearner(new_prior(config), config, torch.device("cpu"))
    assert [warm.set_outer_lr(i) for i in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warm.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    cold_config = small_config(**{"maml.outer_lr": 1e-3})
    cold = MetaLearner(new_prior(cold_config), cold_config, torch.device("cpu"))
    start = {k: v.detach().clone() for k, v in warm.params.items()}
    warm.set_outer_lr(0)
    cold.set_outer_lr(0)
    warm.outer_step(batch, first_order=False)
    cold.outer_step(batch, first_order=False)
    moved_warm = max(float((warm.params[k].detach() - start[k]).abs().max()) for k in start)
    moved_cold = max(float((cold.params[k].detach() - start[k]).abs().max()) for k in start)
    assert moved_cold == pytest.approx(1e-3, rel=0.05)  # Adam's first update: the whole step
    assert moved_warm == pytest.approx(0.25 * moved_cold, rel=0.05)
    assert meta_training_settings(config)["warmup_iterations"] == 4


def test_first_step_loss_weight_weighs_the_first_steps_meta_gradient():
    """maml.first_step_loss_weight w: with every step trained, the meta-gradient is
    (w * that of the first step's loss + that of the second's) / (w + 1), each measured alone
    (one inner step; two steps scoring only the last) on the same prior and batch."""
    shapes = shapes_from_family(4)

    def gradient(**overrides):
        config = small_config(**{"maml.precision": "float32", **overrides})
        learner = MetaLearner(new_prior(small_config()), config, torch.device("cpu"))
        learner.meta_gradient(TaskSampler(small_config(), seed=1).batch(shapes), first_order=False)
        return torch.cat([p.grad.flatten() for g in learner.optimizer.param_groups for p in g["params"]])

    first = gradient(**{"maml.inner_steps": 1})
    second = gradient(**{"maml.multi_step_loss": False})
    assert not torch.allclose(first, second, rtol=0.1, atol=0)
    for weight in (1.0, 4.0):
        weighted = gradient(**{"maml.first_step_loss_weight": weight})
        assert torch.allclose(weighted, (weight * first + second) / (weight + 1), rtol=1e-4, atol=1e-7)
    assert meta_training_settings(small_config(**{"maml.first_step_loss_weight": 4.0}))["first_step_loss_weight"] == 4
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(SystemExit, match="maml.first_step_loss_weight .*expected a number > 0"):
            gradient(**{"maml.first_step_loss_weight": bad})


def test_frozen_weights_leave_theta_0_and_train_the_step_sizes(tmp_path):
    """maml.freeze_weights: theta_0 stays as maml.init's, bit for bit, while the step sizes
    learn and lower the held-out loss after adaptation; the card
    records it; with no step sizes to learn either it is refused."""
    shapes = shapes_from_family(8)
    config = small_config(**{"maml.freeze_weights": True, "maml.outer_lr": 1e-3, "maml.precision": "float32"})
    initial = new_prior(config)
    learner = MetaLearner(initial, config, torch.device("cpu"))
    held_out = TaskSampler(config, seed=123).batch(shapes[6:] * 2)
    before = _post_adaptation_loss(learner, held_out)
    sampler = TaskSampler(config, seed=1)
    for _ in range(30):
        learner.outer_step(sampler.batch(shapes[:6]), first_order=False)
    assert all(torch.equal(learner.params[k].detach(), initial.params[k]) for k in initial.params)
    assert all(not torch.equal(learner.inner_lr[k].detach(), initial.inner_lr[k]) for k in initial.params)
    after = _post_adaptation_loss(learner, held_out)
    assert after < 0.95 * before, (before, after)  # measured: 1.34 -> 1.22
    assert meta_training_settings(config)["freeze_weights"] is True
    with pytest.raises(SystemExit, match="nothing left to train"):
        MetaLearner(initial, small_config(**{"maml.freeze_weights": True, "maml.learn_inner_lr": False}),
                    torch.device("cpu"))


def test_bfloat16_meta_training_follows_the_float32_meta_gradient(tmp_path):
    """maml.precision=bfloat16: the second-order meta-gradient through bfloat16 later layers
    points where the float32 one does, far closer than the previous batch's does (the noise
    training already lives with), while weights, step sizes and gradients stay float32; the
    bench reports it side by side, and the run's card says which precision it used."""
    config = small_config(**{"maml.grad_clip": 0})
    shapes = shapes_from_family(8)
    lines = []
    rows = bench_outer_step(config, None, batches=3, shapes=shapes, report=lines.append)
    assert len(rows) == 3 and sum(line.startswith("| ") for line in lines) == 1 + 3
    for row in rows[1:]:
        for part in ("weights", "step sizes"):
            agreement, between_batches = row[f"cos_{part}"], row[f"cos_{part}_previous"]
            assert agreement > 0.95 and 1 - agreement < 0.1 * (1 - between_batches), (part, row)
        assert row["loss_bfloat16"] == pytest.approx(row["loss_float32"], rel=0.02)

    half = MetaLearner(new_prior(config), dict(config, maml=dict(config["maml"], precision="bfloat16")),
                       torch.device("cpu"))
    full = MetaLearner(new_prior(config), dict(config, maml=dict(config["maml"], precision="float32")),
                       torch.device("cpu"))
    batch = TaskSampler(config, seed=1).batch(shapes[:4])
    gradients = []
    for learner in (full, half):
        learner.meta_gradient(batch, first_order=False)
        gradients.append(gradient_parts(learner))
    assert half.precision == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in half.params.values())
    for part in gradients[0]:
        assert float(gradients[1][part].norm() / gradients[0][part].norm()) == pytest.approx(1, abs=0.1)

    run = train_maml(dict(config, maml=dict(config["maml"], precision="bfloat16", iterations=1)),
                     str(tmp_path / "run"), shapes=shapes)
    assert load_prior(run).card["training"]["settings"]["precision"] == "bfloat16"
    assert load_prior(train_maml(dict(config, maml=dict(config["maml"], precision="float32", iterations=1)),
                                 str(tmp_path / "fp32"),
                                 shapes=shapes)).card["training"]["settings"]["precision"] == "float32"


def test_export_then_engine_load_predicts_identically(tmp_path):
    config = small_config(**{"maml.iterations": 2, "adaptation.first_step_scale": 1.5,
                             "adaptation.fresh_context": True, "adaptation.later_context_points": 96})
    shapes = shapes_from_family(4)
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes)
    trained = load_prior(path)
    learner = MetaLearner(trained, config, torch.device("cpu"))
    from training.export import export_prior

    card = export_prior(config, path, "exported", None, str(tmp_path / "priors"))
    exported = load_prior(card[:-5] + ".safetensors")
    x = torch.rand(500, 3) * 2 - 1
    with torch.no_grad():
        a = logits(learner.model, learner.params, x)
        b = logits(exported.model, exported.params, x)
    assert torch.equal(a, b)
    for name in learner.inner_lr:
        assert torch.equal(learner.inner_lr[name].detach(), exported.inner_lr[name])
    with open(card) as handle:
        written = json.load(handle)
    assert written["training"]["method"] == "maml"
    assert written["meta_training"]["outer_lr"] == config["maml"]["outer_lr"]
    assert exported.first_step_scale == 1.5 and exported.adaptation["fresh_context"] is True
    assert exported.adaptation["later_context_points"] == 96
    # new priors interpolate along the cubic unless the config says otherwise; the card keeps the choice
    assert exported.adaptation["interpolation_curve"] == "cubic"
    config["adaptation"]["interpolation_curve"] = "linear"
    card = export_prior(config, path, "linear", None, str(tmp_path / "priors"))
    assert load_prior(card[:-5] + ".safetensors").adaptation["interpolation_curve"] == "linear"


def test_the_learned_steps_are_those_of_the_run_unless_the_config_sets_them(tmp_path):
    config = small_config(**{"maml.iterations": 1, "maml.inner_steps": 1, "adaptation.steps": 6})
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    from training.export import export_prior

    assert load_prior(export_prior(config, path, "as_run", None, str(tmp_path / "a"))[:-5]
                      + ".safetensors").meta_steps == 1
    config["adaptation"]["meta_steps"] = 4
    assert load_prior(export_prior(config, path, "set", None, str(tmp_path / "b"))[:-5]
                      + ".safetensors").meta_steps == 4
    # and the run's own card, which its validation reconstructs with, says the same
    assert load_prior(train_maml(config, str(tmp_path / "run4"), shapes=shapes_from_family(4))).meta_steps == 4


def test_first_step_learns_step_sizes_of_its_own(tmp_path):
    """maml.first_step_lr: the first inner step's sizes start at the shared ones times
    first_step_lr_init and are learned apart from them; the run's prior, a resumed run (whatever
    the flag then says) and the exported prior keep them."""
    config = small_config(**{"maml.iterations": 2, "maml.first_step_lr": True, "maml.first_step_lr_init": 1.5})
    shapes = shapes_from_family(4)
    initial = new_prior(config)
    learner = MetaLearner(initial, config, torch.device("cpu"))
    for name, shared in initial.inner_lr.items():
        assert torch.equal(learner.first_step_lr[name].detach(), shared * 1.5)
    learner.outer_step(TaskSampler(config, seed=1).batch(shapes), first_order=False)
    first_moved = torch.cat([(learner.first_step_lr[k] - initial.inner_lr[k] * 1.5).detach().flatten()
                             for k in initial.params])
    shared_moved = torch.cat([(learner.inner_lr[k] - initial.inner_lr[k]).detach().flatten() for k in initial.params])
    assert first_moved.abs().max() > 0 and shared_moved.abs().max() > 0
    assert not torch.allclose(first_moved, shared_moved)

    run = str(tmp_path / "run")
    trained = load_prior(train_maml(config, run, shapes=shapes))
    assert trained.first_step_lr is not None and trained.card["training"]["settings"]["first_step_lr"] is True
    resumed_config = small_config(**{"maml.iterations": 3})  # the flag off: the prior's own sizes stay
    resumed = load_prior(train_maml(resumed_config, run, resume=True, shapes=shapes))
    assert resumed.card["training"]["iterations"] == 3 and resumed.card["training"]["settings"]["first_step_lr"]
    assert not torch.equal(resumed.first_step_lr["layers.0.weight"], trained.first_step_lr["layers.0.weight"])
    from training.export import export_prior

    card = export_prior(config, os.path.join(run, "checkpoint.safetensors"), "own_first_step", None,
                        str(tmp_path / "priors"))
    exported = load_prior(card[:-5] + ".safetensors")
    for name in resumed.params:
        assert torch.equal(exported.first_step_lr[name], resumed.first_step_lr[name])


def test_tune_reports_validation_dice_for_each_value(tmp_path):
    from training.tune import format_row, header, tune

    shapes = shapes_from_family(2, seed=5)
    config = small_config(**{"maml.iterations": 2, "validation.slices": "sagittal:6",
                             "evaluate.settings": ["sagittal:6", "orthogonal"]})
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    reported = []
    rows = tune(config, path, "adaptation.first_step_scale=1,30", shapes, report=reported.append)
    assert reported == rows and [r["value"] for r in rows] == [1, 30]
    for row in rows:
        assert row["default_steps"] == config["adaptation"]["steps"] and row["seconds"] > 0
        assert list(row["settings"]) == ["sagittal:6", "orthogonal"]
        assert all(0.0 <= v["dice"] <= 1.0 and v["asd"] >= 0 for v in row["settings"].values())
    assert rows[0]["dice_1_step"] != rows[1]["dice_1_step"]  # the value reached the reconstruction
    assert format_row(rows[1]).startswith("| 30 | 5 | ")
    assert header("first_step_scale", 2, config).splitlines()[1:] == [
        "| first_step_scale | steps | 1 step | sagittal:6 | orthogonal | seconds |", "|---|---|---|---|---|---|"]
    with pytest.raises(SystemExit, match="not one of the prior's adaptation settings: steps, context_points"):
        tune(config, path, "inner_steps=1,2", shapes)
    # auto.lr: the Adam step of the steps after the meta-learned ones (2 here, of the default 5)
    slow, fast = tune(config, path, "auto.lr=1e-4,3e-2", shapes)
    assert slow["dice_1_step"] == fast["dice_1_step"]
    assert slow["settings"]["sagittal:6"]["dice"] != fast["settings"]["sagittal:6"]["dice"]
    with pytest.raises(SystemExit, match="'auto.nope' is not one of .*auto.lr, auto.patience"):
        tune(config, path, "auto.nope=1", shapes)
    with pytest.raises(SystemExit, match="auto.lr=-1: adaptation.auto.lr = -1 is not a number"):
        tune(config, path, "auto.lr=-1", shapes)
    with pytest.raises(SystemExit, match="first_step_scale=-1: adaptation.first_step_scale = -1 is not a number"):
        tune(config, path, "first_step_scale=-1", shapes)
    early = []
    with pytest.raises(SystemExit, match="first_step_scale=0: "):
        tune(config, path, "first_step_scale=1,0", shapes, report=early.append)
    assert early == []  # every value is checked before the first evaluation runs
    with pytest.raises(SystemExit, match="expected NAME=V1,V2"):
        tune(config, path, "first_step_scale", shapes)
    with pytest.raises(SystemExit, match="validation.slices 'axial:4' is not one of evaluate.settings"):
        tune(dict(config, validation=dict(config["validation"], slices="axial:4")), path, "first_step_scale=1", shapes)


def test_the_whole_protocol_records_ours_after_the_default_steps(tmp_path):
    """Where a setting runs the whole protocol (trajectory, convergence), ours is also recorded
    after the card's default steps when the step schedule skips them (4 here, between 3 and 5),
    and that is what the tables report as ours after the default steps."""
    from training.evaluate import STEP_SCHEDULE, _at_step, evaluate_settings

    config = small_config(**{"maml.iterations": 1, "adaptation.steps": 4, "evaluate.settings": ["sagittal:6"],
                             "evaluate.trajectory_settings": ["sagittal:6"], "evaluate.converge.max_steps": 6,
                             "evaluate.steps": [1]})
    prior = load_prior(train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4)))
    assert prior.default_steps == 4 and 4 not in STEP_SCHEDULE
    rows = evaluate_settings(shapes_from_family(1, seed=3), ["sagittal:6"], {"maml": prior}, config,
                             torch.device("cpu"), "protocol")
    ours = {r["steps"]: r for r in rows if r["method"] == "maml" and r["steps"] > 0}
    assert {1, 2, 3, 4, 5} <= set(ours)
    assert _at_step(rows, "maml", "sagittal:6", 4) == [ours[4]["dice"]]


def test_evaluate_and_tune_measure_the_cards_interpolation_as_reconstruct_applies_it(tmp_path):
    """A card with interpolation_weight: evaluate adds "Ours + interpolation" after the default
    steps where parallel planes are drawn (not for single planes), beside the network alone;
    the tables and summary carry it, and tune scores what `reconstruct` returns."""
    from MetaShapeReconLib.pipeline import dice, reconstruct

    from training.evaluate import evaluate_settings, setting_planes, write_results
    from training.tune import tune
    from training.validate import sparse_input

    config = small_config(**{"maml.iterations": 2, "validation.slices": "sagittal:6",
                             "evaluate.settings": ["sagittal:6", "orthogonal"]})
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    prior = load_prior(path)
    card = json.loads(json.dumps(prior.card))
    card.setdefault("adaptation", {})["interpolation_weight"] = 12.0
    weighted = prior.with_card(card)
    shapes = shapes_from_family(2, seed=5)
    rows = evaluate_settings(shapes, ["sagittal:6", "orthogonal"], {"maml": weighted}, config,
                             torch.device("cpu"), "interpolation")
    default = weighted.default_steps
    added = [r for r in rows if r["method"] == "maml_interpolated"]
    assert sorted((r["shape"], r["setting"], r["steps"]) for r in added) == sorted(
        (s.name, "sagittal:6", default) for s in shapes)
    # the same output as reconstruct's, on the planes evaluate drew
    planes = setting_planes("sagittal:6", shapes[0], np.random.default_rng(int(config["seed"])))
    (axis, indices), = planes.items()
    product = reconstruct(sparse_input(shapes[0].mask, planes), shapes[0].geometry, weighted,
                          slices=f"{'ijk'[axis]}:6:{int(indices[0])}", device="cpu")
    assert product.report["interpolation"]["logits_per_mm"] == pytest.approx(12.0 * (8 / 6) ** 4)
    first = next(r for r in added if r["shape"] == shapes[0].name)
    assert first["dice"] == pytest.approx(dice(product.labels, shapes[0].mask), abs=0.01)

    out = tmp_path / "evaluation"
    out.mkdir()

    write_results(str(out), rows, [], config, {"maml": weighted}, argparse.Namespace(prior=path, out=str(out)))
    table = (out / "results.md").read_text()
    assert f"Ours {default} steps + interpolation" in table and "`interpolation_weight` 12.0" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["settings"]["sagittal:6"]) >= {"ours_default_steps", "ours_interpolated"}
    assert "ours_interpolated" not in summary["settings"]["orthogonal"]

    plain, with_interpolation = tune(dict(config, precision="float32"), path, "interpolation_weight=0,12", shapes)
    network_alone = np.mean([r["dice"] for r in rows if r["method"] == "maml" and r["setting"] == "sagittal:6"
                             and r["steps"] == default])
    assert plain["settings"]["sagittal:6"]["dice"] == pytest.approx(network_alone, abs=1e-6)
    assert with_interpolation["settings"]["sagittal:6"]["dice"] == pytest.approx(
        np.mean([r["dice"] for r in added]), abs=1e-6)
    assert with_interpolation["settings"]["orthogonal"] == plain["settings"]["orthogonal"]


def test_a_continued_run_validates_with_its_own_reconstruction_settings(tmp_path):
    """`maml.init`: the new run's card (what validation reconstructs with) takes this config's context."""
    shapes = shapes_from_family(4)
    first = train_maml(small_config(**{"maml.iterations": 1}), str(tmp_path / "first"), shapes=shapes)
    assert load_prior(first).adaptation["context_sampling"] == "uniform"
    config = small_config(**{"maml.iterations": 1, "maml.init": first, "adaptation.context_points": 2048,
                             "adaptation.context_sampling": "balanced"})
    continued = load_prior(train_maml(config, str(tmp_path / "continued"), shapes=shapes))
    assert continued.adaptation["context_sampling"] == "balanced"
    assert continued.adaptation["context_points"] == 2048
    assert continued.card["training"]["initialised_from"]["path"] == first


def test_export_keeps_the_context_sampling_the_prior_was_trained_with(tmp_path):
    config = small_config(**{"maml.iterations": 1, "adaptation.context_sampling": "balanced"})
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    from training.export import export_prior

    other = small_config(**{"adaptation.context_sampling": "uniform",  # a config that disagrees
                            "adaptation.auto.lr": 3e-5})  # and a tuned Adam step, which the card takes
    with open(export_prior(other, path, "exported", None, str(tmp_path / "priors"))) as handle:
        card = json.load(handle)
    assert card["meta_training"]["context_sampling"] == "balanced"
    assert card["adaptation"]["context_sampling"] == "balanced"
    assert card["adaptation"]["auto"] == {"optimizer": "adam", "lr": 3e-5, "patience": 10, "max_steps": 1000}


def test_a_run_continues_only_with_the_network_and_frame_it_was_trained_with(tmp_path):
    config = small_config(**{"maml.iterations": 1})
    shapes = shapes_from_family(4)
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes)
    wider = small_config(**{"maml.iterations": 2, "frame.extent_mm": 64})
    with pytest.raises(SystemExit, match=r"frame extent_mm \[48.0, 48.0, 48.0\] differs .*: resume it with the config"):
        train_maml(wider, str(tmp_path / "run"), resume=True, shapes=shapes)
    with pytest.raises(SystemExit, match="architecture hidden_features 128 differs .*: continue it with the config"):
        train_maml(small_config(**{"model.hidden_features": 64, "maml.init": path}), str(tmp_path / "other"),
                   shapes=shapes)
    assert not os.path.exists(tmp_path / "other")


def test_export_refuses_another_priors_evaluation_and_a_name_that_is_a_path(tmp_path):
    from training.export import export_prior

    config = small_config(**{"maml.iterations": 1})
    path = train_maml(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    results = tmp_path / "evaluation"
    results.mkdir()
    (results / "summary.json").write_text(json.dumps({"default_steps": 5, "settings": {},
                                                      "prior": {"name": "kidney", "weights_sha256": "0" * 64}}))
    with pytest.raises(SystemExit, match="an evaluation of another prior \\('kidney'"):
        export_prior(config, path, "mine", str(results), str(tmp_path / "priors"))
    for name in ("../escaped", "", ".hidden"):
        with pytest.raises(SystemExit, match="expected a plain file name"):
            export_prior(config, path, name, None, str(tmp_path / "priors"))
    assert not os.path.exists(tmp_path / "priors") and not os.path.exists(tmp_path / "escaped.json")
    from training.autodecoder import load_autodecoder

    with pytest.raises(SystemExit, match="is not an auto-decoder"):
        load_autodecoder(path)


@pytest.mark.slow
def test_smoke_run_every_method_on_real_kidneys(data_dir, tmp_path):
    """prepare -> train (maml, pretrain, autodecoder) -> evaluate -> export on three KiTS19 cases."""
    kits = os.path.join(data_dir, "kits19")
    if not os.path.isdir(kits):
        pytest.skip(f"{kits} is absent")
    cache, split = tmp_path / "cache", tmp_path / "split.json"
    common = ["--config", os.path.join(ROOT, "training", "configs", "kidney.yaml"),
              "--set", f"data.root={kits}", "--set", f"data.cache={cache}", "--set", f"data.split_file={split}",
              "--set", "data.max_cases=3", "--set", 'data.split={"test": 0.34, "val": 0.0, "folds": 0}',
              "--set", "tasks.context_points=256", "--set", "tasks.target_points=256",
              "--set", "maml.iterations=2", "--set", "pretrain.iterations=2", "--set", "autodecoder.iterations=2",
              "--set", "validation.every=0", "--set", "checkpoint.every=1",
              "--set", "autodecoder.batch_shapes=2", "--set", "adaptation.context_points=2048"]

    def run(*args):
        done = subprocess.run([sys.executable, "-m", "training", *args, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, METASHAPERECON_NO_PROGRESS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run("prepare")
    for method in ("maml", "pretrain", "autodecoder"):
        run("train", "--method", method, "--out", str(tmp_path / method), "--set", "maml.outer_lr=2e-5")
    bench = run("bench", "--prior", str(tmp_path / "maml" / "checkpoint.safetensors"), "--batches", "2").splitlines()
    assert [line.split(" | ")[0] for line in bench if line[:3] in ("| 1", "| 2")] == ["| 1", "| 2"]
    assert any(line.startswith("median: float32 ") for line in bench)
    out = tmp_path / "evaluation"
    run("evaluate", "--prior", str(tmp_path / "maml" / "checkpoint.safetensors"),
        "--pretrain", str(tmp_path / "pretrain" / "checkpoint.safetensors"),
        "--autodecoder", str(tmp_path / "autodecoder" / "checkpoint.safetensors"),
        "--set", 'evaluate.settings=["sagittal:16", "orthogonal"]', "--set", "evaluate.converge.max_steps=3",
        "--set", 'evaluate.trajectory_settings=["sagittal:16"]', "--set", "precision=float32",
        "--out", str(out))
    table = (out / "results.md").read_text()
    assert "network in float32" in table
    for name in ("Ours (meta-learned)", "B.(ii) pre-trained", "B.(i) auto-decoder", "Fill between slices",
                 "Signed-distance interpolation", "Table 1", "Table 2", "Table 5", "Table 6"):
        assert name in table
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) > 10
    assert rows[0].endswith(",precision") and any(row.endswith(",float32") for row in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["settings"]) == {"sagittal:16", "orthogonal"}
    assert summary["precision"] == "float32"
    assert (out / "dice_time.png").stat().st_size > 1000
    card = run("export", "--prior", str(tmp_path / "maml" / "checkpoint.safetensors"), "--name", "smoke",
               "--results", str(out), "--out", str(tmp_path / "priors")).strip()
    exported = json.loads(open(card).read())
    assert exported["license"] == "CC BY-NC-SA 4.0" and "KiTS19" in exported["attribution"]
    assert exported["meta_training"]["outer_lr"] == 2e-5  # the run's settings, not the export command's
    assert exported["meta_training"]["precision"] == ("bfloat16" if native_bfloat16() else "float32")
    assert exported["results"]["settings"]["orthogonal"]

    # the prior alone evaluated again: the baselines' rows come from the first run, unchanged
    again = tmp_path / "again"
    evaluate_prior_only = ["evaluate", "--prior", str(tmp_path / "maml" / "checkpoint.safetensors"),
                           "--reuse", str(out / "results.csv"),
                           "--set", 'evaluate.settings=["sagittal:16", "orthogonal"]',
                           "--set", "evaluate.converge.max_steps=3", "--set", 'evaluate.trajectory_settings=["sagittal:16"]']
    run(*evaluate_prior_only, "--out", str(again))
    table = (again / "results.md").read_text()
    assert "B.(ii) pre-trained" in table and "B.(i) auto-decoder" in table and "carried over" in table
    assert "their seconds were measured there (network in float32)" in table  # as the first run computed
    auto = "bfloat16" if native_bfloat16() else "float32"  # the default: as `reconstruct` resolves it
    assert json.loads((again / "summary.json").read_text())["precision"] == auto
    assert "--reuse" in table  # the command that reproduces it, and the one that measured the baselines
    assert "That evaluation: `python -m training evaluate" in table and "--pretrain" in table

    def baseline_rows(folder):
        lines = (folder / "results.csv").read_text().splitlines()
        return sorted(line for line in lines if line.startswith(("pretrain,", "autodecoder,")))

    assert baseline_rows(again) == baseline_rows(out) and baseline_rows(out)
    # rows from other inputs are refused and nothing is written: Fill between slices disagrees
    # (other planes), or the earlier run had other settings
    tampered = tmp_path / "tampered.csv"
    tampered.write_text("\n".join(line.replace(line.split(",")[4], "0.5") if line.startswith("fill_between_slices,")
                                   else line for line in (out / "results.csv").read_text().splitlines()))
    for reuse, extra, message in ((tampered, [], "the sparse inputs differ"),
                                  (out / "results.csv", ["--set", 'evaluate.settings=["sagittal:16"]'],
                                   "other shapes or settings")):
        arguments = [a if a != str(out / "results.csv") else str(reuse) for a in evaluate_prior_only]
        refused = subprocess.run([sys.executable, "-m", "training", *arguments, *extra, "--out",
                                  str(tmp_path / "refused"), *common], cwd=ROOT, capture_output=True, text=True,
                                 timeout=600, env=dict(os.environ, METASHAPERECON_NO_PROGRESS="1"))
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "refused" / "results.md").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maml", "pretrain", "autodecoder"])
def test_torchrun_data_parallel_training(tmp_path, method):
    """Two processes (Gloo on the CPU) train together; rank 0 writes the log and checkpoint."""
    common = ["--config", os.path.join(ROOT, "training", "configs", "synthetic.yaml"),
              "--set", f"data.cache={tmp_path / 'cache'}", "--set", "data.synthetic.count=6",
              "--set", "frame.extent_mm=48", "--set", "tasks.context_points=128", "--set", "tasks.target_points=128",
              "--set", "maml.iterations=2", "--set", "maml.inner_steps=1", "--set", "validation.every=0",
              "--set", "pretrain.iterations=2", "--set", "autodecoder.iterations=2", "--set", "autodecoder.batch_shapes=2",
              "--set", "threads=1"]
    env = dict(os.environ, METASHAPERECON_NO_PROGRESS="1")
    prepared = subprocess.run([sys.executable, "-m", "training", "prepare", *common], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "training", "train", "--method", method, "--out", str(tmp_path / "run"), *common],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # header + one row per iteration, written once (rank 0)
    card = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert card["training"]["iterations"] == 2 and card["training"]["method"] == method


AVERAGING_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from training.maml import average_gradients_across_processes

def run(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parameter = torch.nn.Parameter(torch.zeros(3))
    parameter.grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # each process its own gradient
    average_gradients_across_processes(torch.optim.Adam([parameter]))
    with open(os.path.join(out, f"{rank}.json"), "w") as handle:
        json.dump(parameter.grad.tolist(), handle)
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def test_data_parallel_processes_step_on_the_mean_of_their_gradients(tmp_path):
    """What makes two torchrun processes train one prior: before each outer step every process
    holds the mean of all processes' gradients (Gloo, as on a CPU)."""
    import socket

    script = tmp_path / "average.py"
    script.write_text(AVERAGING_SCRIPT)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, str(script), str(port), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [ROOT, os.path.join(ROOT, "MetaShapeRecon"), os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [1.5, 3.0, 4.5]


def test_publish_gathers_evaluations_into_results_md(tmp_path):
    from training.publish import publish

    folder = tmp_path / "evaluation"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"default_steps": 5, "settings": {
        "sagittal:8": {"ours_1_step": {"dice": 0.81, "asd_mm": 1.5}, "ours_default_steps": {"dice": 0.93, "asd_mm": 0.9},
                       "fill_between_slices": {"dice": 0.96, "asd_mm": 0.7}}}}))
    (folder / "results.md").write_text("# Evaluation: kidney\n\n## Table 2 — Dice\n\n![plot](dice_time.png)\n")
    (folder / "dice_time.png").write_bytes(b"png")
    path = publish([f"kidney={folder}"], str(tmp_path / "docs"))
    text = open(path).read()
    assert "| kidney | sagittal:8 | 0.810 / 1.50 | 0.930 / 0.90 (5 steps) | n/a | 0.960 / 0.70 | n/a |" in text
    assert "### Table 2" in text and "(results_kidney_dice_time.png)" in text
    assert (tmp_path / "docs" / "results_kidney_dice_time.png").read_bytes() == b"png"

    # another prior published later: the kidney keeps its rows and section; re-publishing the
    # kidney alone replaces its own and keeps the other's
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"default_steps": 3, "settings": {
        "orthogonal": {"ours_1_step": {"dice": 0.5, "asd_mm": 4.0}}}}))
    (other / "results.md").write_text("# Evaluation: pancreas\n\nsection of the pancreas\n")
    publish([f"pancreas={other}"], str(tmp_path / "docs"))
    both = open(path).read()
    assert "| kidney | sagittal:8 | 0.810 / 1.50 |" in both and "| pancreas | orthogonal | 0.500 / 4.00 |" in both
    assert both.index("## kidney") < both.index("## pancreas") and "section of the pancreas" in both
    (folder / "summary.json").write_text((folder / "summary.json").read_text().replace("0.81", "0.84"))
    publish([f"kidney={folder}"], str(tmp_path / "docs"))
    again = open(path).read()
    assert "| kidney | sagittal:8 | 0.840 / 1.50 |" in again and "0.810" not in again
    assert again.count("## kidney") == 1 and "section of the pancreas" in again
    assert again.index("| kidney |") < again.index("| pancreas |")
    publish([], str(tmp_path / "docs"))
    assert open(path).read() == again  # nothing new: the file as it was

    # a row published before the interpolation column gets an n/a cell in it
    old = again.replace("| kidney | sagittal:8 | 0.840 / 1.50 | 0.930 / 0.90 (5 steps) | n/a | 0.960 / 0.70 | n/a |",
                        "| kidney | sagittal:8 | 0.840 / 1.50 | 0.930 / 0.90 (5 steps) | 0.960 / 0.70 | n/a |")
    assert old != again
    open(path, "w").write(old)
    publish([], str(tmp_path / "docs"))
    assert open(path).read() == again


def test_an_unknown_precision_is_refused_when_the_config_loads():
    assert load_config(None, ["precision=bfloat16"])["precision"] == "bfloat16"
    with pytest.raises(SystemExit, match="precision 'half': expected auto, float32, bfloat16"):
        load_config(None, ["precision=half"])
    assert load_config(None, [])["maml"]["precision"] == "auto"
    with pytest.raises(SystemExit, match="maml.precision 'fp8': expected auto, float32, bfloat16"):
        load_config(None, ["maml.precision=fp8"])


def test_train_refuses_to_overwrite_a_run_without_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.safetensors").write_bytes(b"earlier run")
    done = subprocess.run([sys.executable, "-m", "training", "train", "--config",
                           os.path.join(ROOT, "training", "configs", "synthetic.yaml"), "--out", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "already holds a training run: add --resume" in done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.safetensors"]
    assert (run_dir / "checkpoint.safetensors").read_bytes() == b"earlier run"


def _train_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, METASHAPERECON_NO_PROGRESS="1"))


def test_unknown_config_keys_are_refused_naming_the_key(tmp_path):
    """A misspelt key (YAML or --set, in a section or at the top) is refused, with the close
    matches, instead of training with the default; every bundled config still loads."""
    for name in sorted(os.listdir(os.path.join(ROOT, "training", "configs"))):
        load_config(os.path.join(ROOT, "training", "configs", name))
    with pytest.raises(SystemExit, match="unknown config key 'maml.iteratons': did you mean maml.iterations"):
        load_config(None, ["maml.iteratons=5"])
    with pytest.raises(SystemExit, match="unknown config key 'mamll': did you mean maml"):
        load_config(None, ["mamll.iterations=3"])
    with pytest.raises(SystemExit, match="unknown config key 'tasks.target_mix.unifrm'"):
        load_config(None, ['tasks.target_mix={"unifrm": 0.4, "foreground": 0.3, "boundary": 0.3}'])
    typo = tmp_path / "typo.yaml"
    typo.write_text("validaton: {every: 5}\n")
    with pytest.raises(SystemExit, match="unknown config key 'validaton': did you mean validation"):
        load_config(str(typo))
    # what export reads, free-form values and the synthetic family are settings too
    config = load_config(None, ["license=CC BY 4.0", "training_note=2 cores", 'tasks.planes=[{"kind": "orthogonal", '
                                '"weight": 1, "anything": 2}]', "data.labels=[1, 2]", "data.synthetic.count=3"])
    assert config["license"] == "CC BY 4.0" and config["tasks"]["planes"][0]["anything"] == 2
    assert config["data"]["synthetic"]["count"] == 3
    assert all(config[k] == "" for k in ("attribution", "dataset_name", "description"))


def test_wrong_values_are_refused_in_one_line_and_write_nothing(tmp_path):
    for overrides, message in ((["maml.iterations=abc"], "maml.iterations 'abc': expected a whole number"),
                               (["maml.iterations=2.5"], "maml.iterations 2.5: expected a whole number"),
                               (["maml.iterations.x=3"], "maml.iterations is a single value, not a section"),
                               (["maml=5"], "maml 5: expected a section of settings"),
                               (["maml.learn_inner_lr=1"], "expected true or false"),
                               (["checkpoint.every=0"], "checkpoint.every 0: expected a count >= 1"),
                               (["maml.meta_batch=0"], "maml.meta_batch 0: expected a count >= 1"),
                               (["maml.iterations=0"], "maml.iterations 0: expected a count >= 1")):
        with pytest.raises(SystemExit, match=message):
            load_config(None, overrides)
    # floats take whole numbers, None defaults anything, names that read as numbers stay text
    config = load_config(None, ["maml.outer_lr=1", "adaptation.later_context_points=96", "name=2024",
                                "data.split_file=", "frame.extent_mm=[64, 48, 40]", "validation.every=0"])
    assert config["name"] == "2024" and config["data"]["split_file"] == "" and config["frame"]["extent_mm"] == [64, 48, 40]
    # null for a path is none (not a file named "null"); YAML's 3e-5 (read as text) is a number
    assert load_config(None, ["maml.init=null"])["maml"]["init"] == ""
    written = tmp_path / "rate.yaml"
    written.write_text("maml: {outer_lr: 3e-5}\n")
    assert load_config(str(written))["maml"]["outer_lr"] == 3e-5
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    with pytest.raises(SystemExit, match="expected a mapping of settings"):
        load_config(str(listed))

    out = tmp_path / "run"
    synthetic = os.path.join(ROOT, "training", "configs", "synthetic.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("maml: {iterations: [\n")
    for args, message in ((["--config", synthetic, "--set", "checkpoint.every=0"], "checkpoint.every 0"),
                          (["--config", str(tmp_path / "absent.yaml")], "No such file or directory"),
                          (["--config", str(broken)], "python -m training train: while parsing")):
        done = _train_cli("train", "--out", str(out), *args)
        assert done.returncode != 0 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not out.exists()


@pytest.fixture
def synthetic_cache(tmp_path):
    """A synthetic family of 6 shapes prepared as `prepare` does, and a config for it."""
    from training.prepare import prepare

    config = load_config(None, ["name=test", "data.layout=synthetic", f"data.cache={tmp_path / 'cache'}",
                                "data.synthetic.count=6", "frame.extent_mm=32", "data.margin_mm=4",
                                'data.split={"test": 0.17, "val": 0.17, "folds": 0}', "tasks.context_points=128",
                                "tasks.target_points=128", "maml.inner_steps=1", "maml.meta_batch=2",
                                "validation.every=0", "model.hidden_features=16", "model.linear_layers=3",
                                "adaptation.context_points=256", "adaptation.steps=1"])
    prepare(config, workers=1)
    return config


def test_a_missing_prior_is_one_line_and_leaves_no_run_folder(tmp_path, synthetic_cache):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(synthetic_cache))
    out = tmp_path / "run"
    done = _train_cli("train", "--config", str(config), "--out", str(out),
                      "--set", f"maml.init={tmp_path / 'absent.safetensors'}")
    assert done.returncode != 0 and "prior file not found" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()
    from training.cli import main

    with pytest.raises(SystemExit, match="prior file not found"):
        main(["tune", "--config", str(config), "--prior", str(tmp_path / "absent.safetensors"),
              "--setting", "steps=1,2"])


def test_a_split_naming_cases_missing_from_the_cache_is_refused(tmp_path, synthetic_cache):
    split = json.loads(open(os.path.join(synthetic_cache["data"]["cache"], "split.json")).read())
    split["val"] = split["val"] + ["case_not_prepared"]
    (tmp_path / "split.json").write_text(json.dumps(split))
    config = dict(synthetic_cache, data=dict(synthetic_cache["data"], split_file=str(tmp_path / "split.json")))
    with pytest.raises(SystemExit, match="1 case\\(s\\) of the split are not in the cache .*: case_not_prepared"):
        train_maml(dict(config, maml=dict(config["maml"], iterations=1)), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_folder_with_only_logs_holds_a_run_and_resume_takes_its_method(tmp_path):
    synthetic = os.path.join(ROOT, "training", "configs", "synthetic.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.csv").write_text("iteration,loss\n1,0.5\n")  # killed before its first checkpoint
    done = _train_cli("train", "--config", synthetic, "--out", str(run_dir))
    assert done.returncode != 0 and "already holds a training run: add --resume" in done.stderr
    assert (run_dir / "log.csv").read_text() == "iteration,loss\n1,0.5\n"
    (run_dir / "checkpoint.json").write_text(json.dumps({"training": {"method": "pretrain"}}))
    done = _train_cli("train", "--config", synthetic, "--out", str(run_dir), "--resume")
    assert done.returncode != 0 and "holds a run of --method pretrain: resume it with --method pretrain" in done.stderr
    (run_dir / "checkpoint.json").write_text(json.dumps({"format": "metashaperecon-autodecoder", "training": {}}))
    done = _train_cli("train", "--config", synthetic, "--out", str(run_dir), "--resume", "--method", "pretrain")
    assert done.returncode != 0 and "holds a run of --method autodecoder" in done.stderr


def _iterations(path):
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]]


def test_resume_cuts_the_logs_back_to_the_checkpoint_and_keeps_the_better_best(tmp_path):
    """Killed at iteration 3 with the checkpoint at 2: the rows after 2 are written once, and a
    best.safetensors better than the checkpoint's best (saved at 3) is not replaced by a worse one."""
    shapes = shapes_from_family(6)
    config = small_config(**{"maml.iterations": 2, "validation.every": 1, "validation.cases": 2,
                             "adaptation.steps": 1, "checkpoint.every": 2})
    run_dir = tmp_path / "run"
    train_maml(config, str(run_dir), shapes=shapes[:4], val_shapes=shapes[4:])
    assert _iterations(run_dir / "log.csv") == [1, 2]
    with open(run_dir / "log.csv", "a") as handle:  # what the killed run wrote after the checkpoint
        handle.write("3,9,9,9,1,0\n")
    with open(run_dir / "validation.csv", "a") as handle:
        handle.write("3,sagittal:8,1,0.999,1\n3,sagittal:8,1,0.999,1\n")
    card = json.loads((run_dir / "best.json").read_text())
    card["training"]["validation_dice_1_step"] = 0.999
    (run_dir / "best.json").write_text(json.dumps(card))
    best_weights = (run_dir / "best.safetensors").read_bytes()

    train_maml(dict(config, maml=dict(config["maml"], iterations=4)), str(run_dir), resume=True,
               shapes=shapes[:4], val_shapes=shapes[4:])
    assert _iterations(run_dir / "log.csv") == [1, 2, 3, 4]
    assert "9,9,9" not in (run_dir / "log.csv").read_text()
    validated = _iterations(run_dir / "validation.csv")
    assert sorted(set(validated)) == [1, 2, 3, 4] and validated.count(3) == validated.count(1)
    assert "0.999" not in (run_dir / "validation.csv").read_text()
    assert (run_dir / "best.safetensors").read_bytes() == best_weights


def test_resume_follows_the_weights_when_the_optimizer_state_trails_them(tmp_path):
    """A kill between the checkpoint's prior and its optimiser state: the run continues after the
    weights' iteration (not the optimiser's), so no iteration is trained twice."""
    shapes = shapes_from_family(4)
    config = small_config(**{"maml.iterations": 1, "checkpoint.every": 1})
    run_dir = tmp_path / "run"
    train_maml(config, str(run_dir), shapes=shapes)
    trailing = (run_dir / "checkpoint.optimizer.safetensors").read_bytes()  # iteration 1
    train_maml(dict(config, maml=dict(config["maml"], iterations=2)), str(run_dir), resume=True, shapes=shapes)
    before = (run_dir / "log.csv").read_text().splitlines()
    (run_dir / "checkpoint.optimizer.safetensors").write_bytes(trailing)  # weights at 2, optimiser at 1
    path = train_maml(dict(config, maml=dict(config["maml"], iterations=3)), str(run_dir), resume=True, shapes=shapes)
    after = (run_dir / "log.csv").read_text().splitlines()
    assert after[:3] == before and _iterations(run_dir / "log.csv") == [1, 2, 3]
    assert load_prior(path).card["training"]["iterations"] == 3


@pytest.mark.parametrize("method", ["pretrain", "autodecoder"])
def test_baselines_resume_without_duplicating_log_rows(tmp_path, method):
    from training.autodecoder import train_autodecoder
    from training.pretrain import train_pretrain

    train = train_pretrain if method == "pretrain" else train_autodecoder
    shapes = shapes_from_family(4)
    config = small_config(**{f"{method}.iterations": 2, "checkpoint.every": 2, "autodecoder.batch_shapes": 2,
                             "autodecoder.latent_size": 8, "autodecoder.hidden_features": 16})
    run_dir = tmp_path / "run"
    train(config, str(run_dir), shapes=shapes)
    with open(run_dir / "log.csv", "a") as handle:
        handle.write("3,9,1\n")
    train(dict(config, **{method: dict(config[method], iterations=3)}), str(run_dir), resume=True, shapes=shapes)
    assert _iterations(run_dir / "log.csv") == [1, 2, 3] and "3,9,1" not in (run_dir / "log.csv").read_text()
    assert json.loads((run_dir / "checkpoint.json").read_text())["training"]["iterations"] == 3


def test_save_autodecoder_keeps_the_earlier_pair_when_saving_fails(tmp_path):
    from training.autodecoder import AutoDecoder, load_autodecoder, save_autodecoder

    model = AutoDecoder(8, 16, 6)
    path = str(tmp_path / "checkpoint.safetensors")
    save_autodecoder(path, model, torch.zeros(2, 8), {"training": {"iterations": 1}})
    weights, card = (tmp_path / "checkpoint.safetensors").read_bytes(), (tmp_path / "checkpoint.json").read_text()
    with pytest.raises(TypeError):
        save_autodecoder(path, model, torch.ones(2, 8), {"training": {"iterations": object()}})  # not JSON
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == weights
    assert (tmp_path / "checkpoint.json").read_text() == card
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "checkpoint.safetensors"]
    assert load_autodecoder(path)[1]["training"]["iterations"] == 1


@pytest.mark.parametrize("method", ["maml", "pretrain", "autodecoder"])
def test_the_progress_bar_is_drawn_at_its_interval_not_every_iteration(tmp_path, monkeypatch, method):
    import io

    from training import autodecoder, maml, pretrain
    from training.progress import progress_bar

    drawn = io.StringIO()
    module = {"maml": maml, "pretrain": pretrain, "autodecoder": autodecoder}[method]
    monkeypatch.delenv("METASHAPERECON_NO_PROGRESS", raising=False)
    # the product's own bar (stderr is no terminal here: its interval for logs), drawn into `drawn`
    monkeypatch.setattr(module, "progress_bar", lambda **kwargs: progress_bar(file=drawn, **dict(kwargs, disable=False)))
    config = small_config(**{f"{method}.iterations": 6, "autodecoder.batch_shapes": 2, "autodecoder.latent_size": 8,
                             "autodecoder.hidden_features": 16})
    train = {"maml": maml.train_maml, "pretrain": pretrain.train_pretrain,
             "autodecoder": autodecoder.train_autodecoder}[method]
    train(config, str(tmp_path / "run"), shapes=shapes_from_family(4))
    text = drawn.getvalue()
    assert "6/6" in text and text.count("\r") <= 3, text  # the first and the last, not one per iteration


def test_cli_help_tune_header_and_prepare_checks(tmp_path, capsys, synthetic_cache):
    from training.cli import main
    from training.prepare import prepare

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--prior runs/kidney/best.safetensors \\\n        --setting first_step_scale" in capsys.readouterr().out
    prior = train_maml(dict(synthetic_cache, maml=dict(synthetic_cache["maml"], iterations=1)), str(tmp_path / "run"))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(synthetic_cache))
    with pytest.raises(SystemExit, match="not one of the prior's adaptation settings"):
        main(["tune", "--config", str(config), "--prior", prior, "--setting", "nope=1,2"])
    assert capsys.readouterr().out == ""  # no table header before the setting is refused

    for overrides, message in ((["data.layout=nope"], "unknown data layout 'nope'; one of .*, synthetic"),
                               (["data.layout=folder", f"data.root={tmp_path / 'absent'}"], "is not a folder")):
        with pytest.raises(SystemExit, match=message):
            prepare(load_config(None, [f"data.cache={tmp_path / 'new_cache'}", *overrides]))
        assert not (tmp_path / "new_cache").exists()
