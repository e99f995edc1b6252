"""The reconstruction pipeline in-process: fitting, observed planes as the only evidence, the
report, progress and cancelling, bad input."""

import numpy as np
import pytest
import torch
from fitted import fitted_sphere_prior, grid_centre, oblique_geometry, quick_prior, single_thread, sphere_case
from MetaShapeReconLib.adaptation import inner_step
from MetaShapeReconLib.errors import Cancelled, InputError
from MetaShapeReconLib.frame import centre_frame
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.pipeline import (
    dice,
    native_bfloat16,
    observed_context,
    reconstruct,
    resolve_device,
    resolve_precision,
    structure_mask,
)
from MetaShapeReconLib.planes import select_planes
from MetaShapeReconLib.prior import check_adaptation, load_prior
from shapes import ellipsoid, interpolated_field, sparse_planes


@pytest.fixture(scope="module")
def small_case():
    """A sparse ellipsoid (every 6th sagittal plane) on a small grid, with a small untrained network
    for tests where the network's answer does not matter."""
    geometry = Geometry.create((30, 24, 20), (1.0, 1.2, 1.5), (-10, 20, 5))
    mask = ellipsoid(geometry, grid_centre(geometry), (13, 9, 8))
    sparse = sparse_planes(mask, 0, 6, 3)
    return sparse, geometry, mask, quick_prior(hidden_features=32, extent_mm=64.0, context_points=1024)


def test_sphere_fitted_from_all_its_planes_on_an_oblique_anisotropic_grid():
    labels, geometry, _, _ = sphere_case()
    prior = load_prior(fitted_sphere_prior())
    assert prior.card["fitted"]["steps"] > 10  # the network was fitted, not drawn at random
    result = reconstruct(labels, geometry, prior, slices="axial:1", device="cpu")
    assert result.geometry == geometry
    assert result.labels.dtype == np.uint8 and result.labels.shape == geometry.size
    report = result.report
    assert report["steps"] == 0
    # the network's own prediction on every voxel (the output itself keeps the drawing)
    assert report["dice_observed_planes"] >= 0.98
    assert report["observed_planes"][0]["axis"] == "axial"
    assert report["observed_planes"][0]["count"] == geometry.size[geometry.patient_axis_order()[2]]
    np.testing.assert_array_equal(result.labels, labels)


@pytest.mark.slow
def test_untrained_siren_adapted_on_every_8th_sagittal_plane_recovers_the_ellipsoid():
    geometry = Geometry.create((48, 36, 36), (1.0, 1.0, 1.0), (30.0, -60.0, 90.0))
    mask = ellipsoid(geometry, grid_centre(geometry) + 0.3, (20, 12, 10))
    sparse = sparse_planes(mask, 0, 8, 4)
    prior = quick_prior(extent_mm=128.0, lr=3e-4, context_points=4096)  # the product's 7 x 128 SIREN
    assert prior.model.architecture()["hidden_features"] == 128
    with single_thread():
        result = reconstruct(sparse, geometry, prior, steps="auto", slices="auto", device="cpu")
    report = result.report
    assert report["steps_mode"] == "auto" and 20 <= report["steps"] <= 1000
    assert [p["indices"] for p in report["observed_planes"]] == [[i for i in range(4, 48, 8) if mask[i].any()]]
    assert dice(result.labels, mask) >= 0.9
    between = np.ones(mask.shape, bool)
    between[4::8] = False
    assert dice(result.labels[between], mask[between]) >= 0.88  # not just the drawing copied back
    assert report["loss"][-1] < report["loss"][0]


def test_observed_context_is_the_whole_observed_planes_and_nothing_else(small_case):
    sparse, geometry, mask, prior = small_case
    planes = select_planes("auto", sparse != 0, geometry)
    assert list(planes) == [0] and list(planes[0]) == [3, 9, 15, 21, 27]
    frame = centre_frame(prior.frame_spec, geometry, sparse != 0, planes)
    coords, target = observed_context(sparse != 0, geometry, planes, frame)
    ijk = geometry.physical_to_index(frame.to_physical(coords))
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)
    ijk = np.round(ijk).astype(int)
    assert set(ijk[:, 0]) == {3, 9, 15, 21, 27}  # only voxels of observed planes
    assert len(ijk) == 5 * 24 * 20 == len({tuple(v) for v in ijk})  # all of them (the frame holds the grid), once
    np.testing.assert_array_equal(target, sparse[tuple(ijk.T)] != 0)
    assert 0 < target.mean() < 1  # background of the planes is evidence too


