"""Observed planes: which whole image planes the user looked at.

Every voxel of an observed plane is an observation, background included; voxels off the
observed planes are unknown and never used. Planes are kept as {image axis: sorted indices}.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .geometry import PATIENT_AXES, Geometry

ObservedPlanes = Dict[int, np.ndarray]
IMAGE_AXES = ("i", "j", "k")
SliceRule = Tuple[str, int, int]  # (axis name, step, offset)


def parse_slices(spec: str) -> Optional[List[SliceRule]]:
    """`auto` (or None) -> None; `AXIS:STEP[:OFFSET][,AXIS:STEP[:OFFSET]...]` -> rules."""
    if spec is None:
        return None
    spec = spec.strip().lower()
    if not spec:  # an empty value is a mistake (an unset shell variable), not a request for auto
        raise InputError("--slices is empty: expected auto or AXIS:STEP[:OFFSET] (e.g. sagittal:8:4)")
    if spec == "auto":
        return None
    rules = []
    for part in spec.split(","):
        fields = part.strip().split(":")
        if len(fields) not in (2, 3) or fields[0] not in PATIENT_AXES + IMAGE_AXES:
            raise InputError(f"--slices {spec!r}: expected auto or AXIS:STEP[:OFFSET] with AXIS one of "
                             "sagittal, coronal, axial, i, j, k (e.g. sagittal:8:4)")
        try:
            step = int(fields[1])
            offset = int(fields[2]) if len(fields) == 3 else 0
        except ValueError:
            raise InputError(f"--slices {spec!r}: STEP and OFFSET must be integers") from None
        if step < 1 or not 0 <= offset < step:
            raise InputError(f"--slices {spec!r}: need STEP >= 1 and 0 <= OFFSET < STEP")
        rules.append((fields[0], step, offset))
    return rules


def image_axis(name: str, geometry: Geometry) -> int:
    if name in IMAGE_AXES:
        return IMAGE_AXES.index(name)
    return geometry.patient_axis_order()[PATIENT_AXES.index(name)]


def planes_from_rules(rules: Sequence[SliceRule], geometry: Geometry) -> ObservedPlanes:
    planes: Dict[int, set] = {}
    for name, step, offset in rules:
        axis = image_axis(name, geometry)
        planes.setdefault(axis, set()).update(range(offset, geometry.size[axis], step))
    planes = {axis: np.array(sorted(indices), dtype=np.int64) for axis, indices in planes.items() if indices}
    if not planes:
        raise InputError("no observed plane: the --slices rule selects no plane inside the image")
    return planes


def _shift_has(mask: np.ndarray, axis: int, direction: int) -> np.ndarray:
    """mask shifted by one voxel along `axis` (False where it falls off the edge)."""
    shifted = np.zeros_like(mask)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    if direction > 0:
        src[axis], dst[axis] = slice(0, -1), slice(1, None)
    else:
        src[axis], dst[axis] = slice(1, None), slice(0, -1)
    shifted[tuple(dst)] = mask[tuple(src)]
    return shifted


def detect_planes(mask: np.ndarray) -> ObservedPlanes:
    """Find the annotated planes of a sparse labelmap, in one or several orientations.

    A voxel drawn on an isolated plane along axis a has background on both sides along a.
    A voxel that is isolated along exactly one axis is evidence for its plane along that axis
    (lines and dots, isolated along two or three axes, prove nothing); a plane is annotated when
    at least half of its foreground is such evidence. Planes crossing another orientation's
    drawing pick up only the intersection lines, whose neighbours along the axis are drawn.
    A plane whose drawing is too thin to prove itself (a dot or a line at a shape's tip, isolated
    along several axes) joins an orientation found that way when all of it is isolated along that
    axis and it continues that orientation's regular spacing (at least two planes, evenly spaced)."""
    nonzero = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], \
        np.nonzero(mask.any(axis=(0, 1)))[0]
    if any(len(n) == 0 for n in nonzero):
        return {}
    low = [int(n[0]) for n in nonzero]
    box = mask[tuple(slice(n[0], n[-1] + 1) for n in nonzero)]
    isolated = [box & ~_shift_has(box, a, +1) & ~_shift_has(box, a, -1) for a in range(3)]
    isolated_axes = isolated[0].astype(np.uint8) + isolated[1] + isolated[2]
    planes = {}
    candidates = {}
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        foreground = box.sum(axis=others)
        evidence = (isolated[axis] & (isolated_axes == 1)).sum(axis=others)
        annotated = (foreground > 0) & (2 * evidence >= foreground)
        if annotated.any():
            planes[axis] = annotated
        # planes whose whole drawing is isolated along this axis, but too thin (a dot or a line at a
        # shape's tip) to prove it: isolated along another axis as well
        candidates[axis] = (foreground > 0) & ~annotated & (isolated[axis].sum(axis=others) == foreground)
    for axis in list(planes):
        # a thin plane continues the regular spacing of this orientation's planes (it is a tip of
        # a shape drawn every `step` planes)
        indices = np.nonzero(planes[axis])[0]
        steps = np.diff(indices)
        if len(indices) < 2 or not np.all(steps == steps[0]):
            continue
        step = int(steps[0])
        positions = np.arange(len(planes[axis]))
        extra = candidates[axis] & (positions % step == indices[0] % step) \
            & (positions >= indices[0] - step) & (positions <= indices[-1] + step)
        if not extra.any():
            continue
        # and holds some drawing that no plane of another orientation explains
        explained = np.zeros(box.shape, dtype=bool)
        for other, annotated in planes.items():
            if other != axis:
                index = [slice(None)] * 3
                index[other] = annotated
                explained[tuple(index)] = True
        others = tuple(a for a in range(3) if a != axis)
        extra &= (box & ~explained).any(axis=others)
        planes[axis] = planes[axis] | extra
    return {axis: np.nonzero(annotated)[0].astype(np.int64) + low[axis] for axis, annotated in planes.items()}


