"""Networks the tests fit themselves, and the cases they are fitted to.

Until a meta-learned prior is bundled, tests never present a random network as a prior: they
fit the SIREN to a synthetic shape with the engine's own adaptation code and save the result
as a prior file. Fits are cached for the whole test session (they take seconds).
"""

import atexit
import contextlib
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np
from MetaShapeReconLib.geometry import Geometry
from shapes import ellipsoid

_WORK = tempfile.mkdtemp(prefix="msr-fitted-")
atexit.register(shutil.rmtree, _WORK, True)


def rotation(degrees_x: float, degrees_y: float, degrees_z: float) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx (angles in degrees)."""
    x, y, z = (math.radians(a) for a in (degrees_x, degrees_y, degrees_z))
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx


# an oblique, anisotropic grid: no image axis is within 15 degrees of a patient axis
OBLIQUE_DIRECTION = rotation(20, -15, 30)


def oblique_geometry(size: Sequence[int] = (26, 26, 20), spacing: Sequence[float] = (1.5, 1.8, 2.4),
                     origin: Sequence[float] = (-40.0, 25.0, 130.0)) -> Geometry:
    return Geometry.create(size, spacing, origin, OBLIQUE_DIRECTION.ravel())


def grid_centre(geometry: Geometry) -> np.ndarray:
    """LPS position of the grid's centre."""
    return geometry.index_to_physical((np.asarray(geometry.size, float) - 1.0) / 2.0)


SPHERE_RADIUS_MM = 18.0


def sphere_case():
    """(labels, geometry, centre, radius): a sphere filling most of an oblique, anisotropic grid."""
    geometry = oblique_geometry()
    centre = grid_centre(geometry)
    labels = ellipsoid(geometry, centre, [SPHERE_RADIUS_MM] * 3).astype(np.int32)
    return labels, geometry, centre, SPHERE_RADIUS_MM


@contextlib.contextmanager
def single_thread():
    """Run PyTorch on one thread: on a loaded 2-core machine a long run of small steps is several
    times faster than with two threads fighting for the cores (the results are the same)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quick_prior(name: str = "test-untrained", extent_mm: float = 96.0, lr: float = 3e-4,
                context_points: int = 4096, steps: int = 0, max_steps: int = 1000, seed: int = 0,
                hidden_features: int = 128):
    """A SIREN-initialised network with adaptation settings that fit small test shapes quickly."""
    from MetaShapeReconLib.prior import initial_prior

    return initial_prior(name, extent_mm, seed=seed, hidden_features=hidden_features,
                         adaptation={"steps": steps, "context_points": context_points,
                                     "auto": {"optimizer": "adam", "lr": lr, "patience": 10,
                                              "max_steps": max_steps}},
                         note="made by the test suite; not an anatomy prior")


def fit(prior, labels: np.ndarray, geometry: Geometry, slices: str, seed: int = 0):
    """Adapt `prior` to a case exactly as `reconstruct(steps="auto")` does (the prior's
    adaptation until the context loss stops improving); returns (prior, losses) where the prior's
    weights are the adapted ones and its default steps are 0."""
    import copy

    from MetaShapeReconLib.adaptation import steps_until_converged
    from MetaShapeReconLib.frame import centre_frame
    from MetaShapeReconLib.pipeline import observed_context, structure_mask
    from MetaShapeReconLib.planes import select_planes
    from MetaShapeReconLib.prior import Prior

    settings = prior.adaptation
    mask = structure_mask(labels)
    planes = select_planes(slices, mask, geometry)
    frame = centre_frame(prior.frame_spec, geometry, mask, planes)
    coords, target = observed_context(mask, geometry, planes, frame)
    auto = settings["auto"]
    with single_thread():
        params, losses = steps_until_converged(prior.adaptation_steps(prior.context(coords, target, seed)), prior.params,
                                               int(auto["patience"]), int(auto["max_steps"]))
    card = copy.deepcopy(prior.card)
    card["adaptation"]["steps"] = 0
    card["fitted"] = {"steps": len(losses), "final_loss": min(losses) if losses else None}
    return Prior(prior.model, params, prior.inner_lr, card), losses


@functools.cache
def fitted_sphere_prior() -> str:
    """Path of a prior file fitted to `sphere_case()` from all its axial planes."""
    from MetaShapeReconLib.prior import save_prior

    labels, geometry, _, _ = sphere_case()
    # a narrower SIREN than the products' (64 hidden units) fits four times faster; the geometry
    # tests need a good fit of this one sphere, not the product's architecture
    prior, _ = fit(quick_prior("test-sphere", hidden_features=64), labels, geometry, "axial:1")
    path = os.path.join(_WORK, "test-sphere.safetensors")
    save_prior(prior, path)
    return path


@functools.cache
def untrained_prior_file() -> str:
    """Path of a SIREN-initialised prior file (for tests where the network's answer does not matter)."""
    from MetaShapeReconLib.prior import save_prior

    path = os.path.join(_WORK, "test-untrained.safetensors")
    save_prior(quick_prior(), path)
    return path


def run_cli(*args, env=None, script=False, timeout=300) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter (`python -m MetaShapeReconLib`, or the console script)."""
    if script:
        command = [os.path.join(os.path.dirname(sys.executable), "metashaperecon")]
        if not os.path.isfile(command[0]):
            command = [shutil.which("metashaperecon") or "metashaperecon"]
    else:
        command = [sys.executable, "-m", "MetaShapeReconLib"]
    environment = dict(os.environ)
    environment.update(env or {})
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=environment,
                          timeout=timeout)
