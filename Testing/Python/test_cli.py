"""The `metashaperecon` command as DESIGN.md states its contract: geometry kept, observed planes
as asked, the report, and bad input ending in one line on stderr, exit status 2 and no output."""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fitted import OBLIQUE_DIRECTION, fitted_sphere_prior, grid_centre, run_cli, sphere_case, untrained_prior_file
from MetaShapeReconLib import cli
from MetaShapeReconLib.geometry import Geometry
from MetaShapeReconLib.labelmap_io import read_labelmap, write_labelmap
from MetaShapeReconLib.pipeline import dice
from MetaShapeReconLib.surface import boundary_edge_count
from shapes import ellipsoid, sparse_planes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith(".partial-"))


def copy_prior(source, folder, name):
    """Copy a prior's two files to folder/name.{safetensors,json}; returns the .safetensors path."""
    stem = source[:-len(".safetensors")]
    os.makedirs(folder, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy(stem + suffix, os.path.join(folder, name + suffix))
    return os.path.join(folder, name + ".safetensors")


@pytest.fixture(scope="module")
def sphere_input(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sphere")
    labels, geometry, centre, radius = sphere_case()
    path = str(folder / "sphere.nii.gz")
    write_labelmap(path, labels, geometry)
    return path, labels, geometry, centre, radius


# --- the main job, end to end in a fresh interpreter -------------------------------------------------------------

def test_oblique_anisotropic_input_gives_identical_geometry_the_drawing_and_its_surface(sphere_input, tmp_path):
    """Every axial plane observed: the output is the drawing voxel for voxel on the input's exact
    grid, the network's own fit shows in the report's Dice on the drawn planes, and the surface
    lies on the output in LPS."""
    path, labels, _, _, _ = sphere_input
    out, mesh, report_path = tmp_path / "out.nii.gz", tmp_path / "sphere.vtk", tmp_path / "report.json"
    done = run_cli("reconstruct", path, out, "--prior", fitted_sphere_prior(), "--slices", "axial:1",
                   "--device", "cpu", "--surface", mesh, "--report", report_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "Dice on drawn planes" in done.stdout

    source, result = sitk.ReadImage(path), sitk.ReadImage(str(out))
    assert result.GetSize() == source.GetSize()
    np.testing.assert_allclose(result.GetSpacing(), source.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.GetOrigin(), source.GetOrigin(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.GetDirection(), source.GetDirection(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(source.GetDirection(), OBLIQUE_DIRECTION.ravel(), atol=1e-5)  # it is oblique
    assert result.GetPixelID() == sitk.sitkUInt8
    output, _ = read_labelmap(str(out))
    np.testing.assert_array_equal(output, labels != 0)

    report = json.loads(report_path.read_text())
    assert report["dice_observed_planes"] >= 0.98  # the network's own prediction, every voxel observed
    assert report["prior"] == "test-sphere" and report["steps"] == 0 and report["device"].startswith("cpu")
    (planes,) = report["observed_planes"]
    assert planes["axis"] == "axial" and planes["count"] == 20 and planes["indices"] == list(range(20))
    timings = report["timings_s"]
    for key in ("load", "adapt", "evaluate", "surface", "total"):
        assert isinstance(timings[key], float) and timings[key] >= 0
    assert timings["total"] >= timings["load"] + timings["adapt"] + timings["evaluate"] + timings["surface"]
    assert report["surface"]["path"] == str(mesh)

    import vtk

    reader = vtk.vtkPolyDataReader()
    reader.SetFileName(str(mesh))
    reader.Update()
    surface = reader.GetOutput()
    assert surface.GetNumberOfPolys() == report["surface"]["triangles"] > 0
    assert boundary_edge_count(surface) == 0
    geometry = read_labelmap(path)[1]
    foreground = geometry.index_to_physical(np.argwhere(output))
    bounds = np.array(surface.GetBounds()).reshape(3, 2)
    np.testing.assert_allclose(bounds[:, 0], foreground.min(axis=0), atol=2.0)  # LPS, not RAS
    np.testing.assert_allclose(bounds[:, 1], foreground.max(axis=0), atol=2.0)
    assert leftovers(tmp_path) == []


def test_output_spacing_gives_a_finer_grid_over_the_same_extent(sphere_input, tmp_path):
    path, labels, geometry, centre, radius = sphere_input
    source = tmp_path / "sphere.nrrd"
    write_labelmap(str(source), labels, geometry)
    out, report_path = tmp_path / "fine.mha", tmp_path / "report.json"
    code = cli.main(["reconstruct", str(source), str(out), "--prior", fitted_sphere_prior(), "--slices", "i:1",
                     "--output-spacing", "0.9", "--device", "cpu", "--precision", "float32", "--report",
                     str(report_path), "--quiet"])
    assert code == 0
    fine, fine_geometry = read_labelmap(str(out))
    assert fine_geometry.spacing == (0.9, 0.9, 0.9)
    assert fine_geometry.size == tuple(int(round(n * s / 0.9)) for n, s in zip(geometry.size, geometry.spacing))
    np.testing.assert_allclose(fine_geometry.direction, geometry.direction, atol=1e-12)
    # the same physical extent: the outer voxel corners agree (the far one up to the rounding of the size)
    np.testing.assert_allclose(fine_geometry.index_to_physical([-0.5] * 3), geometry.index_to_physical([-0.5] * 3),
                               atol=1e-9)
    far, fine_far = (g.index_to_physical(np.asarray(g.size) - 0.5) for g in (geometry, fine_geometry))
    assert np.linalg.norm(far - fine_far) <= 0.5 * 0.9 * np.sqrt(3)
    # the network's sphere on the finer grid: right place, right size
    truth = ellipsoid(fine_geometry, centre, [radius] * 3)
    assert dice(fine, truth) >= 0.95
    found_centre = fine_geometry.index_to_physical(np.argwhere(fine).mean(axis=0))
    assert np.linalg.norm(found_centre - centre) < 0.3
    report = json.loads(report_path.read_text())
    assert report["output"]["size"] == list(fine_geometry.size) and report["output"]["spacing"] == [0.9] * 3
    assert report["precision"] == "float32"


# --- observed planes, as the report shows them -------------------------------------------------------------------

def sagittal_is_k_geometry():
    """An oblique grid whose image axis k lies closest to L-R (so "sagittal" means k)."""
    direction = OBLIQUE_DIRECTION @ np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], float)
    return Geometry.create((30, 28, 44), (1.3, 1.1, 0.9), (12.0, -30.0, 75.0), direction.ravel())


def report_of(tmp_path, labels, geometry, *options):
    source, out, report = tmp_path / "in.nii.gz", tmp_path / "out.nii.gz", tmp_path / "report.json"
    write_labelmap(str(source), labels, geometry)
    code = cli.main(["reconstruct", str(source), str(out), "--prior", untrained_prior_file(), "--steps", "0",
                     "--device", "cpu", "--report", str(report), "--quiet"] + list(options))
    assert code == 0
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def every_8th_sagittal():
    geometry = sagittal_is_k_geometry()
    mask = ellipsoid(geometry, grid_centre(geometry), (17, 12, 12))
    sparse = sparse_planes(mask, 2, 8, 4)
    drawn = [k for k in range(44) if sparse[:, :, k].any()]
    assert len(drawn) >= 3
    return sparse, geometry, drawn


def test_slices_rule_selects_exactly_the_planes_with_index_mod_8_equal_4(every_8th_sagittal, tmp_path):
    sparse, geometry, _ = every_8th_sagittal
    report = report_of(tmp_path, sparse, geometry, "--slices", "sagittal:8:4")
    (planes,) = report["observed_planes"]
    assert planes["axis"] == "sagittal" and planes["image_axis"] == "k"
    assert planes["indices"] == [k for k in range(44) if k % 8 == 4]
    assert planes["pattern"] == "sagittal:8:4"


def test_auto_selects_exactly_the_annotated_planes(every_8th_sagittal, tmp_path):
    sparse, geometry, drawn = every_8th_sagittal
    report = report_of(tmp_path, sparse, geometry)  # --slices auto is the default
    (planes,) = report["observed_planes"]
    assert planes["axis"] == "sagittal" and planes["image_axis"] == "k" and planes["indices"] == drawn


def test_auto_detects_mixed_axial_and_sagittal_planes(tmp_path):
    geometry = Geometry.create((40, 36, 30), (1.0, 1.0, 1.5))
    mask = ellipsoid(geometry, grid_centre(geometry), (15, 13, 17))
    sagittal, axial = [8, 16, 24, 32], [5, 9, 15, 21, 24]
    sparse = np.zeros(mask.shape, np.int32)
    sparse[sagittal] = mask[sagittal]
    sparse[:, :, axial] = mask[:, :, axial]
    report = report_of(tmp_path, sparse, geometry, "--slices", "auto")
    found = {p["axis"]: p["indices"] for p in report["observed_planes"]}
    assert found == {"sagittal": sagittal, "axial": axial}


# --- cancelling --------------------------------------------------------------------------------------------------

def test_cancel_leaves_no_output(sphere_input, tmp_path, monkeypatch):
    path = sphere_input[0]
    monkeypatch.setattr(cli.ProgressLine, "__call__", lambda self, step, total, loss: step < 2)
    out, mesh, report = tmp_path / "out.nii.gz", tmp_path / "out.stl", tmp_path / "report.json"
    code = cli.main(["reconstruct", path, str(out), "--prior", untrained_prior_file(), "--steps", "5",
                     "--slices", "axial:4", "--surface", str(mesh), "--report", str(report), "--device", "cpu"])
    assert code == 130
    assert os.listdir(tmp_path) == []


def test_a_failure_while_writing_leaves_no_output_at_all(sphere_input, tmp_path, monkeypatch):
    """The labelmap, surface and report land together or not at all."""
    from MetaShapeReconLib import surface
    from MetaShapeReconLib.errors import InputError

    def failing_write(path, polydata, atomic=True):
        with open(path, "w") as handle:
            handle.write("half a mesh")
        raise InputError(f"could not write surface {path}")

    monkeypatch.setattr(surface, "write_surface", failing_write)
    code = cli.main(["reconstruct", sphere_input[0], str(tmp_path / "out.nii.gz"), "--prior", untrained_prior_file(),
                     "--steps", "0", "--slices", "axial:4", "--surface", str(tmp_path / "out.ply"),
                     "--report", str(tmp_path / "report.json"), "--device", "cpu", "--quiet"])
    assert code == 2
    assert os.listdir(tmp_path) == []


# --- bad input ---------------------------------------------------------------------------------------------------

def _bad_cases(folder):
    """{case: (argv, phrase)} with every file each case needs written under `folder`."""
    labels, geometry, _, _ = sphere_case()
    sparse = sparse_planes(labels != 0, 2, 4, 1)
    good = str(folder / "good.nii.gz")
    write_labelmap(good, sparse, geometry)
    prior = untrained_prior_file()

    def image(name, array_or_image):
        path = str(folder / name)
        if isinstance(array_or_image, np.ndarray):
            write_labelmap(path, array_or_image, geometry)
        else:
            sitk.WriteImage(array_or_image, path)
        return path

    def prior_variant(name, change_tensors=None, change_card=None):
        path = copy_prior(prior, str(folder / name), name)
        stem = path[:-len(".safetensors")]
        if change_tensors:
            with open(path, "wb") as handle:
                handle.write(change_tensors)
        if change_card:
            with open(stem + ".json") as handle:
                card = json.load(handle)
            change_card(card)
            with open(stem + ".json", "w") as handle:
                json.dump(card, handle)
        return path

    text = folder / "text.nii.gz"
    text.write_text("not an image\n")
    no_card = prior_variant("nocard")
    nested = prior_variant("nested")
    with open(nested[:-len(".safetensors")] + ".json", "w") as handle:
        handle.write("[" * 100000 + "]" * 100000)
    os.remove(no_card[:-len(".safetensors")] + ".json")
    priors_dir = folder / "priors"
    copy_prior(prior, str(priors_dir), "available-one")
    cases = {
        "missing file": ([str(folder / "absent.nii.gz")], "input file not found"),
        "unreadable file": ([str(text)], "cannot read"),
        "2-D image": ([image("flat.nii.gz", sitk.Image(20, 20, sitk.sitkUInt8))], "2-D image"),
        "vector image": ([image("rgb.nrrd", sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3))], "components per voxel"),
        "4-D image": ([image("series.nii.gz", sitk.Image([8, 8, 8, 3], sitk.sitkUInt8))], "4-D image"),
        "empty mask": ([image("empty.nii.gz", np.zeros(geometry.size, np.uint8))], "empty"),
        "full mask": ([image("full.nii.gz", np.ones(geometry.size, np.uint8))], "fills the whole grid"),
        "no observed plane": ([image("dense.nii.gz", labels)], "no observed plane found"),
        "label absent": ([good, "--label", "3"], "label 3 is absent"),
        "corrupt prior": ([good, "--prior", prior_variant("garbage", change_tensors=b"\x00garbage" * 50)],
                          "checksum does not match"),
        "corrupt prior without checksum": (
            [good, "--prior", prior_variant("garbage2", b"\x00garbage" * 50, lambda c: c.pop("weights_sha256"))],
            "corrupt or not a safetensors file"),
        "incompatible prior": (
            [good, "--prior", prior_variant("wide", change_card=lambda c: c["architecture"].update(
                hidden_features=256))], "does not match its architecture"),
        "prior from the future": (
            [good, "--prior", prior_variant("future", change_card=lambda c: c.update(format_version=99))],
            "format version 99 is not supported"),
        "prior without model card": ([good, "--prior", no_card], "model card not found"),
        "prior card nested too deeply": ([good, "--prior", nested], "nested too deeply"),
        # refused from the file's header, before the card's 8192 x 8192 layers would take 17 GB
        "prior with a huge architecture": (
            [good, "--prior", prior_variant("huge", change_card=lambda c: c["architecture"].update(
                hidden_features=8192, linear_layers=64))], "does not match its architecture"),
        "too many steps": ([good, "--steps", "99999999999999999999"], "at most 100,000"),
        "prior not found": ([good, "--prior", "no-such-prior"], "available-one"),
        "bad slices": ([good, "--slices", "diagonal:8"], "--slices"),
        "bad steps": ([good, "--steps", "lots"], "--steps"),
        "bad label": ([good, "--label", "kidney"], "invalid int value"),
        "unsupported output type": ([good, "--output", "out.png"], "unsupported file type"),
    }
    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = ([good, "--device", "cuda"], "CUDA is not available")
    return cases, {"METASHAPERECON_PRIORS": str(priors_dir)}


def _command(name, argv, folder, prior):
    """The full argument list of a bad-input case, its outputs in a folder of its own."""
    out = folder / name.replace(" ", "-")
    out.mkdir()
    output = str(out / "out.nii.gz")
    if "--output" in argv:  # the case names its own output
        at = argv.index("--output")
        output, argv = str(out / argv[at + 1]), argv[:at] + argv[at + 2:]
    if "--prior" not in argv:
        argv = argv + ["--prior", prior]
    command = ["reconstruct", argv[0], output] + argv[1:] + [
        "--surface", str(out / "out.vtk"), "--report", str(out / "report.json")]
    if "--steps" not in argv:
        command += ["--steps", "0"]
    return command, str(out)


# item 10 of the issue, each in a fresh interpreter like a user's shell
SUBPROCESS_CASES = ["missing file", "unreadable file", "2-D image", "vector image", "empty mask", "full mask",
                    "no observed plane", "label absent", "corrupt prior", "incompatible prior", "prior not found",
                    "cuda without CUDA"]
# more of the same kind, through `cli.main` in this process (the same code, without the start-up time)
IN_PROCESS_CASES = ["4-D image", "corrupt prior without checksum", "prior from the future",
                    "prior without model card", "prior card nested too deeply", "prior with a huge architecture",
                    "bad slices", "bad steps", "too many steps", "bad label", "unsupported output type"]


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    cases, env = _bad_cases(folder)
    return folder, cases, env


@pytest.fixture(scope="module")
def bad_runs(bad_cases):
    """Run the subprocess cases, a few at a time."""
    folder, cases, env = bad_cases
    prior = untrained_prior_file()

    def run(name):
        argv, phrase = cases[name]
        command, out = _command(name, argv, folder, prior)
        return name, (run_cli(*command, env=env), out, phrase)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(run, [name for name in SUBPROCESS_CASES if name in cases]))


def check_bad_run(code, stdout, stderr, folder, phrase):
    assert code == 2, (code, stderr)
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
    assert stderr.startswith("metashaperecon")
    assert phrase in stderr, stderr
    assert "Traceback" not in stderr and stdout == ""
    assert os.listdir(folder) == [], "an output or temporary file was left behind"


@pytest.mark.slow  # the fresh interpreters take half a minute together on a busy 2-core machine
@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_one_line_exit_2_no_output(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("CUDA is available here")
    done, folder, phrase = bad_runs[case]
    check_bad_run(done.returncode, done.stdout, done.stderr, folder, phrase)


@pytest.mark.parametrize("case", IN_PROCESS_CASES)
def test_more_bad_input_in_process(bad_cases, case, monkeypatch, capsys):
    folder, cases, env = bad_cases
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv, phrase = cases[case]
    command, out = _command(case, argv, folder, untrained_prior_file())
    try:
        code = cli.main(command)
    except SystemExit as stop:  # argparse
        code = stop.code
    captured = capsys.readouterr()
    check_bad_run(code, captured.out, captured.err, out, phrase)


@pytest.mark.slow
def test_prior_not_found_lists_the_available_priors(bad_runs):
    message = bad_runs["prior not found"][0].stderr
    assert "'no-such-prior' not found" in message and "available-one" in message


# --- the command line itself -------------------------------------------------------------------------------------

def test_help_lists_the_contracts_options(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["reconstruct", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for option in ("--prior", "--steps", "--slices", "--label", "--device", "--precision", "--surface", "--report",
                   "--output-spacing", "--interpolation", "--evaluation", "--smoothing", "--quiet"):
        assert option in text, option
    usage = " ".join(text.split("\n\n")[0].split())
    assert usage.startswith("usage: metashaperecon reconstruct") and usage.endswith(" input output"), usage


@pytest.mark.parametrize("argv", [["reconstruct", "only-input.nii.gz"],
                                  ["reconstruct", "in.nii.gz", "out.nii.gz", "--precision", "half"]])
def test_usage_errors_are_one_line_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_priors_command_lists_priors_by_name(tmp_path, monkeypatch, capsys):
    copy_prior(untrained_prior_file(), str(tmp_path), "listed-prior")
    monkeypatch.setenv("METASHAPERECON_PRIORS", str(tmp_path))
    assert cli.main(["priors"]) == 0
    assert "listed-prior" in capsys.readouterr().out


# --- outputs that must not land, inputs that must not read as a success --------------------------------------

def quick_run(*argv):
    """cli.main on the untrained prior without adaptation; the exit status."""
    return cli.main(list(argv) + ["--prior", untrained_prior_file(), "--steps", "0", "--device", "cpu", "--quiet"])


def check_refused(capsys, code, phrase):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("metashaperecon: error:") and phrase in err, err


def test_a_truncated_input_is_refused(sphere_input, tmp_path, capsys):
    source = tmp_path / "in" / "cut.nii.gz"
    source.parent.mkdir()
    data = open(sphere_input[0], "rb").read()
    source.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    code = quick_run("reconstruct", str(source), str(out / "o.nii.gz"), "--slices", "axial:4")
    check_refused(capsys, code, "is truncated or corrupt")
    assert os.listdir(out) == []


def test_a_folder_named_like_the_output_is_refused_before_any_work(sphere_input, tmp_path, capsys):
    (tmp_path / "o.nii.gz").mkdir()
    code = quick_run("reconstruct", sphere_input[0], str(tmp_path / "o.nii.gz"), "--slices", "axial:4",
                     "--surface", str(tmp_path / "s.vtk"), "--report", str(tmp_path / "r.json"))
    check_refused(capsys, code, "a folder of that name")
    assert os.listdir(tmp_path) == ["o.nii.gz"] and os.listdir(tmp_path / "o.nii.gz") == []


def test_a_labelmap_that_cannot_be_moved_into_place_leaves_neither_surface_nor_report(sphere_input, tmp_path,
                                                                                      monkeypatch, capsys):
    real_replace = os.replace

    def replace(source, destination):
        if str(destination).endswith("o.nii.gz"):
            raise OSError(28, "No space left on device", str(destination))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    code = quick_run("reconstruct", sphere_input[0], str(tmp_path / "o.nii.gz"), "--slices", "axial:4",
                     "--surface", str(tmp_path / "s.vtk"), "--report", str(tmp_path / "r.json"))
    check_refused(capsys, code, "could not write the outputs (No space left on device); none was written")
    assert os.listdir(tmp_path) == []


def test_an_output_may_not_replace_a_file_the_run_reads(sphere_input, tmp_path, capsys):
    """Not the input's data file beside its header, not the prior or its model card."""
    source = str(tmp_path / "drawing.mhd")
    write_labelmap(source, read_labelmap(sphere_input[0])[0], sphere_input[2])
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert sorted(before) == ["drawing.mhd", "drawing.zraw"]
    code = quick_run("reconstruct", source, str(tmp_path / "drawing.MHD"), "--slices", "axial:4")
    check_refused(capsys, code, "(its data file")
    prior = copy_prior(untrained_prior_file(), str(tmp_path / "prior"), "mine")
    card = prior[:-len(".safetensors")] + ".json"
    code = cli.main(["reconstruct", source, str(tmp_path / "o.nii.gz"), "--prior", prior, "--steps", "0",
                     "--slices", "axial:4", "--report", card, "--quiet"])
    check_refused(capsys, code, "is the same file as the prior's model card")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["drawing.mhd", "drawing.zraw", "prior"]


def test_an_output_may_not_replace_the_input_or_another_output(sphere_input, tmp_path, capsys):
    source = tmp_path / "drawing.nii.gz"
    shutil.copy(sphere_input[0], source)
    before = source.read_bytes()
    check_refused(capsys, quick_run("reconstruct", str(source), str(source), "--slices", "axial:4"),
                  "is the same file as the input")
    link = tmp_path / "link.nii.gz"
    link.symlink_to(source)
    check_refused(capsys, quick_run("reconstruct", str(source), str(link), "--slices", "axial:4"),
                  "is the same file as the input")
    mesh = tmp_path / "mesh.vtk"
    mesh.symlink_to(tmp_path / "o.nii.gz")  # dangling: a surface written through it would replace the output
    check_refused(capsys, quick_run("reconstruct", str(source), str(tmp_path / "o.nii.gz"), "--slices", "axial:4",
                                    "--surface", str(mesh)), "is the same file as output")
    assert source.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["drawing.nii.gz", "link.nii.gz", "mesh.vtk"]


def test_upper_case_output_suffixes_write_exactly_the_named_files(sphere_input, tmp_path):
    code = quick_run("reconstruct", sphere_input[0], str(tmp_path / "O.NII.GZ"), "--slices", "axial:4",
                     "--surface", str(tmp_path / "S.VTK"), "--report", str(tmp_path / "R.JSON"))
    assert code == 0
    assert quick_run("reconstruct", sphere_input[0], str(tmp_path / "O.MHA"), "--slices", "axial:4") == 0
    assert sorted(os.listdir(tmp_path)) == ["O.MHA", "O.NII.GZ", "R.JSON", "S.VTK"]
    for name in ("O.NII.GZ", "O.MHA"):
        assert read_labelmap(str(tmp_path / name))[1].size == sphere_input[2].size


@pytest.mark.parametrize("spacing,phrase", [("nan", "finite positive"), ("inf", "finite positive"),
                                            ("0", "finite positive"), ("1e-6", "choose a coarser spacing"),
                                            ("1000", "coarser than the image")])
def test_output_spacing_must_be_finite_positive_and_not_too_fine(sphere_input, tmp_path, capsys, spacing, phrase):
    code = quick_run("reconstruct", sphere_input[0], str(tmp_path / "o.nii.gz"), "--slices", "axial:4",
                     "--report", str(tmp_path / "r.json"), "--output-spacing", spacing)
    check_refused(capsys, code, phrase)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("option,phrase", [(["--smoothing", "-3"], "--smoothing -3"),
                                           (["--label", "0"], "label 0 is the background"),
                                           (["--slices", ""], "--slices is empty")])
def test_small_bad_values_are_refused(sphere_input, tmp_path, capsys, option, phrase):
    argv = ["reconstruct", sphere_input[0], str(tmp_path / "o.nii.gz"), "--surface", str(tmp_path / "s.vtk")]
    if "--slices" not in option:
        argv += ["--slices", "axial:4"]
    check_refused(capsys, quick_run(*(argv + option)), phrase)
    assert os.listdir(tmp_path) == []


def test_debug_is_accepted_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["reconstruct", "a.nii.gz", "b.nii.gz", "--debug"]).debug is True
    assert parser.parse_args(["--debug", "reconstruct", "a.nii.gz", "b.nii.gz"]).debug is True
    assert parser.parse_args(["reconstruct", "a.nii.gz", "b.nii.gz"]).debug is False
    assert parser.parse_args(["priors", "--debug"]).debug is True


def test_report_names_the_output_the_label_and_an_absolute_prior_path(sphere_input, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prior = os.path.relpath(untrained_prior_file())
    assert not os.path.isabs(prior)
    code = cli.main(["reconstruct", sphere_input[0], "o.nii.gz", "--prior", prior, "--steps", "0", "--label", "1",
                     "--slices", "axial:4", "--device", "cpu", "--report", "r.json", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"]["path"] == str(tmp_path / "o.nii.gz")
    assert report["label"] == 1
    assert report["prior_path"] == untrained_prior_file()
    assert report["steps_used"] == report["steps"] == 0


def test_priors_lists_every_prior_and_marks_a_broken_one(tmp_path, monkeypatch, capsys):
    copy_prior(untrained_prior_file(), str(tmp_path), "a-broken-one")
    with open(tmp_path / "a-broken-one.json", "w") as handle:
        handle.write("{not json")
    copy_prior(untrained_prior_file(), str(tmp_path), "b-good-one")
    monkeypatch.setenv("METASHAPERECON_PRIORS", str(tmp_path))
    assert cli.main(["priors"]) == 0
    lines = capsys.readouterr().out.splitlines()
    broken = [line for line in lines if line.startswith("a-broken-one")]
    assert len(broken) == 1 and "BROKEN" in broken[0] and "not valid JSON" in broken[0]
    assert any(line.startswith("b-good-one") and "BROKEN" not in line for line in lines)


@pytest.mark.parametrize("where", ["a-file", "a-file/sub", "cuda"])
def test_demo_refuses_a_bad_folder_or_device_and_makes_nothing(tmp_path, monkeypatch, capsys, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("in the way\n")
    if where == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        argv, phrase = ["demo", "--device", "cuda", "--output-dir", "d3"], "CUDA is not available"
    else:
        argv, phrase = ["demo", "--output-dir", where], "is a file, not a folder"
    check_refused(capsys, cli.main(argv), phrase)
    assert os.listdir(tmp_path) == ["a-file"]


def test_demo_reconstructs_the_bundled_sample_and_reports_what_it_wrote(tmp_path, capsys):
    """The README's main job: the bundled kidney prior on the held-out sample, beside Fill between
    slices on the same input, with the files it says it wrote."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output-dir", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = next(line for line in lines if line.startswith("MetaShapeRecon (kidney prior"))
    fill = next(line for line in lines if line.startswith("Fill between slices (same input)"))
    assert {"reconstruction.nii.gz", "reconstruction.vtk", "report.json", "preview.png"} <= set(os.listdir(out))
    truth, geometry = read_labelmap(os.path.join(ROOT, "Resources", "Samples", "kidney", "truth.nii.gz"))
    written, written_geometry = read_labelmap(str(out / "reconstruction.nii.gz"))
    assert written_geometry.same_grid(geometry)
    report = json.loads((out / "report.json").read_text())
    assert report["dice_truth"] == pytest.approx(dice(written, truth))
    assert f"Dice {report['dice_truth']:.3f} in {report['seconds']:.2f} s" in ours
    assert report["dice_truth"] > float(fill.split("Dice ")[1].split()[0])  # ahead of Fill between slices
