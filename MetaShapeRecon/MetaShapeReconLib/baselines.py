"""The classic ways to fill in a sparsely drawn structure, on the same inputs as ours.

Both take what `reconstruct` takes: a sparse mask indexed (i, j, k) and its observed planes
{image axis: plane indices}. Voxels off the observed planes are ignored (unknown), and the
result keeps the drawing on the observed planes, as `reconstruct` does, so Dice compares the
methods on what they add between the planes.

- `fill_between_slices`: 3D Slicer's Segment Editor effect *Fill between slices*, which is ITK's
  morphological contour interpolation (Albu et al. 2008) through `vtkITKMorphologicalContourInterpolator`,
  called as the effect calls it (all axes, default settings).
- `signed_distance_interpolation`: shape-based interpolation (Raya & Udupa 1990; Herman et al.
  1992): a 2-D signed distance map in millimetres on every observed plane, linearly interpolated
  between consecutive observed planes of one orientation, inside where the result is negative.
"""

import threading
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .geometry import Geometry
from .planes import keep_drawn_planes

PlanesLike = Mapping[int, Sequence[int]]


def _checked_inputs(sparse_mask: np.ndarray, planes: PlanesLike, geometry: Optional[Geometry]
                    ) -> Tuple[np.ndarray, dict, Tuple[float, float, float]]:
    """(boolean mask with only the observed voxels, {axis: sorted unique int64 indices}, spacing mm)."""
    mask = np.asarray(sparse_mask)
    if mask.ndim != 3 or min(mask.shape) < 1:
        raise InputError(f"a sparse mask must be a 3-D array, got shape {mask.shape}")
    if geometry is not None and tuple(mask.shape) != tuple(geometry.size):
        raise InputError(f"mask array {mask.shape} does not match its geometry {geometry.size}")
    if not planes:
        raise InputError("no observed plane given: the baselines interpolate between observed planes")
    checked = {}
    for axis, indices in planes.items():
        if axis not in (0, 1, 2):
            raise InputError(f"observed planes: image axis {axis!r} is not 0, 1 or 2")
        indices = np.unique(np.asarray(indices, dtype=np.int64).ravel())
        if len(indices) == 0:
            continue
        if indices[0] < 0 or indices[-1] >= mask.shape[axis]:
            outside = int(indices[0] if indices[0] < 0 else indices[-1])
            raise InputError(f"observed planes along axis {axis}: index {outside} is outside the image "
                             f"(size {mask.shape[axis]})")
        checked[int(axis)] = indices
    if not checked:
        raise InputError("no observed plane given: the baselines interpolate between observed planes")
    observed = np.zeros(mask.shape, dtype=bool)
    for axis, indices in checked.items():
        index = [slice(None)] * 3
        index[axis] = indices
        observed[tuple(index)] = True
    drawn = (mask != 0) & observed
    if not drawn.any():
        raise InputError("the observed planes hold no foreground: nothing to interpolate")
    spacing = tuple(float(s) for s in geometry.spacing) if geometry is not None else (1.0, 1.0, 1.0)
    return drawn, checked, spacing


# --- Fill between slices ---------------------------------------------------------------------

def _contour_interpolator():
    """The vtkITK filter, from Slicer itself or from the slicer-core wheel."""
    try:  # inside the Slicer application
        import vtkITK
        return vtkITK.vtkITKMorphologicalContourInterpolator()
    except ImportError:
        pass
    try:  # the slicer-core wheel (VTK is loaded already: `_run_interpolator` imports it first)
        import slicer
        return slicer.vtkITKMorphologicalContourInterpolator()
    except (ImportError, AttributeError):
        raise InputError("Fill between slices needs vtkITKMorphologicalContourInterpolator: run inside 3D "
                         "Slicer or install the slicer-core wheel (pip install slicer-core)") from None