def select_planes(slices: str, mask: np.ndarray, geometry: Geometry) -> ObservedPlanes:
    rules = parse_slices(slices)
    if rules is not None:
        return planes_from_rules(rules, geometry)
    planes = detect_planes(mask)
    if not planes:
        raise InputError("no observed plane found: the labelmap has no isolated annotated plane "
                         "(is it densely labelled? then name the planes, e.g. --slices axial:1)")
    return planes


def regular_pattern(indices: np.ndarray) -> Optional[Tuple[int, int]]:
    """(step, offset) when the indices are evenly spaced (at least three, step >= 2)."""
    if len(indices) < 3:
        return None
    steps = np.diff(indices)
    if steps[0] < 2 or not np.all(steps == steps[0]):
        return None
    return int(steps[0]), int(indices[0] % steps[0])


def describe_planes(planes: ObservedPlanes, geometry: Geometry) -> List[dict]:
    """Report-friendly description, naming each image axis by its closest patient axis."""
    order = geometry.patient_axis_order()
    described = []
    for axis in sorted(planes):
        indices = planes[axis]
        entry = {"axis": PATIENT_AXES[order.index(axis)], "image_axis": IMAGE_AXES[axis],
                 "count": int(len(indices)), "indices": [int(i) for i in indices]}
        pattern = regular_pattern(indices)
        if pattern:
            entry["pattern"] = f"{entry['axis']}:{pattern[0]}:{pattern[1]}"
        described.append(entry)
    return described


def keep_drawn_planes(output: np.ndarray, drawn: np.ndarray, planes: ObservedPlanes) -> np.ndarray:
    """`output` with the voxels of the observed planes taken from `drawn` (in place; returned)."""
    for axis, indices in planes.items():
        index = [slice(None)] * 3
        index[axis] = indices
        output[tuple(index)] = drawn[tuple(index)]
    return output


def drop_unsupported_parts(output: np.ndarray, planes: ObservedPlanes,
                           seen: Optional[Tuple[slice, ...]] = None) -> Tuple[int, int]:
    """Remove the connected parts of `output` (26-connected) that touch no foreground voxel of the
    observed planes: nothing the user drew supports them. Call after `keep_drawn_planes`, so the
    planes hold the drawing. `seen`: the box where the planes were drawn (default: everywhere);
    plane voxels outside it support nothing. In place; returns (parts removed, voxels removed)."""
    import SimpleITK as sitk

    foreground = [np.nonzero(output.any(axis=others))[0] for others in ((1, 2), (0, 2), (0, 1))]
    if any(len(f) == 0 for f in foreground):
        return 0, 0
    box = tuple(slice(int(f[0]), int(f[-1]) + 1) for f in foreground)
    region = output[box]
    parts = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(region.astype(np.uint8)), True))
    observed = observed_mask(output.shape, planes, box)
    if seen is not None:
        within = np.zeros_like(observed)
        within[tuple(slice(max(s.start - b.start, 0), max(min(s.stop, b.stop) - b.start, 0))
                     for s, b in zip(seen, box))] = True
        observed &= within
    supported = np.zeros(int(parts.max()) + 1, dtype=bool)
    supported[np.unique(parts[observed & (parts > 0)])] = True
    unsupported = (parts > 0) & ~supported[parts]
    count, voxels = int(parts.max()) - int(supported[1:].sum()), int(unsupported.sum())
    region[unsupported] = 0
    return count, voxels


def finish_on_drawing(output: np.ndarray, drawn: np.ndarray, planes: ObservedPlanes) -> Tuple[int, int]:
    """How every reconstruction on the drawing's grid ends: the drawing stands on the observed
    planes, and the parts it does not touch go. In place; returns (parts removed, voxels removed)."""
    keep_drawn_planes(output, drawn, planes)
    return drop_unsupported_parts(output, planes)


def observed_mask(shape: Sequence[int], planes: ObservedPlanes, region: Optional[Tuple[slice, ...]] = None
                  ) -> np.ndarray:
    """Boolean mask of observed voxels over `region` (a box of slices; whole grid by default)."""
    region = region or tuple(slice(0, n) for n in shape)
    observed = np.zeros([r.stop - r.start for r in region], dtype=bool)
    for axis, indices in planes.items():
        inside = indices[(indices >= region[axis].start) & (indices < region[axis].stop)]
        index = [slice(None)] * 3
        index[axis] = inside - region[axis].start
        observed[tuple(index)] = True
    return observed
