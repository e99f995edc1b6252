"""Prior files: NAME.safetensors + NAME.json, saved and loaded without running code, validated
with clear messages."""

import json
import os

import numpy as np
import pytest
import torch
from fitted import quick_prior
from MetaShapeReconLib import catalog
from MetaShapeReconLib.errors import InputError
from MetaShapeReconLib.occupancy import OccupancyNetwork
from MetaShapeReconLib.prior import FORMAT_VERSION, list_bundled_priors, load_prior, resolve_prior_path, save_prior
from MetaShapeReconLib.siren import logits
from safetensors.torch import load_file, save_file


@pytest.fixture
def saved(tmp_path):
    """A saved prior with distinct inner-loop step sizes per parameter; returns (prior, stem)."""
    prior = quick_prior("roundtrip", extent_mm=[100.0, 90.0, 80.0], hidden_features=32, seed=3)
    prior.inner_lr = {k: torch.full_like(v, 0.001 * (n + 1)) for n, (k, v) in enumerate(prior.inner_lr.items())}
    stem = str(tmp_path / "roundtrip")
    save_prior(prior, stem + ".safetensors")
    return prior, stem


def edit_card(stem, change):
    with open(stem + ".json") as handle:
        card = json.load(handle)
    change(card)
    with open(stem + ".json", "w") as handle:
        json.dump(card, handle)


def test_round_trip_gives_identical_predictions(saved):
    prior, stem = saved
    loaded = load_prior(stem + ".safetensors")
    coords = torch.rand(2000, 3) * 2 - 1
    assert torch.equal(logits(prior.model, prior.params, coords), logits(loaded.model, loaded.params, coords))
    # the module's own forward is another code path: equal up to float rounding, not bit for bit
    torch.testing.assert_close(loaded.model(coords), logits(prior.model, prior.params, coords), rtol=1e-5, atol=1e-6)
    for name in prior.params:
        assert torch.equal(prior.params[name], loaded.params[name])
        assert torch.equal(prior.inner_lr[name], loaded.inner_lr[name])
    a = OccupancyNetwork(prior.params, prior.model.omega_0).probabilities(coords.numpy())
    b = OccupancyNetwork(loaded.params, loaded.model.omega_0).probabilities(coords.numpy())
    np.testing.assert_array_equal(a, b)
    assert loaded.name == "roundtrip"
    assert loaded.frame_spec.extent_mm == (100.0, 90.0, 80.0)
    assert loaded.adaptation == prior.adaptation
    assert loaded.model.architecture() == prior.model.architecture()
    assert loaded.path == stem + ".safetensors"
    # the stem, the card's name and the .json path all find it
    for spelling in (stem, stem + ".json"):
        assert torch.equal(load_prior(spelling).params["layers.0.weight"], prior.params["layers.0.weight"])


