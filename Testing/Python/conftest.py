"""Shared pytest set-up.

Real data is read from $METASHAPERECON_DATA (CI points it at ../shared/data); tests that need
it are skipped with the reason when it is absent.
"""

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DATA_ENV = "METASHAPERECON_DATA"


@pytest.fixture(scope="session")
def data_dir():
    path = os.environ.get(DATA_ENV)
    if not path:
        pytest.skip(f"real data not available: set {DATA_ENV} to the shared data folder")
    if not os.path.isdir(path):
        pytest.skip(f"real data not available: {DATA_ENV}={path} is not a folder")
    return path


def pytest_unconfigure(config):
    # vtkITK filters (slicer-core) can crash the interpreter at exit after the work succeeded;
    # leave with pytest's own status instead of running those destructors.
    if getattr(config, "_metashaperecon_exit", False) or "slicer" in sys.modules:
        fitted = sys.modules.get("fitted")
        if fitted is not None:  # its atexit clean-up would not run
            shutil.rmtree(fitted._WORK, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        status = getattr(config, "_exitstatus", None)
        if status is not None:
            os._exit(int(status))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._exitstatus = exitstatus
