"""training/: what export, evaluate and publish refuse, and that their outputs land whole or not at all."""

import argparse
import json
import os
import shlex

import pytest
import torch
from MetaShapeReconLib.prior import load_prior
from test_training import with_values

import training.evaluate as evaluate_module
from training.config import load_config
from training.data import load_shapes, load_split
from training.export import export_prior
from training.maml import train_maml
from training.prepare import prepare
from training.pretrain import train_pretrain
from training.publish import publish


def tiny_config(root, **overrides):
    """A 4 x 32 SIREN on a 40 mm frame over six cached synthetic shapes (as test_training.py's small config)."""
    config = load_config(None, [
        "name=tiny", "anatomy=synthetic superquadrics", "frame.extent_mm=40", "data.layout=synthetic",
        f"data.cache={root}/cache", "data.margin_mm=4", 'data.synthetic={"count": 6, "seed": 0}',
        'data.split={"test": 0.34, "val": 0.17, "folds": 0}', "model.hidden_features=32", "model.linear_layers=4",
        "tasks.context_points=128", "tasks.target_points=128", "maml.inner_steps=2", "maml.meta_batch=2",
        "maml.iterations=1", "pretrain.iterations=1", "pretrain.batch_shapes=2", "validation.every=0",
        "checkpoint.every=1000", "adaptation.context_points=512", "adaptation.steps=3", "threads=1",
        'evaluate.settings=["sagittal:8"]', 'evaluate.trajectory_settings=[]', "evaluate.cases=2",
        'evaluate.methods=["maml", "fill_between_slices"]',
    ])
    return with_values(config, overrides)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The cache, a meta-learned prior and a B.(ii) checkpoint of the tiny config."""
    root = tmp_path_factory.mktemp("tiny")
    config = tiny_config(root)
    prepare(config, workers=1)
    prior = train_maml(config, str(root / "maml"), shapes=load_shapes(config["data"]["cache"]))
    train_pretrain(config, str(root / "pretrain"), shapes=load_shapes(config["data"]["cache"]))
    return {"root": root, "prior": prior, "pretrain": os.path.join(root, "pretrain", "checkpoint.safetensors")}


def licensed(root, **overrides):
    return tiny_config(root, license="CC0 1.0", attribution="synthetic superquadrics (training/synthetic.py)",
                       **overrides)


# --- export ----------------------------------------------------------------------------------------

def test_export_refuses_a_prior_of_another_network_or_frame(run, tmp_path):
    out = tmp_path / "priors"
    for key, value, message in (("model.hidden_features", 128, "hidden_features 32 differs from the config's "
                                                               "model.hidden_features 128"),
                                ("model.linear_layers", 7, "linear_layers 4 differs"),
                                ("model.omega_0", 20.0, "omega_0 30.0 differs"),
                                ("frame.extent_mm", 160, r"frame extent_mm \[40.0, 40.0, 40.0\] differs")):
        with pytest.raises(SystemExit, match=message) as refused:
            export_prior(licensed(run["root"], **{key: value}), run["prior"], "tiny", None, str(out))
        assert "\n" not in str(refused.value)
    assert not out.exists()
    # the frame as a list of the same three numbers is the same frame
    card = export_prior(licensed(run["root"], **{"frame.extent_mm": [40, 40, 40]}), run["prior"], "tiny", None,
                        str(out))
    assert json.load(open(card))["architecture"]["hidden_features"] == 32


def test_export_refuses_a_network_that_was_not_meta_learned(run, tmp_path):
    assert load_prior(run["pretrain"]).card["training"]["method"] == "pretrain"
    with pytest.raises(SystemExit, match="training.method is 'pretrain'; only meta-learned priors"):
        export_prior(licensed(run["root"]), run["pretrain"], "tiny", None, str(tmp_path / "priors"))
    assert not (tmp_path / "priors").exists()


def test_export_requires_licence_attribution_and_an_evaluation_summary(run, tmp_path):
    out = tmp_path / "priors"
    with pytest.raises(SystemExit, match="the config has no license and no attribution"):
        export_prior(tiny_config(run["root"]), run["prior"], "tiny", None, str(out))
    with pytest.raises(SystemExit, match="the config has no attribution: "):
        export_prior(tiny_config(run["root"], license="CC0 1.0"), run["prior"], "tiny", None, str(out))
    empty = tmp_path / "not_an_evaluation"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no summary.json there"):
        export_prior(licensed(run["root"]), run["prior"], "tiny", str(empty), str(out))
    assert not out.exists()
    (empty / "summary.json").write_text(json.dumps({"default_steps": 3, "settings": {}}))
    config = licensed(run["root"])
    card = json.load(open(export_prior(config, run["prior"], "tiny", str(empty), str(out))))
    assert card["license"] == "CC0 1.0" and card["attribution"].startswith("synthetic superquadrics")
    assert card["results"] == {"default_steps": 3, "settings": {}}
    # the split file that was read, where the config says it is (here the cache's)
    assert card["training_data"]["split_file"] == os.path.join(config["data"]["cache"], "split.json")
    assert card["training_data"]["cases"]["test"] == len(load_split(config)["test"])


def test_every_bundled_config_names_its_licence_and_attribution():
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "training", "configs")
    exported = ("kidney.yaml", "left_atrium.yaml", "pancreas.yaml")  # the configs of the bundled priors
    for name in exported:
        config = load_config(os.path.join(folder, name))
        assert str(config.get("license") or "").strip() and str(config.get("attribution") or "").strip(), name


# --- evaluate --------------------------------------------------------------------------------------

def evaluate_args(run, out, **values):
    args = dict(config="tiny config.yaml", prior=run["prior"], pretrain=None, autodecoder=None, transfer=[],
                reuse=None, reuse_transfer=None, overrides=[], out=str(out))
    return argparse.Namespace(**dict(args, **values))


def earlier_set(out):
    out.mkdir(exist_ok=True)
    files = {"results.csv": "method\nold\n", "results.md": "# old", "summary.json": "{}",
             "dice_time.png": "old png", "transfer.csv": "target\nold\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    return files


def folder_state(out):
    return {p.name: p.read_text() for p in out.iterdir()}


def test_evaluate_checks_its_inputs_before_any_work(run, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(evaluate_module, "evaluate_settings", no_work)
    monkeypatch.setattr(evaluate_module, "load_prior", no_work)
    out = tmp_path / "evaluation"
    files = earlier_set(out)
    empty_split = tmp_path / "split.json"
    empty_split.write_text(json.dumps({"train": [], "val": [], "test": []}))
    cases = [
        ({"evaluate.settings": ["sagital:8"]}, {}, "evaluate.settings: unknown input setting 'sagital:8'"),
        ({"evaluate.settings": ["sagittal:x"]}, {}, "unknown input setting 'sagittal:x'"),
        ({"evaluate.methods": ["mamll", "fill_between_slices"]}, {}, "evaluate.methods: unknown method 'mamll'"),
        ({"data.split_file": str(empty_split)}, {}, "no test shapes"),
        ({}, {"transfer": ["other"]}, "--transfer 'other': expected NAME=CONFIG"),
        ({}, {"transfer": [f"other={tmp_path}/none.yaml"]}, "--transfer other=.*none.yaml not found"),
    ]
    for overrides, arguments, message in cases:
        with pytest.raises(SystemExit, match=message) as refused:
            evaluate_module.run_evaluation(tiny_config(run["root"], **overrides), evaluate_args(run, out, **arguments))
        assert "\n" not in str(refused.value)
        assert folder_state(out) == files
    # a transfer config whose split lists no test case in its cache
    other = tmp_path / "other.yaml"
    other.write_text(f"data: {{cache: {run['root']}/cache, split_file: {empty_split}}}\n")
    with pytest.raises(SystemExit, match="--transfer other=.*: no test shapes"):
        evaluate_module.run_evaluation(tiny_config(run["root"]), evaluate_args(run, out, transfer=[f"other={other}"]))
    assert folder_state(out) == files


def test_evaluate_replaces_the_earlier_set_whole_or_not_at_all(run, tmp_path, monkeypatch):
    config = tiny_config(run["root"])
    out = tmp_path / "evaluation"
    files = earlier_set(out)
    real_plot = evaluate_module.plot_dice_time

    def failing_plot(*args, **kwargs):
        raise RuntimeError("the plot failed")

    monkeypatch.setattr(evaluate_module, "plot_dice_time", failing_plot)
    with pytest.raises(RuntimeError, match="the plot failed"):
        evaluate_module.run_evaluation(config, evaluate_args(run, out))
    assert folder_state(out) == files  # results.csv too, though it is written before the plot
    monkeypatch.setattr(evaluate_module, "plot_dice_time", real_plot)
    overrides = ['evaluate.settings=["sagittal:8"]', "name=a name with spaces"]
    evaluate_module.run_evaluation(config, evaluate_args(run, out, overrides=overrides))
    written = {p.name for p in out.iterdir()}
    # this evaluation's set, without the earlier one's transfer table (this one has none)
    assert written == {"results.csv", "results.md", "summary.json", "dice_time.png"}
    assert (out / "results.csv").read_text().startswith("method,setting,shape,")
    assert json.loads((out / "summary.json").read_text())["test_shapes"] == 2
    # the command line is quoted so that it pastes back into a shell
    text = (out / "results.md").read_text()
    command = text.split("Command: `", 1)[1].split("`", 1)[0]
    assert shlex.split(command)[4:] == ["--config", "tiny config.yaml", "--prior", run["prior"],
                                        "--set", overrides[0], "--set", overrides[1], "--out", str(out)]
    assert f"`{os.path.join(config['data']['cache'], 'split.json')}`" in text


def test_the_timed_reconstructions_follow_one_untimed_warm_up(run, monkeypatch):
    """The first reconstruction of a process carries one-time costs: evaluate_settings adapts and
    evaluates the first shape once, for one step, before it times anything, and drops the result;
    the timed inputs are those of the seed, as without it."""
    config = tiny_config(run["root"])
    shapes = load_shapes(config["data"]["cache"], load_split(config)["test"])
    prior = load_prior(run["prior"])
    calls = []
    real = evaluate_module.evaluate_case

    def spy(shape, setting, methods, config, rng, device):
        rows = real(shape, setting, methods, config, rng, device)
        calls.append((shape.name, setting, config["evaluate"]["converge"]["max_steps"], rows))
        return rows

    monkeypatch.setattr(evaluate_module, "evaluate_case", spy)
    settings = ["sagittal:8", "orthogonal"]
    methods = {"maml": prior, "fill_between_slices": True}
    rows = evaluate_module.evaluate_settings(shapes, settings, methods, config, torch.device("cpu"), "test")
    assert len(calls) == 1 + len(shapes) * len(settings)
    warm_shape, warm_setting, warm_steps, warm_rows = calls[0]
    assert (warm_shape, warm_setting, warm_steps) == (shapes[0].name, "sagittal:8", 1)
    assert any(r["method"] == "maml" and r["steps"] == 1 for r in warm_rows)  # it did adapt
    assert rows == [r for _, _, _, timed in calls[1:] for r in timed]  # and its rows are dropped
    # the same planes as an evaluation without the warm-up (Fill between slices is deterministic)
    monkeypatch.setattr(evaluate_module, "evaluate_case", real)
    rng = evaluate_module.np.random.default_rng(int(config["seed"]))
    expected = [r["dice"] for shape in shapes for setting in settings
                for r in real(shape, setting, {"fill_between_slices": True}, config, rng, torch.device("cpu"))]
    assert [r["dice"] for r in rows if r["method"] == "fill_between_slices"] == expected


def test_the_classic_tools_are_timed_without_the_metrics(run, monkeypatch):
    """Their seconds are the tool's own, as ours are: computing Dice, ASD and HD95 is not counted."""
    import time

    config = tiny_config(run["root"])
    shape = load_shapes(config["data"]["cache"], load_split(config)["test"])[0]
    real_metrics = evaluate_module.metrics

    def slow_metrics(*args):
        time.sleep(0.5)
        return real_metrics(*args)

    classic = {"fill_between_slices": True, "sdf_interpolation": True}
    evaluate_module.evaluate_case(shape, "sagittal:8", classic, config, evaluate_module.np.random.default_rng(0),
                                  torch.device("cpu"))  # ITK's one-time set-up, as evaluate's warm-up pays it
    monkeypatch.setattr(evaluate_module, "metrics", slow_metrics)
    rows = evaluate_module.evaluate_case(shape, "sagittal:8", classic, config, evaluate_module.np.random.default_rng(0),
                                         torch.device("cpu"))
    assert sorted(r["method"] for r in rows) == ["fill_between_slices", "sdf_interpolation"]
    assert all(r["seconds"] < 0.5 for r in rows), rows