def test_files_hold_what_the_format_says(saved):
    prior, stem = saved
    with open(stem + ".json") as handle:
        card = json.load(handle)
    assert card["format"] == "metashaperecon-prior" and card["format_version"] == FORMAT_VERSION
    assert card["architecture"] == {"type": "siren", "in_features": 3, "hidden_features": 32,
                                    "linear_layers": 7, "omega_0": 30.0}
    assert card["frame"]["extent_mm"] == [100.0, 90.0, 80.0] and card["frame"]["axes"] == "LPS"
    assert len(card["weights_sha256"]) == 64
    tensors = load_file(stem + ".safetensors")
    assert set(tensors) == {f"{kind}.{name}" for kind in ("weights", "inner_lr") for name in prior.params}
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_saving_again_writes_the_same_bytes_and_a_failed_save_changes_nothing(saved, tmp_path):
    """The same prior saved twice is the same file (the library orders its metadata at random,
    which would give each export another checksum); a save that fails half way (a card that is
    not JSON, after the tensors were written) leaves the earlier pair as it was."""
    prior, stem = saved
    before = {suffix: open(stem + suffix, "rb").read() for suffix in (".safetensors", ".json")}
    for _ in range(4):
        save_prior(prior, stem)
        assert {suffix: open(stem + suffix, "rb").read() for suffix in before} == before
    from safetensors import safe_open

    with safe_open(stem + ".safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "metashaperecon-prior", "format_version": str(FORMAT_VERSION)}
    broken = load_prior(stem)
    broken.params = {k: v + 1 for k, v in broken.params.items()}
    broken.card = dict(broken.card, description=object())
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_prior(broken, stem)
    assert {suffix: open(stem + suffix, "rb").read() for suffix in before} == before
    assert sorted(os.listdir(tmp_path)) == ["roundtrip.json", "roundtrip.safetensors"]


def test_find_by_name_in_the_priors_folder(saved, monkeypatch):
    _, stem = saved
    monkeypatch.setenv("METASHAPERECON_PRIORS", os.path.dirname(stem))
    assert list_bundled_priors()["roundtrip"] == stem + ".safetensors"
    assert load_prior("roundtrip").name == "roundtrip"
    with pytest.raises(InputError) as error:
        load_prior("no-such-anatomy")
    message = str(error.value)
    assert "'no-such-anatomy' not found" in message and "roundtrip" in message


def test_no_prior_bundled_says_so(monkeypatch):
    monkeypatch.setattr(catalog, "bundled_prior_dirs", lambda: [])
    with pytest.raises(InputError, match="no prior is bundled yet") as error:
        resolve_prior_path("kidney")
    assert "--prior" in str(error.value)


def test_missing_tensor_file(tmp_path):
    with pytest.raises(InputError, match="prior file not found"):
        load_prior(str(tmp_path / "absent.safetensors"))


def test_missing_model_card(saved):
    _, stem = saved
    os.remove(stem + ".json")
    with pytest.raises(InputError, match="model card not found"):
        load_prior(stem + ".safetensors")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2, 3]", "\xff\xfe"])
def test_bad_model_card(saved, text):
    _, stem = saved
    with open(stem + ".json", "w", encoding="latin-1") as handle:
        handle.write(text)
    with pytest.raises(InputError, match="not valid JSON"):
        load_prior(stem)