def _run_interpolator(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(*labels.shape)
    image.SetSpacing(*spacing)
    # VTK scalars run with i fastest: the (i, j, k) array transposed to (k, j, i), C order
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(labels.transpose(2, 1, 0)).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    interpolator = _contour_interpolator()
    interpolator.SetInputData(image)
    interpolator.Update()
    result = numpy_support.vtk_to_numpy(interpolator.GetOutput().GetPointData().GetScalars())
    return result.reshape(labels.shape[::-1]).transpose(2, 1, 0).copy()


def fill_between_slices(sparse_mask: np.ndarray, planes: PlanesLike,
                        geometry: Optional[Geometry] = None) -> np.ndarray:
    """Slicer's *Fill between slices* on a sparse mask; uint8 0/1 indexed (i, j, k).

    Called as Slicer's effect calls it: the filter finds the annotated slices along every axis
    itself (non-empty slices with empty neighbours), so an empty observed plane is no information
    to it; afterwards the observed planes are set to the drawing. `geometry` gives the spacing
    (the filter works on the index grid; direction does not matter)."""
    drawn, checked, spacing = _checked_inputs(sparse_mask, planes, geometry)
    outcome = {}

    # ITK keeps per-thread filter objects whose destructors run when their thread ends; in the
    # main thread that is at interpreter exit, after ITK's globals are gone, and with PyTorch
    # loaded the process then crashes (SIGSEGV). A short-lived worker thread ends while ITK is alive.
    def work():
        try:
            outcome["labels"] = _run_interpolator(drawn.astype(np.uint8), spacing)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=work, name="fill-between-slices")
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    output = (outcome["labels"] != 0).astype(np.uint8)
    return keep_drawn_planes(output, drawn, checked).astype(np.uint8)


# --- shape-based (signed distance) interpolation ---------------------------------------------

def _plane_signed_distance(plane: np.ndarray, sampling: Tuple[float, float]) -> Optional[np.ndarray]:
    """2-D signed distance in mm (negative inside); None for a plane without both foreground
    and background, whose distance is undefined."""
    from scipy.ndimage import distance_transform_edt

    if not plane.any() or plane.all():
        return None
    outside = distance_transform_edt(~plane, sampling=sampling)
    inside = distance_transform_edt(plane, sampling=sampling)
    # each side's distance is to the nearest voxel of the other side; the zero level lies between
    return (outside - inside).astype(np.float32)


def _boundless(plane: np.ndarray, gap: float) -> np.ndarray:
    """The distance standing for a plane without boundary: one gap outside (empty) or inside (full)."""
    return np.full(plane.shape, -gap if plane.any() else gap, np.float32)


