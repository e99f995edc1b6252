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
    for row in ("| ours, 1 step |", "| Fill between slices |", "| signed-distance interpolation |",
                "| coarse-to-fine |", "| dense |", "| 256 x 256 x 300 |"):
        assert row in out, f"missing row {row!r} in:\n{out}"
    from MetaShapeReconLib.prior import load_prior
    default = f"| ours, {load_prior('kidney').default_steps} steps |"  # the bundled prior's default
    assert default in out
    assert "failed" not in out
    # the bundled kidney prior on the bundled sample: real Dice values, not an untrained stand-in
    assert "prior: kidney" in out and "untrained SIREN" not in out
    ours = [line for line in out.splitlines() if line.startswith(default)]
    assert ours and all(0.8 < float(line.split("|")[6]) <= 1.0 for line in ours), ours


def test_bench_rejects_a_missing_prior_in_full_mode(tmp_path):
    done = subprocess.run([sys.executable, "-m", "MetaShapeReconLib.bench", "--prior", str(tmp_path / "none")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert "error" in done.stderr and "Traceback" not in done.stderr