def test_checksum_mismatch(saved):
    _, stem = saved
    with open(stem + ".safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match="checksum does not match"):
        load_prior(stem)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1"])
def test_corrupt_safetensors(saved, content):
    _, stem = saved
    with open(stem + ".safetensors", "wb") as handle:
        handle.write(content)
    edit_card(stem, lambda card: card.pop("weights_sha256"))  # no checksum to catch it first
    with pytest.raises(InputError, match="corrupt or not a safetensors file"):
        load_prior(stem)


def test_truncated_safetensors(saved):
    _, stem = saved
    with open(stem + ".safetensors", "rb") as handle:
        data = handle.read()
    with open(stem + ".safetensors", "wb") as handle:
        handle.write(data[: len(data) // 2])
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    with pytest.raises(InputError, match="corrupt"):
        load_prior(stem)


def test_wrong_tensor_shape(saved):
    prior, stem = saved
    tensors = load_file(stem + ".safetensors")
    tensors["weights.layers.2.weight"] = torch.zeros(32, 16)
    save_file(tensors, stem + ".safetensors")
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    with pytest.raises(InputError, match=r"weights.layers.2.weight has shape \(32, 16\), expected \(32, 32\)"):
        load_prior(stem)


def test_card_architecture_disagrees_with_the_tensors(saved):
    _, stem = saved
    edit_card(stem, lambda card: card["architecture"].update(hidden_features=128))
    with pytest.raises(InputError, match="does not match its architecture"):
        load_prior(stem)


def test_missing_and_unexpected_tensors(saved):
    _, stem = saved
    tensors = load_file(stem + ".safetensors")
    tensors.pop("weights.layers.6.bias")
    save_file(tensors, stem + ".safetensors")
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    with pytest.raises(InputError, match="weights.layers.6.bias is missing"):
        load_prior(stem)
    tensors["weights.layers.6.bias"] = torch.zeros(1)
    tensors["pickle.payload"] = torch.zeros(1)
    save_file(tensors, stem + ".safetensors")
    with pytest.raises(InputError, match="unexpected tensors: pickle.payload"):
        load_prior(stem)


def test_step_sizes_are_optional(saved):
    prior, stem = saved
    tensors = {k: v for k, v in load_file(stem + ".safetensors").items() if k.startswith("weights.")}
    save_file(tensors, stem + ".safetensors")
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    loaded = load_prior(stem)
    assert all(torch.all(v == 0.01) for v in loaded.inner_lr.values())


def test_first_step_sizes_round_trip_and_are_checked(saved):
    """A prior meta-trained with the first step's own step sizes keeps them through save and load;
    a file holding only some of them, or one of the wrong shape, is refused."""
    prior, stem = saved
    assert load_prior(stem).first_step_lr is None  # older priors: the first step shares the sizes
    prior.first_step_lr = {k: v * 3 for k, v in prior.inner_lr.items()}
    save_prior(prior, stem + ".safetensors")
    loaded = load_prior(stem)
    for name in prior.params:
        assert torch.equal(loaded.first_step_lr[name], prior.first_step_lr[name])
    edit_card(stem, lambda card: card["adaptation"].update(first_step_scale=0.5))
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    halved = load_prior(stem).first_step_sizes()  # the card's scale applies to the step's own sizes
    assert all(torch.allclose(halved[k], prior.first_step_lr[k] * 0.5) for k in prior.params)
    tensors = load_file(stem + ".safetensors")
    tensors.pop("first_step_lr.layers.3.weight")
    save_file(tensors, stem + ".safetensors")
    with pytest.raises(InputError, match="first step's step sizes of some weights only .first_step_lr.layers.3.weight"):
        load_prior(stem)
    tensors["first_step_lr.layers.3.weight"] = torch.zeros(3)
    save_file(tensors, stem + ".safetensors")
    with pytest.raises(InputError, match=r"first_step_lr.layers.3.weight has shape \(3,\), expected \(32, 32\)"):
        load_prior(stem)


def test_non_finite_weights(saved):
    _, stem = saved
    tensors = load_file(stem + ".safetensors")
    tensors["weights.layers.0.bias"][0] = float("nan")
    save_file(tensors, stem + ".safetensors")
    edit_card(stem, lambda card: card.pop("weights_sha256"))
    with pytest.raises(InputError, match="non-finite"):
        load_prior(stem)


@pytest.mark.parametrize("change,phrase", [
    (lambda c: c.update(format_version=2), "format version 2 is not supported"),
    (lambda c: c.pop("format_version"), "format version None is not supported"),
    (lambda c: c.update(format="something-else"), "not a MetaShapeRecon model card"),
    (lambda c: c.update(architecture="siren"), "architecture must be a JSON object"),
    (lambda c: c["architecture"].update(type="mlp"), "architecture type 'mlp', expected 'siren'"),
    (lambda c: c["architecture"].update(linear_layers=1), r"linear_layers = 1, expected a whole number in \[2, 64\]"),
    (lambda c: c["architecture"].update(hidden_features=-4), "hidden_features = -4, expected a whole number"),
    (lambda c: c["architecture"].pop("omega_0"), "incompatible model card \\(no 'omega_0' entry\\)"),
    (lambda c: c.pop("frame"), "incompatible model card \\(no 'frame' entry\\)"),
    (lambda c: c["frame"].update(extent_mm=[100, 0, 80]), "extent_mm must be three positive numbers"),
    (lambda c: c["frame"].update(extent_mm="wide"), "extent_mm must be three positive numbers, got wide"),
    (lambda c: c["frame"].update(centre="image_centre"), "unknown frame centring 'image_centre'"),
    (lambda c: c.update(adaptation={"steps": "five"}), "adaptation.steps = 'five' is not a whole number >= 0"),
    (lambda c: c.update(adaptation={"context_points": 0}), "context_points = 0 is not a whole number >= 1"),
    (lambda c: c.update(adaptation={"auto": {"lr": -1}}), "adaptation.auto.lr = -1 is not a number >= 0"),
    (lambda c: c.update(adaptation=[5]), "adaptation must be a JSON object"),
    (lambda c: c.update(adaptation={"first_step_scale": 0}), "first_step_scale = 0 would make the first step do nothing"),
    (lambda c: c.update(adaptation={"first_step_scale": -1.5}), "first_step_scale = -1.5 is not a number >= 0"),
    (lambda c: c.update(adaptation={"first_step_scale": "long"}), "first_step_scale = 'long' is not a number"),
    (lambda c: c.update(adaptation={"fresh_context": "yes"}), "fresh_context = 'yes' is not true or false"),
    (lambda c: c.update(adaptation={"later_context_points": 512}), "later_context_points needs fresh_context: true"),
    (lambda c: c.update(adaptation={"fresh_context": True, "later_context_points": 0}),
     "later_context_points = 0 is not a whole number >= 1"),
    (lambda c: c.update(adaptation={"meta_steps": -1}), "meta_steps = -1 is not a whole number >= 0"),
    (lambda c: c.update(adaptation={"meta_steps": 2.5}), "meta_steps = 2.5 is not a whole number >= 0"),
])
def test_incompatible_model_card(saved, change, phrase):
    _, stem = saved
    edit_card(stem, change)
    with pytest.raises(InputError, match=phrase):
        load_prior(stem)


def test_loading_never_unpickles(saved, monkeypatch):
    """The files are read with safetensors and json only."""
    import pickle

    _, stem = saved

    def refuse(*args, **kwargs):
        raise AssertionError("a prior was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_prior(stem)


def test_meta_steps_default_to_the_steps_meta_training_unrolled(saved):
    """Cards written before `meta_steps` existed: the learned step sizes serve the steps of the
    card's meta-training inner loop, or every default step when the card does not say."""
    _, stem = saved

    def old_card(card, **adaptation):
        card.pop("meta_training", None)
        card["adaptation"] = adaptation

    edit_card(stem, lambda c: old_card(c, steps=7))
    assert load_prior(stem).meta_steps == 7
    edit_card(stem, lambda c: (old_card(c, steps=7), c.update(meta_training={"inner_steps": 5})))
    prior = load_prior(stem)
    assert (prior.default_steps, prior.meta_steps) == (7, 5)
    # a setting tried on another number of default steps (`tune --setting steps=...`) keeps them
    card = dict(prior.card, adaptation=dict(prior.card["adaptation"], steps=12))
    assert (prior.with_card(card).default_steps, prior.with_card(card).meta_steps) == (12, 5)
    edit_card(stem, lambda c: c.update(adaptation={"steps": 8, "meta_steps": 3}))
    prior = load_prior(stem)
    assert (prior.default_steps, prior.meta_steps) == (8, 3)


def test_a_bare_name_is_never_a_file_in_the_current_folder(saved, tmp_path, monkeypatch):
    """`--prior kidney` means the prior found by name, even with a kidney.safetensors in the
    current folder; a path (./kidney.safetensors) or a .safetensors name means that file."""
    prior, stem = saved
    by_name = tmp_path / "by-name"
    by_name.mkdir()
    save_prior(prior, str(by_name / "kidney.safetensors"))
    here = tmp_path / "here"
    here.mkdir()
    save_prior(prior, str(here / "kidney.safetensors"))
    monkeypatch.setenv("METASHAPERECON_PRIORS", str(by_name))
    monkeypatch.chdir(here)
    assert resolve_prior_path("kidney") == str(by_name / "kidney.safetensors")
    assert os.path.abspath(resolve_prior_path("./kidney.safetensors")) == str(here / "kidney.safetensors")
    assert os.path.abspath(resolve_prior_path("kidney.safetensors")) == str(here / "kidney.safetensors")
    assert os.path.abspath(resolve_prior_path("kidney.json")) == str(here / "kidney.safetensors")
    os.rename("kidney.safetensors", "mine.safetensors")
    os.rename("kidney.json", "mine.json")
    with pytest.raises(InputError, match=r"'mine' not found.*pass \./mine\.safetensors"):
        resolve_prior_path("mine")


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_an_unreadable_prior_file_says_it_cannot_be_read(saved, monkeypatch, suffix):
    from test_geometry_io import unreadable

    _, stem = saved
    unreadable(stem + suffix, monkeypatch)
    with pytest.raises(InputError, match=f"cannot read prior .*roundtrip{suffix}: Permission denied"):
        load_prior(stem + ".safetensors")
