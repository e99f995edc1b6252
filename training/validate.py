"""Validation Dice of a prior, through the engine's own reconstruction pipeline."""

from typing import List, Sequence

import numpy as np
from MetaShapeReconLib.pipeline import dice, reconstruct
from MetaShapeReconLib.planes import keep_drawn_planes, parse_slices, planes_from_rules


def sparse_input(mask: np.ndarray, planes) -> np.ndarray:
    """The labelmap a user would have drawn: the structure on the observed planes only."""
    return keep_drawn_planes(np.zeros(mask.shape, dtype=np.uint8), mask, planes)


def validate(prior, shapes, slices: str, steps: Sequence[int], seed: int = 0, precision: str = "auto") -> List[dict]:
    """Dice against the whole shape after each number of steps, planes `slices` (AXIS:STEP) at a
    seeded offset per shape, reconstructed in `precision` (`reconstruct`'s) by the network alone:
    training selects the network, and the card's interpolation would mask it between close planes."""
    rng = np.random.default_rng(seed)
    (axis, step, _), = parse_slices(slices if slices.count(":") == 2 else slices + ":0")
    rows = []
    for shape in shapes:
        rule = f"{axis}:{step}:{int(rng.integers(step))}"
        planes = planes_from_rules(parse_slices(rule), shape.geometry)
        sparse = sparse_input(shape.mask, planes)
        if not sparse.any():
            continue
        for count in steps:
            result = reconstruct(sparse, shape.geometry, prior, steps=count, slices=rule, device=str(
                next(iter(prior.params.values())).device.type), precision=precision, interpolation=0)
            rows.append({"setting": rule, "steps": count, "dice": dice(result.labels, shape.mask)})
    return rows
