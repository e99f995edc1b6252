"""Progress bars with ETA (tqdm), quiet when stderr is not a terminal unless asked."""

import os
import sys


def progress_bar(**kwargs):
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0 if sys.stderr.isatty() else 30.0)
    kwargs["disable"] = kwargs.get("disable", False) or os.environ.get("METASHAPERECON_NO_PROGRESS") == "1"
    return tqdm(**kwargs)