def test_crossing_planes_count_their_shared_voxels_once():
    geometry = Geometry.create((20, 20, 20), (1.0, 1.0, 1.0))
    mask = ellipsoid(geometry, grid_centre(geometry), (8.5, 8.5, 8.5))
    sparse = (sparse_planes(mask, 0, 5, 2) > 0) | (sparse_planes(mask, 2, 5, 4) > 0)
    planes = select_planes("auto", sparse, geometry)
    assert {a: list(v) for a, v in planes.items()} == {0: [2, 7, 12, 17], 2: [4, 9, 14]}
    frame = centre_frame(quick_prior(extent_mm=64.0).frame_spec, geometry, sparse, planes)
    coords, _ = observed_context(sparse, geometry, planes, frame)
    assert len(coords) == 4 * 400 + 3 * 400 - 4 * 3 * 20


def test_frame_is_centred_on_the_observed_foreground(small_case):
    sparse, geometry, _, prior = small_case
    planes = select_planes("sagittal:6:3", sparse != 0, geometry)
    frame = centre_frame(prior.frame_spec, geometry, sparse != 0, planes)
    points = geometry.index_to_physical(np.argwhere(sparse))
    np.testing.assert_allclose(frame.centre, (points.min(axis=0) + points.max(axis=0)) / 2)
    assert frame.half_extent == (32.0, 32.0, 32.0)


def test_report_holds_what_the_contract_asks(small_case):
    sparse, geometry, _, prior = small_case
    result = reconstruct(sparse, geometry, prior, steps=2, device="cpu")
    report = result.report
    for key in ("prior", "steps", "device", "observed_planes", "timings_s", "dice_observed_planes"):
        assert key in report
    assert report["prior"] == "test-untrained" and report["steps"] == 2 and report["device"].startswith("cpu")
    assert report["observed_planes"] == [{"axis": "sagittal", "image_axis": "i", "count": 5,
                                          "indices": [3, 9, 15, 21, 27], "pattern": "sagittal:6:3"}]
    assert {"adapt", "evaluate"} <= set(report["timings_s"])
    assert all(isinstance(v, float) and v >= 0 for v in report["timings_s"].values())
    assert 0.0 <= report["dice_observed_planes"] <= 1.0
    assert len(report["loss"]) == 2 and all(np.isfinite(report["loss"]))
    assert report["output"]["size"] == list(geometry.size) and report["output"]["keeps_drawn_planes"]
    removed = report["output"]["unsupported_parts_removed"]
    assert set(removed) == {"parts", "voxels"} and removed["parts"] >= 0 and removed["voxels"] >= removed["parts"]
    import json

    json.dumps(report)  # plain JSON types only


def test_output_keeps_the_drawing_on_observed_planes(small_case):
    sparse, geometry, _, prior = small_case
    result = reconstruct(sparse, geometry, prior, steps=0, device="cpu")
    np.testing.assert_array_equal(result.labels[3::6], sparse[3::6] != 0)
    finer = reconstruct(sparse, geometry, prior, steps=0, device="cpu", output_geometry=geometry.resampled(0.5))
    assert finer.labels.shape == (60, 58, 60) and not finer.report["output"]["keeps_drawn_planes"]


def test_an_output_grid_on_the_drawings_lattice_keeps_the_drawing_where_it_covers_it(small_case):
    """A crop or an extension of the drawing's grid (same voxels, other extent): the drawing stands
    on the planes inside it, voxel for voxel the reconstruction on the drawing's own grid."""
    sparse, geometry, _, prior = small_case
    whole = reconstruct(sparse, geometry, prior, steps=1, device="cpu")
    for first, size in (((7, 4, 3), (20, 16, 14)), ((-5, -3, -2), (40, 30, 26))):  # a crop, an extension
        grid = Geometry.create(size, geometry.spacing, geometry.index_to_physical([first])[0], geometry.direction)
        assert grid.lattice_offset(geometry) == first
        result = reconstruct(sparse, geometry, prior, steps=1, device="cpu", output_geometry=grid)
        assert result.report["output"]["keeps_drawn_planes"]
        low = np.maximum(first, 0)
        high = np.minimum(np.add(first, size), geometry.size)
        inside = tuple(slice(int(a - f), int(b - f)) for a, b, f in zip(low, high, first))
        drawn = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        np.testing.assert_array_equal(result.labels[inside], whole.labels[drawn])
    elsewhere = Geometry.create((20, 16, 14), geometry.spacing, geometry.index_to_physical([[0.5, 0, 0]])[0],
                                geometry.direction)
    assert elsewhere.lattice_offset(geometry) is None
    assert not reconstruct(sparse, geometry, prior, steps=1, device="cpu",
                           output_geometry=elsewhere).report["output"]["keeps_drawn_planes"]


