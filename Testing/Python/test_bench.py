"""The benchmark's short mode runs end to end and prints its tables (no timing assertions)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_short_prints_the_tables(tmp_path):
    env = dict(os.environ)
    env.pop("METASHAPERECON_PRIORS", None)
    done = subprocess.run([sys.executable, "-m", "MetaShapeReconLib.bench", "--short"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    from MetaShapeReconLib.pipeline import native_bfloat16
    from MetaShapeReconLib.prior import load_prior

    # the default precision, and float32 beside it where the default is bfloat16; the card's
    # interpolation, and the network alone beside it after the default steps
    precisions = ["bfloat16", "float32"] if native_bfloat16() else ["float32"]
    for row in [f"| ours, 1 step, {p} + interpolation |" for p in precisions] + [
            "| Fill between slices |", "| signed-distance interpolation |", "| coarse-to-fine |", "| dense |",
            "| 256 x 256 x 300 |"]:
        assert row in out, f"missing row {row!r} in:\n{out}"
    assert "failed" not in out
    # the bundled kidney prior on the bundled sample: real Dice values, not an untrained stand-in
    assert "prior: kidney" in out and "untrained SIREN" not in out
    steps = load_prior("kidney").default_steps

    def dice_of(row):
        found = [line for line in out.splitlines() if line.startswith(row)]
        assert len(found) == 1, (row, out)
        return float(found[0].split("|")[6])

    for precision in precisions:
        assert 0.8 < dice_of(f"| ours, {steps} steps, {precision} + interpolation |") <= 1.0
    # planes every 8 mm on the sample: interpolation's evidence adds to the network's
    alone = dice_of(f"| ours, {steps} steps, {precisions[0]}, network alone |")
    assert 0.8 < alone < dice_of(f"| ours, {steps} steps, {precisions[0]} + interpolation |")


def test_bench_rejects_a_missing_prior_in_full_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "MetaShapeReconLib.bench", "--prior", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "error" in done.stderr and "Traceback" not in done.stderr


def _ellipsoid_file(path, radii_mm=(20.0, 14.0, 30.0), spacing=(1.5, 1.5, 2.0), size=(60, 60, 50)):
    import numpy as np
    import SimpleITK as sitk

    axes = [(np.arange(n) - (n - 1) / 2.0) * s / r for n, s, r in zip(size, spacing, radii_mm)]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    inside = (i ** 2 + j ** 2 + k ** 2 <= 1.0).astype(np.uint8)
    image = sitk.GetImageFromArray(inside.transpose(2, 1, 0))  # SimpleITK arrays are (k, j, i)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return 4.0 / 3.0 * np.pi * np.prod(radii_mm)


def test_bench_truth_is_cut_to_the_canonical_crop(tmp_path):
    """--truth: a segmentation of another anatomy, resampled onto the 1 mm 128^3 crop it is timed on."""
    from MetaShapeReconLib.bench import load_truth

    volume_mm3 = _ellipsoid_file(tmp_path / "shape.nii.gz")
    mask, geometry, source = load_truth(None, str(tmp_path / "shape.nii.gz"))
    assert mask.shape == (128, 128, 128) and geometry.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert mask.sum() == pytest.approx(volume_mm3, rel=0.05)
    assert str(tmp_path / "shape.nii.gz") in source


def test_bench_rejects_a_missing_or_empty_truth(tmp_path, capsys):
    import numpy as np
    import SimpleITK as sitk
    from MetaShapeReconLib.bench import main

    assert main(["--truth", str(tmp_path / "none.nii.gz")]) == 1
    assert "input file not found" in capsys.readouterr().err
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.uint8)), str(tmp_path / "empty.nii.gz"))
    assert main(["--truth", str(tmp_path / "empty.nii.gz")]) == 1
    assert "the segmentation is empty" in capsys.readouterr().err