def _search_box(drawn: np.ndarray, planes: dict) -> Tuple[slice, slice, slice]:
    """The box outside which every interpolated distance is positive: the observed foreground's
    bounding box, extended along each plane axis to the observed planes that bracket it."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        found = np.nonzero(drawn.any(axis=others))[0]
        low, high = int(found[0]), int(found[-1])
        indices = planes.get(axis, ())
        if len(indices) > 1:
            before = indices[indices < low]
            after = indices[indices > high]
            low = int(before[-1]) if len(before) else low
            high = int(after[0]) if len(after) else high
        box.append(slice(low, high + 1))
    return tuple(box)


INTERPOLATION_CURVES = ("linear", "cubic")


def interpolated_signed_distance(sparse_mask: np.ndarray, planes: PlanesLike, geometry: Optional[Geometry] = None,
                                 curve: str = "linear") -> Tuple[np.ndarray, Tuple[slice, slice, slice]]:
    """The field behind `signed_distance_interpolation`, on the box outside which it is positive
    (`_search_box`): (float32 mm, negative inside, indexed (i, j, k) from the box's corner, NaN
    where no orientation's planes bracket a voxel; the box). `curve`: "linear" between the two
    planes that bracket a voxel, or "cubic", a monotone cubic through every plane of the
    orientation (`_monotone_slopes`). `reconstruct` adds it to the network's evidence; only the
    box is held, however large the image."""
    if curve not in INTERPOLATION_CURVES:
        raise InputError(f"interpolation curve {curve!r} is not one of {', '.join(INTERPOLATION_CURVES)}")
    return _interpolated_distance(*_checked_inputs(sparse_mask, planes, geometry), curve=curve)


def _monotone_slopes(values: Sequence[np.ndarray], positions: np.ndarray) -> list:
    """Per-voxel slopes (mm per mm) of the signed distance at each plane for a monotone cubic
    (Fritsch & Carlson 1980, as SciPy's PCHIP weighs them): zero where the distance turns,
    so the curve never overshoots the drawn planes; the outermost planes take their one secant."""
    gaps = np.diff(positions)
    secants = [(values[i + 1] - values[i]) / gaps[i] for i in range(len(values) - 1)]
    slopes = [secants[0]]
    for i in range(1, len(values) - 1):
        before, after = secants[i - 1], secants[i]
        w1, w2 = 2 * gaps[i] + gaps[i - 1], gaps[i] + 2 * gaps[i - 1]
        same_sign = before * after > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            harmonic = (w1 + w2) / (w1 / before + w2 / after)
        slopes.append(np.where(same_sign, harmonic, 0.0).astype(np.float32))
    slopes.append(secants[-1])
    return slopes


def _interpolated_distance(drawn: np.ndarray, checked: dict, spacing: Tuple[float, float, float],
                           curve: str = "linear") -> Tuple[np.ndarray, Tuple[slice, slice, slice]]:
    box = _search_box(drawn, checked)
    region = drawn[box]
    starts = [b.start for b in box]
    total = np.zeros(region.shape, dtype=np.float32)
    count = np.zeros(region.shape, dtype=np.uint8)
    for axis, indices in checked.items():
        indices = [int(t) for t in indices[(indices >= box[axis].start) & (indices < box[axis].stop)] - starts[axis]]
        if len(indices) < 2:
            continue
        sampling = tuple(spacing[a] for a in range(3) if a != axis)
        moved_total = np.moveaxis(total, axis, 0)  # views: plane t is moved_total[t]
        moved_count = np.moveaxis(count, axis, 0)
        moved_region = np.moveaxis(region, axis, 0)
        positions = np.array(indices, dtype=np.float64) * spacing[axis]
        gaps = np.diff(positions)
        distances = [_plane_signed_distance(moved_region[t], sampling) for t in indices]
        slopes = None
        if curve == "cubic":  # one value per plane: the gap to its nearer neighbour
            distances = [d if d is not None else _boundless(moved_region[t], float(min(gaps[max(n - 1, 0):n + 1])))
                         for n, (t, d) in enumerate(zip(indices, distances))]
            slopes = _monotone_slopes(distances, positions)
        for n, (a, b) in enumerate(zip(indices[:-1], indices[1:])):
            gap = float(gaps[n])
            start, end = (d if d is not None else _boundless(moved_region[t], gap)
                          for t, d in ((a, distances[n]), (b, distances[n + 1])))
            last = b + 1 if n + 2 == len(indices) else b  # each plane once
            for t in range(a, last):
                s = (t - a) / (b - a)
                if slopes is None:
                    moved_total[t] += (1.0 - s) * start + s * end
                else:  # cubic Hermite between the two planes, with the monotone slopes
                    moved_total[t] += ((2 * s ** 3 - 3 * s ** 2 + 1) * start + (3 * s ** 2 - 2 * s ** 3) * end
                                       + gap * ((s ** 3 - 2 * s ** 2 + s) * slopes[n] + (s ** 3 - s ** 2) * slopes[n + 1]))
                moved_count[t] += 1
    defined = count > 0
    total[defined] /= count[defined]
    total[~defined] = np.nan
    return total, box


def signed_distance_interpolation(sparse_mask: np.ndarray, planes: PlanesLike,
                                  geometry: Optional[Geometry] = None) -> np.ndarray:
    """Shape-based interpolation of signed distances; uint8 0/1 indexed (i, j, k).

    For each orientation with at least two observed planes, the 2-D signed distance (mm, from the
    grid spacing; negative inside) of each plane is interpolated linearly between consecutive
    planes. A plane with no foreground (or no background) has no boundary; it counts as lying
    one plane gap (mm) outside (or inside) everywhere, so a structure ends between its last drawn
    plane and the next empty one, further out where its cross-section is larger. Several
    orientations: the distances of the orientations whose planes bracket a voxel are averaged
    (in mm, so they are comparable); a voxel that no orientation brackets is background.
    An orientation with a single plane adds only that plane. The observed planes keep the drawing."""
    drawn, checked, spacing = _checked_inputs(sparse_mask, planes, geometry)
    distance, box = _interpolated_distance(drawn, checked, spacing)
    output = np.zeros(drawn.shape, dtype=np.uint8)
    output[box] = distance < 0  # NaN: background
    return keep_drawn_planes(output, drawn, checked)