def test_beyond_the_drawings_grid_the_planes_support_nothing():
    """An output grid extending the drawing's: a part of the network's that touches the drawn plane
    only where it runs on beyond the drawing's grid is not supported, inside the grid or out."""
    from MetaShapeReconLib.pipeline import _finish_on_lattice, _overlap

    drawing = np.zeros((10, 10, 10), np.uint8)
    drawing[5, 3:7, 3:7] = 1
    planes = {0: np.array([5])}
    output = np.zeros((10, 20, 10), np.uint8)  # j from -10 to 9 of the drawing's grid
    output[4:7, 13:17, 3:7] = 1  # the drawn structure, a voxel thick either side of its plane
    output[4:7, 8:12, 0:2] = 1  # straddles the grid's edge at j = 0, crosses plane i = 5 on both sides
    output[4:7, 2:5, 4:7] = 1  # wholly beyond the grid
    offset = (0, -10, 0)
    _, parts, voxels = _finish_on_lattice(output, drawing, planes, offset, _overlap(offset, output.shape, drawing.shape))
    assert (parts, voxels) == (2, 20 + 27)  # 4 of the straddling part's 24 lie on the drawn plane: cleared first
    assert output[4:7, 13:17, 3:7].all() and output.sum() == 48


def test_progress_receives_step_total_loss_through_adaptation_and_evaluation(small_case):
    sparse, geometry, _, prior = small_case
    calls = []
    reconstruct(sparse, geometry, prior, steps=3, device="cpu", progress=lambda *a: calls.append(a) or True)
    steps = [c[0] for c in calls]
    totals = {c[1] for c in calls}
    assert len(totals) == 1 and steps[-1] == totals.pop()
    assert steps == sorted(steps) and steps[0] == 1
    assert [type(c[2]) for c in calls[:3]] == [float] * 3  # the loss of each adaptation step
    assert len(calls) > 3  # and evaluation reports too


def test_progress_in_auto_mode_ends_at_its_total(small_case):
    sparse, geometry, _, _ = small_case
    prior = quick_prior(hidden_features=32, extent_mm=64.0, context_points=512, steps=1, max_steps=15)
    calls = []
    result = reconstruct(sparse, geometry, prior, steps="auto", device="cpu",
                         progress=lambda *a: calls.append(a) or True)
    assert 1 < result.report["steps"] <= 16
    assert calls[-1][0] == calls[-1][1] and all(c[1] == calls[-1][1] for c in calls)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


@pytest.mark.parametrize("stop_at", [2, "evaluation"])
def test_returning_false_cancels(small_case, stop_at):
    sparse, geometry, _, prior = small_case
    calls = []

    def progress(step, total, loss):
        calls.append(step)
        return not (step == stop_at if stop_at != "evaluation" else loss is None)

    with pytest.raises(Cancelled):
        reconstruct(sparse, geometry, prior, steps=4, device="cpu", progress=progress)
    assert calls[-1] == (2 if stop_at == 2 else 5)  # nothing ran after the cancel


def test_bad_input(small_case):
    sparse, geometry, mask, prior = small_case
    cases = [
        (np.zeros(geometry.size, np.int32), {}, "empty"),
        (np.ones(geometry.size, np.int32), {}, "fills the whole grid"),
        (np.where(mask, 1, 0), {}, "no observed plane found"),
        (sparse, {"label": 7}, r"label 7 is absent .*labels present: 1\)"),
        (sparse, {"steps": "many"}, "expected a whole number of steps or auto"),
        (sparse, {"steps": 2.7}, "expected a whole number of steps or auto"),
        (sparse, {"steps": float("inf")}, "expected a whole number of steps or auto"),
        (sparse, {"steps": 10 ** 20}, "at most 100,000"),
        (sparse, {"steps": -1}, "0 or more"),
        (sparse, {"evaluation": "sparse"}, "--evaluation 'sparse': expected one of coarse-to-fine, dense"),
        (sparse, {"interpolation": "abc"}, "--interpolation 'abc': expected a number >= 0"),
        (sparse, {"label": "1"}, "--label '1': expected a whole number"),
        (sparse, {"device": "tpu"}, "expected auto, cpu or cuda"),
        (sparse, {"precision": "float16"}, "expected auto, float32 or bfloat16"),
        (sparse, {"slices": "axial:9:9"}, "OFFSET"),
        (sparse[:, :, :5], {}, "does not match its geometry"),
        (sparse, {"output_geometry": Geometry.create(geometry.size, (0.0, 1.0, 1.0))}, "output grid: spacing"),
    ]
    if not torch.cuda.is_available():
        cases.append((sparse, {"device": "cuda"}, "CUDA is not available"))
    for labels, options, phrase in cases:
        with pytest.raises(InputError, match=phrase):
            reconstruct(labels, geometry, prior, **options)


