"""MetaShapeRecon engine: sparse segmentation in, complete 3-D shape out.

Qt-free and importable without PyTorch: names load on first use, so the Slicer module's UI
opens before torch is imported.

    from MetaShapeReconLib import load_prior, read_labelmap, reconstruct
    labels, geometry = read_labelmap("sparse.nii.gz")
    result = reconstruct(labels, geometry, load_prior("kidney"), slices="auto")
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "InputError": "errors", "Cancelled": "errors",
    "Geometry": "geometry",
    "read_labelmap": "labelmap_io", "write_labelmap": "labelmap_io",
    "Siren": "siren", "reconstruction_loss": "siren",
    "Prior": "prior", "load_prior": "prior", "save_prior": "prior", "initial_prior": "prior",
    "list_bundled_priors": "prior",
    "FrameSpec": "frame", "CanonicalFrame": "frame", "centre_frame": "frame",
    "select_planes": "planes", "detect_planes": "planes",
    "adapt": "adaptation", "inner_step": "adaptation",
    "reconstruct": "pipeline", "Reconstruction": "pipeline", "dice": "pipeline",
    "surface_from_labelmap": "surface", "write_surface": "surface",
    "reconstruct_segment": "slicer_logic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