# --- publish ---------------------------------------------------------------------------------------

def evaluation_folder(folder, dice):
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"default_steps": 3, "settings": {
        "sagittal:8": {"ours_1_step": {"dice": dice, "asd_mm": 1.0}}}}))
    (folder / "results.md").write_text(f"# Evaluation: tiny\n\nDice {dice}\n\n![plot](dice_time.png)\n")
    (folder / "dice_time.png").write_bytes(b"png %f" % dice)
    (folder / "results.csv").write_text(f"method,dice\nmaml,{dice}\n")


def test_publish_reads_every_input_before_it_writes(tmp_path):
    docs = tmp_path / "docs"
    evaluation_folder(tmp_path / "first", 0.8)
    publish([f"tiny={tmp_path / 'first'}"], str(docs))
    before = {p.name: p.read_bytes() for p in docs.iterdir()}
    assert set(before) == {"RESULTS.md", "results_tiny_dice_time.png", "results_tiny_results.csv"}
    evaluation_folder(tmp_path / "second", 0.9)
    for specs, message in (([f"tiny={tmp_path / 'second'}", f"bad={tmp_path / 'nonexist'}"],
                            "--results bad=.*nonexist.*summary.json: No such file"),
                           ([f"tiny={tmp_path / 'second'}", "tiny"], "--results 'tiny': expected NAME=FOLDER"),
                           ([f"tiny={tmp_path / 'second'}", f"tiny={tmp_path / 'first'}"], "names tiny twice")):
        with pytest.raises(SystemExit, match=message) as refused:
            publish(specs, str(docs))
        assert "\n" not in str(refused.value)
        assert {p.name: p.read_bytes() for p in docs.iterdir()} == before  # nothing replaced, nothing left over
    with pytest.raises(SystemExit, match="expected NAME=FOLDER"):
        publish(["tiny"], str(tmp_path / "new_docs"))
    assert not (tmp_path / "new_docs").exists()
    publish([f"tiny={tmp_path / 'second'}"], str(docs))
    assert (docs / "results_tiny_dice_time.png").read_bytes() == b"png 0.900000"
    assert "0.900 / 1.00" in (docs / "RESULTS.md").read_text()
    assert not [p for p in docs.iterdir() if p.name.startswith(".")]