def test_interpolation_weighs_in_shape_based_interpolation_between_parallel_planes(small_case):
    """--interpolation W: between parallel planes the output follows the interpolated signed
    distance where W makes it dominate, with the weight scaled to the drawing's plane gap; the
    report says what was used; W = 0 (and the card's default) is the network alone."""
    sparse, geometry, mask, prior = small_case
    assert prior.adaptation["interpolation_weight"] == 0
    alone = reconstruct(sparse, geometry, prior, steps=1, device="cpu")
    assert alone.report["interpolation"] == {"weight": 0.0, "plane_gap_mm": 6.0, "logits_per_mm": 0.0,
                                             "curve": "linear"}  # a card without interpolation_curve
    assert "interpolate" not in alone.report["timings_s"]
    np.testing.assert_array_equal(reconstruct(sparse, geometry, prior, steps=1, device="cpu",
                                              interpolation=0).labels, alone.labels)

    strong = reconstruct(sparse, geometry, prior, steps=1, device="cpu", interpolation=1e4)
    assert strong.report["interpolation"] == {"weight": 1e4, "plane_gap_mm": 6.0,
                                              "logits_per_mm": pytest.approx(1e4 * (8 / 6) ** 4), "curve": "linear"}
    assert strong.report["timings_s"]["interpolate"] > 0
    # the card's interpolation_gap_power sets how the weight falls with the gap (6 mm here)
    for power, per_mm in ((2.0, 1e4 * (8 / 6) ** 2), (0.0, 1e4)):
        card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), interpolation_gap_power=power))
        powered = reconstruct(sparse, geometry, prior.with_card(card), steps=1, device="cpu", interpolation=1e4)
        assert powered.report["interpolation"]["logits_per_mm"] == pytest.approx(per_mm)
    # the card's interpolation_curve: that curve's field decides where it dominates
    card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), interpolation_curve="cubic"))
    curved = reconstruct(sparse, geometry, prior.with_card(card), steps=1, device="cpu", interpolation=1e4)
    assert curved.report["interpolation"]["curve"] == "cubic"
    planes = select_planes("auto", sparse, geometry)
    for result, curve in ((strong, "linear"), (curved, "cubic")):
        distance = interpolated_field(sparse, planes, geometry, curve)
        decided = np.abs(np.nan_to_num(distance, nan=0.0)) >= 0.5  # the evidence outweighs any network logit
        assert decided[mask.astype(bool)].mean() > 0.8  # most of the structure
        np.testing.assert_array_equal(result.labels[decided], (distance[decided] < 0).astype(np.uint8))
    assert not np.array_equal(curved.labels, strong.labels)
    assert dice(strong.labels, mask) > dice(alone.labels, mask) + 0.1  # the untrained network alone is poor

    # one plane per axis: nothing to interpolate between, the network alone
    orthogonal = np.zeros_like(sparse)
    centre = [n // 2 for n in geometry.size]
    orthogonal[centre[0]], orthogonal[:, centre[1]], orthogonal[:, :, centre[2]] = (
        mask[centre[0]], mask[:, centre[1]], mask[:, :, centre[2]])
    rule = f"i:100:{centre[0]},j:100:{centre[1]},k:100:{centre[2]}"
    single = reconstruct(orthogonal, geometry, prior, steps=1, slices=rule, device="cpu", interpolation=1e4)
    assert single.report["interpolation"] == {"weight": 1e4, "plane_gap_mm": None, "logits_per_mm": 0.0,
                                              "curve": "linear"}
    np.testing.assert_array_equal(single.labels, reconstruct(orthogonal, geometry, prior, steps=1, slices=rule,
                                                             device="cpu").labels)
    for bad in (-1, float("nan")):
        with pytest.raises(InputError, match="expected a number >= 0"):
            reconstruct(sparse, geometry, prior, interpolation=bad)
    card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), interpolation_weight=-2))
    with pytest.raises(ValueError, match="interpolation_weight = -2 is not a number >= 0"):
        check_adaptation(card)
    card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), interpolation_gap_power="4"))
    with pytest.raises(ValueError, match="interpolation_gap_power = '4' is not a number >= 0"):
        check_adaptation(card)
    card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), interpolation_curve="spline"))
    with pytest.raises(ValueError, match="interpolation_curve = 'spline' is not one of linear, cubic"):
        check_adaptation(card)


def test_logit_offset_from_the_card_moves_the_network_boundary(small_case):
    """adaptation.logit_offset shifts the adapted network's logits before the threshold: a lower
    offset gives a result inside that of a higher one (the drawn planes kept as drawn), the report
    says which offset was used, and a card with a non-number is refused."""
    sparse, geometry, mask, prior = small_case
    assert prior.logit_offset == 0
    results = {}
    for offset in (-3.0, 0.0, 3.0):
        card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), logit_offset=offset))
        results[offset] = reconstruct(sparse, geometry, prior.with_card(card), steps=3, device="cpu")
        assert results[offset].report["logit_offset"] == offset
    low, plain, high = (results[o].labels.astype(bool) for o in (-3.0, 0.0, 3.0))
    np.testing.assert_array_equal(plain, reconstruct(sparse, geometry, prior, steps=3, device="cpu").labels)
    assert not (low & ~plain).any() and not (plain & ~high).any()
    assert high.sum() > plain.sum()  # the untrained network's logits are small: +3 fills more
    drawn = sparse.astype(bool)
    assert low[drawn].all() and high[drawn].all()  # what was drawn stays drawn
    for bad in (float("nan"), "-1", True):
        card = dict(prior.card, adaptation=dict(prior.card.get("adaptation", {}), logit_offset=bad))
        with pytest.raises(ValueError, match="logit_offset = .* is not a finite number"):
            check_adaptation(card)


def test_label_chooses_the_structure():
    labels = np.zeros((6, 6, 6), np.int32)
    labels[1, 1:3, 1:3] = 1
    labels[3, 2:5, 2:5] = 2
    assert structure_mask(labels).sum() == 4 + 9
    assert structure_mask(labels, 2).sum() == 9 and structure_mask(labels, 2)[3, 2, 2]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--device cuda"):
            resolve_device("cuda")


def test_resolve_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("float32", cpu) == torch.float32
    assert resolve_precision("BFloat16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bfloat16() else torch.float32)
    assert resolve_precision("auto", cuda) == torch.float32  # the GPU is fast in float32 already
    with pytest.raises(InputError, match="--precision half"):
        resolve_precision("half", cpu)


def test_bfloat16_reconstructs_the_real_sample_as_float32_does():
    """The bundled kidney prior on the bundled held-out case (sagittal planes every 8 mm), in both
    precisions: the same shape, and the same losses to bfloat16's rounding."""
    from MetaShapeReconLib.bench import load_truth, sparse_input

    truth, geometry, _ = load_truth(None)
    sparse, _, spec = sparse_input(truth, geometry, "sagittal", 8)
    prior = load_prior("kidney")
    results = {p: reconstruct(sparse, geometry, prior, slices=spec, device="cpu", precision=p)
               for p in ("float32", "bfloat16")}
    single, half = results["float32"], results["bfloat16"]
    assert (single.report["precision"], half.report["precision"]) == ("float32", "bfloat16")
    assert dice(single.labels, half.labels) > 0.99
    assert abs(dice(single.labels, truth) - dice(half.labels, truth)) < 0.005
    assert dice(half.labels, truth) > 0.95
    np.testing.assert_allclose(half.report["loss"], single.report["loss"], rtol=0.02)
    assert half.report["loss"][-1] < 0.5 * half.report["loss"][0]  # it fitted, not just agreed


def test_a_bfloat16_step_keeps_float32_weights_and_follows_the_float32_gradient():
    prior = load_prior("kidney")
    rng = np.random.default_rng(0)
    coords = torch.as_tensor(rng.uniform(-0.5, 0.5, (2048, 3)), dtype=torch.float32)
    target = (coords.norm(dim=1) < 0.3).float()
    steps = {p: inner_step(prior.model, prior.params, prior.inner_lr, coords, target, 1.0, precision=p)
             for p in (torch.float32, torch.bfloat16)}
    (single, single_loss), (half, half_loss) = steps[torch.float32], steps[torch.bfloat16]
    assert all(v.dtype == torch.float32 for v in half.values())
    assert abs(float(half_loss) - float(single_loss)) < 0.02 * float(single_loss)
    single_move = torch.cat([(single[k] - prior.params[k]).ravel() for k in single])
    half_move = torch.cat([(half[k] - prior.params[k]).ravel() for k in half])
    assert torch.nn.functional.cosine_similarity(single_move, half_move, dim=0) > 0.98


def test_shape_larger_than_the_frame_warns():
    geometry = oblique_geometry((26, 26, 20), (1.5, 1.8, 2.4))
    labels = ellipsoid(geometry, grid_centre(geometry), (18, 18, 18)).astype(np.int32)
    prior = quick_prior(hidden_features=16, extent_mm=20.0, context_points=256)
    result = reconstruct(labels, geometry, prior, steps=0, slices="axial:1", device="cpu")
    assert any("larger than the prior's" in w for w in result.report["warnings"])


def test_first_step_scale_lengthens_the_first_step_only(small_case):
    """The card's first_step_scale multiplies the first inner step's step sizes and no other's."""
    import copy

    from MetaShapeReconLib.prior import Prior

    sparse, geometry, _, prior = small_case

    def variant(scale, lr_factor):
        card = copy.deepcopy(prior.card)
        card["adaptation"].update(first_step_scale=scale, meta_steps=3)
        return Prior(prior.model, prior.params, {k: v * lr_factor for k, v in prior.inner_lr.items()}, card)

    def losses(candidate):
        return reconstruct(sparse, geometry, candidate, steps=3, device="cpu").report["loss"]

    scaled, doubled, plain = losses(variant(2.0, 1.0)), losses(variant(1.0, 2.0)), losses(variant(1.0, 1.0))
    assert scaled[0] == doubled[0] == plain[0]  # the prior itself
    assert scaled[1] == pytest.approx(doubled[1], rel=1e-5)  # first step: twice the step sizes
    assert scaled[1] != pytest.approx(plain[1], rel=1e-3)
    assert scaled[2] != pytest.approx(doubled[2], rel=1e-3)  # second step: the prior's own step sizes
    # the first step's own step sizes (meta-trained) serve the first step only, like the scale
    own = variant(1.0, 1.0)
    own.first_step_lr = {k: v * 2 for k, v in prior.inner_lr.items()}
    assert losses(own) == pytest.approx(scaled, rel=1e-5)


def hand_written_adaptation(prior, learned, adam_steps, lr=1e-3, weight_decay=1.0):
    """The known answer the engine's adaptation must give: plain inner steps for each
    (sizes, coords, target) in `learned`, then torch's Adam for each (coords, target) in
    `adam_steps`. Returns (weights, context losses)."""
    from MetaShapeReconLib.adaptation import inner_step
    from MetaShapeReconLib.siren import logits, reconstruction_loss

    expected, losses = dict(prior.params), []
    for sizes, coords, target in learned:
        expected, loss = inner_step(prior.model, expected, sizes, coords, target, weight_decay)
        expected = {k: v.detach() for k, v in expected.items()}
        losses.append(float(loss.detach()))
    current = {k: v.clone().requires_grad_(True) for k, v in expected.items()}
    adam = torch.optim.Adam(current.values(), lr=lr)
    for coords, target in adam_steps:
        adam.zero_grad()
        loss = reconstruction_loss(logits(prior.model, current, coords), target, current, weight_decay)
        loss.backward()
        adam.step()
        losses.append(float(loss.detach()))
    return {k: v.detach() for k, v in current.items()}, losses


def test_adaptation_takes_the_learned_step_sizes_for_the_meta_steps_then_adam():
    """Known answer: `meta_steps` plain inner steps (the first with its own sizes), then the steps
    of torch's Adam from there."""
    from MetaShapeReconLib.adaptation import adaptation_steps, take_steps

    prior = quick_prior(hidden_features=16, extent_mm=64.0)
    rng = np.random.default_rng(0)
    coords = torch.as_tensor(rng.uniform(-1, 1, (256, 3)), dtype=torch.float32)
    target = (coords.norm(dim=1) < 0.5).float()
    first = {k: v * 3 for k, v in prior.inner_lr.items()}
    taken, losses = take_steps(adaptation_steps(prior.model, prior.params, prior.inner_lr, coords, target, 1.0,
                                                2, 1e-3, first), prior.params, 4)

    expected, expected_losses = hand_written_adaptation(
        prior, [(first, coords, target), (prior.inner_lr, coords, target)], [(coords, target)] * 2)
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for name, value in expected.items():
        torch.testing.assert_close(taken[name], value)
    untouched, none = take_steps(adaptation_steps(prior.model, prior.params, prior.inner_lr, coords, target, 1.0,
                                                  2, 1e-3), prior.params, 0)
    assert none == [] and all(untouched[k] is prior.params[k] for k in prior.params)


def test_fresh_context_fits_a_new_draw_at_every_step_after_the_first():
    """Known answer: with `redraw`, the first step fits the given points and each later step
    (learned sizes, then Adam) the next draw."""
    from MetaShapeReconLib.adaptation import adaptation_steps, take_steps

    prior = quick_prior(hidden_features=16, extent_mm=64.0)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(4):
        coords = torch.as_tensor(rng.uniform(-1, 1, (128, 3)), dtype=torch.float32)
        draws.append((coords, (coords.norm(dim=1) < 0.5).float()))
    later = iter(draws[1:])
    taken, losses = take_steps(adaptation_steps(prior.model, prior.params, prior.inner_lr, *draws[0], 1.0, 2, 1e-3,
                                                redraw=lambda: next(later)), prior.params, 4)
    expected, expected_losses = hand_written_adaptation(
        prior, [(prior.inner_lr, *draw) for draw in draws[:2]], draws[2:])
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    for name, value in expected.items():
        torch.testing.assert_close(taken[name], value)


def test_a_prior_with_fresh_context_draws_afresh_after_the_first_step(small_case):
    """The card's `fresh_context`: the first step is the same reconstruction, later steps see other
    voxels of the drawing (the report says so)."""
    sparse, geometry, _, prior = small_case
    card = dict(prior.card, adaptation=dict(prior.card["adaptation"], context_points=256))
    fixed = prior.with_card(card)
    fresh = prior.with_card(dict(card, adaptation=dict(card["adaptation"], fresh_context=True)))
    runs = {}
    for name, candidate in (("fixed", fixed), ("fresh", fresh)):
        for steps in (1, 3):
            runs[name, steps] = reconstruct(sparse, geometry, candidate, steps=steps, slices="sagittal:6:3",
                                            device="cpu").report
    assert runs["fixed", 1]["loss"] == runs["fresh", 1]["loss"]
    assert runs["fixed", 3]["loss"][0] == runs["fresh", 3]["loss"][0]
    assert runs["fixed", 3]["loss"][1:] != pytest.approx(runs["fresh", 3]["loss"][1:], rel=1e-4)
    assert runs["fresh", 3]["context_points"]["used"] == 256 < runs["fresh", 3]["context_points"]["observed"]
    assert runs["fresh", 3]["context_points"]["fresh_each_step"] is True
    assert runs["fixed", 3]["context_points"]["fresh_each_step"] is False


def test_a_prior_with_later_context_points_reports_them(small_case):
    """The card's `later_context_points`: the first step is the same, the report gives both sizes."""
    sparse, geometry, _, prior = small_case
    fresh = prior.with_card(dict(prior.card, adaptation=dict(prior.card["adaptation"], context_points=256,
                                                            fresh_context=True)))
    cheaper = prior.with_card(dict(fresh.card, adaptation=dict(fresh.card["adaptation"], later_context_points=64)))
    reports = [reconstruct(sparse, geometry, p, steps=3, slices="sagittal:6:3", device="cpu").report
               for p in (fresh, cheaper)]
    assert reports[0]["loss"][0] == reports[1]["loss"][0]
    assert reports[0]["context_points"]["used_each_later_step"] == 256
    assert reports[1]["context_points"]["used"] == 256 and reports[1]["context_points"]["used_each_later_step"] == 64


def test_until_converged_returns_the_weights_of_the_lowest_loss():
    """Each step yields the weights after it and the loss before it: the lowest loss (3, before
    the second step) belongs to the weights after the first."""
    from MetaShapeReconLib.adaptation import steps_until_converged

    stream = iter([({"w": torch.tensor(float(i))}, loss) for i, loss in enumerate([5.0, 3.0, 4.0, 4.0, 2.0], 1)])
    best, losses = steps_until_converged(stream, {"w": torch.tensor(0.0)}, patience=2, max_steps=10)
    assert losses == [5.0, 3.0, 4.0, 4.0]  # stopped after two steps without improvement
    assert float(best["w"]) == 1.0


def test_steps_beyond_the_meta_steps_continue_with_adam(small_case):
    """More steps than the prior was meta-trained for: the learned sizes serve its meta_steps and
    Adam (the card's auto.lr) the rest, as `training evaluate` measures them."""
    import copy

    from MetaShapeReconLib.prior import Prior

    sparse, geometry, _, prior = small_case

    def with_meta_steps(count):
        card = copy.deepcopy(prior.card)
        card["adaptation"].update(meta_steps=count, steps=2)
        return Prior(prior.model, prior.params, prior.inner_lr, card)

    two = reconstruct(sparse, geometry, with_meta_steps(2), steps=5, device="cpu").report
    five = reconstruct(sparse, geometry, with_meta_steps(5), steps=5, device="cpu").report
    assert two["steps"] == five["steps"] == 5
    assert two["loss"][:3] == pytest.approx(five["loss"][:3], rel=1e-6)  # the same two learned steps
    assert two["loss"][3] != pytest.approx(five["loss"][3], rel=1e-3)  # then Adam against a third


def test_best_step_and_converged_follow_until_converged():
    from MetaShapeReconLib.adaptation import best_step, converged, steps_until_converged

    stream = iter([({"w": torch.tensor(float(i))}, loss) for i, loss in enumerate([5.0, 3.0, 4.0, 4.0, 2.0], 1)])
    best, losses = steps_until_converged(stream, {"w": torch.tensor(0.0)}, patience=2, max_steps=10)
    assert best_step(losses) == float(best["w"]) == 1 and converged(losses, patience=2)
    falling = [5.0, 4.0, 3.0]  # max_steps reached while the loss still fell
    assert best_step(falling) == 2 and not converged(falling, patience=2)
    assert best_step([]) == 0 and not converged([], patience=2)


def test_auto_steps_reports_the_step_used_and_warns_at_max_steps(small_case):
    sparse, geometry, _, _ = small_case
    capped = quick_prior(hidden_features=32, extent_mm=64.0, context_points=1024, max_steps=4)
    report = reconstruct(sparse, geometry, capped, steps="auto", device="cpu").report
    assert report["steps"] == 4 and report["steps_mode"] == "auto"
    assert report["steps_used"] == int(np.argmin(report["loss"])) <= 3  # the weights of the lowest loss
    assert any("max_steps = 4" in w for w in report["warnings"]), report["warnings"]
    fixed = reconstruct(sparse, geometry, capped, steps=2, device="cpu").report
    assert fixed["steps"] == fixed["steps_used"] == 2 and not fixed["warnings"]


def test_drawn_voxels_off_the_named_planes_are_counted_in_a_warning(small_case):
    sparse, geometry, _, prior = small_case
    drawn = sparse.copy()
    drawn[12:15, 10:13, 8:11] = 1  # a blob between the sagittal planes 9 and 15
    report = reconstruct(drawn, geometry, prior, steps=0, slices="sagittal:6:3", device="cpu").report
    assert "27 drawn voxel(s) lie off the observed planes and were ignored (see --slices)" in report["warnings"]
    clean = reconstruct(sparse, geometry, prior, steps=0, slices="sagittal:6:3", device="cpu").report
    assert clean["warnings"] == []


def test_label_0_and_an_empty_slices_value_are_refused(small_case):
    sparse, geometry, _, prior = small_case
    with pytest.raises(InputError, match="label 0 is the background"):
        reconstruct(sparse, geometry, prior, steps=0, label=0, device="cpu")
    with pytest.raises(InputError, match="--slices is empty"):
        reconstruct(sparse, geometry, prior, steps=0, slices=" ", device="cpu")


def test_device_auto_in_any_case_falls_back_to_the_cpu(small_case, monkeypatch):
    """AUTO is auto: a GPU that runs out of memory hands the work to the CPU."""
    from MetaShapeReconLib import pipeline

    sparse, geometry, _, prior = small_case
    original = pipeline._adapt_and_evaluate

    def gpu_too_small(prior, device, *args, **kwargs):
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(prior, device, *args, **kwargs)

    monkeypatch.setattr(pipeline, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(pipeline, "_adapt_and_evaluate", gpu_too_small)
    report = reconstruct(sparse, geometry, prior, steps=0, device="AUTO").report
    assert report["device"].startswith("cpu")
    assert "the GPU ran out of memory; reconstructed on the CPU instead" in report["warnings"]
