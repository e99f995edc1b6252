"""Reconstructing segments of a Slicer segmentation node: the scene glue of the module.

Qt-free, so it runs in Slicer's Python console, in the module widget and in tests against the
MRML classes of the `slicer-core` wheel. One call does everything::

    from MetaShapeReconLib import reconstruct_segment
    kidney = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("kidney")  # e.g. "Segment_1"
    segment_id, result = reconstruct_segment(segmentationNode, kidney, prior="kidney")
    print(result.summary())

It is three parts, so the widget can keep the main thread free:

- `prepare` (main thread): reads the segments as labelmaps on the grid they were drawn on
  (arrays indexed (i, j, k), LPS `Geometry`); it does not modify the scene.
- `compute` (any thread; no MRML, no Qt): loads the prior and runs the engine on each segment,
  evaluating the shape on the output grid.
- `apply` (main thread): writes every result into the scene at once. Nothing is written when
  any segment fails or is cancelled, and a failure while writing undoes what was written, so
  after an error the scene holds the same nodes, segments and voxels as before.

Frames: Slicer stores geometry in RAS; the engine works in LPS (x and y negated). Reference
geometries are expressed in the segmentation node's own coordinate frame (below its parent
transform), so the output lands exactly where the input segment is.
"""

import logging
import queue
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .catalog import list_bundled_priors, prior_card
from .errors import Cancelled, InputError
from .geometry import Geometry

OUTPUT_MODES = ("new_segment", "new_segmentation", "replace")
RECONSTRUCTED_SUFFIX = " (reconstructed)"
# set on every segment the module writes: "all segments" leaves them out (a dense result has no
# drawn planes to reconstruct from)
RECONSTRUCTED_TAG = "MetaShapeRecon.Reconstructed"
# The engine's messages name the command-line options; in Slicer the user sets them with the
# module's controls, so messages shown there name the controls (labels as the widget shows them).
CONTROL_LABELS = {
    "--device": "Device",
    "--slices": "Drawn planes",
    "--steps": "Adaptation steps",
    "--interpolation": "interpolate close slices",
    "--output-spacing": "Output geometry",
    "--prior": "Shape prior",
    "--precision": "precision",  # no control; reconstruct_segment's argument
}
# option values as the module's controls show them (before the options themselves are renamed)
CONTROL_VALUES = {
    "--steps auto": "'until converged'",
    "--slices axial:1": "'Drawn planes' Axial, every 1",
    "--device cpu": "'Device' CPU",
}
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse

Progress = Callable[[int, int, Optional[float]], bool]


# ---------------------------------------------------------------------------------------------
# geometry: RAS image-to-world matrices <-> LPS engine geometries


def _matrix_to_numpy(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, extent: Sequence[int]) -> Geometry:
    """Engine geometry (LPS, indices from 0) of a Slicer grid: its IJK-to-RAS matrix and its
    VTK extent (i0, i1, j0, j1, k0, k1), whose first voxel need not be index 0."""
    ijk_to_lps = RAS_FROM_LPS @ np.asarray(ijk_to_ras, dtype=np.float64)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError("the reference geometry has a zero spacing")
    first = np.array([extent[0], extent[2], extent[4], 1.0])
    origin = (ijk_to_lps @ first)[:3]
    size = [int(extent[1]) - int(extent[0]) + 1, int(extent[3]) - int(extent[2]) + 1,
            int(extent[5]) - int(extent[4]) + 1]
    return Geometry.create(size, spacing, origin, (axes / spacing).ravel())


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of an engine geometry (indices from 0)."""
    return RAS_FROM_LPS @ geometry.index_to_physical_matrix


@dataclass(frozen=True)
class ReferenceGrid:
    """The output grid, in the segmentation node's coordinate frame.

    `ijk_to_ras` maps the grid's VTK indices (extent `extent`, not necessarily from 0) to RAS mm;
    `geometry` is the same grid for the engine (LPS, indices from 0)."""

    ijk_to_ras: Tuple[float, ...]  # row-major 4x4
    extent: Tuple[int, int, int, int, int, int]
    source: str  # where it came from, for the report

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.ijk_to_ras, dtype=np.float64).reshape(4, 4)

    @property
    def geometry(self) -> Geometry:
        return geometry_from_ijk_to_ras(self.matrix, self.extent)

    def oriented_image(self, labels: Optional[np.ndarray] = None, crop: bool = False):
        """A vtkOrientedImageData on this grid; with `labels` ((i, j, k) array), filled with them
        as unsigned char, cropped to their bounding box when `crop` is set."""
        import slicer
        import vtk
        from vtk.util import numpy_support

        image = slicer.vtkOrientedImageData()
        image.SetImageToWorldMatrix(_numpy_to_matrix(self.matrix))
        extent = list(self.extent)
        if labels is None:
            image.SetExtent(*extent)
            return image
        values = labels
        if crop:
            found = [np.nonzero(labels.any(axis=others))[0] for others in ((1, 2), (0, 2), (0, 1))]
            if any(len(f) == 0 for f in found):
                box = [(0, 0)] * 3  # an empty result: one background voxel keeps the segment valid
            else:
                box = [(int(f[0]), int(f[-1])) for f in found]
            values = labels[tuple(slice(low, high + 1) for low, high in box)]
            extent = [extent[0] + box[0][0], extent[0] + box[0][1], extent[2] + box[1][0], extent[2] + box[1][1],
                      extent[4] + box[2][0], extent[4] + box[2][1]]
        image.SetExtent(*extent)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        flat = np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.uint8).ravel()
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = flat
        return image

    def serialized(self) -> str:
        import slicer

        return slicer.vtkSegmentationConverter.SerializeImageGeometry(self.oriented_image())


def _grid_from_oriented_image(image, source: str) -> ReferenceGrid:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return ReferenceGrid(tuple(_matrix_to_numpy(matrix).ravel()), tuple(int(e) for e in image.GetExtent()), source)


def _parent_transform_between(node_from, node_to) -> np.ndarray:
    """Linear transform from `node_from`'s coordinate frame to `node_to`'s (their parent transforms)."""
    import slicer
    import vtk

    parent_from = node_from.GetParentTransformNode()
    parent_to = node_to.GetParentTransformNode()
    if parent_from is None and parent_to is None:
        return np.eye(4)
    if parent_from is not None and parent_to is not None and parent_from.GetID() == parent_to.GetID():
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent_from, parent_to, matrix):
        raise InputError(f"the reference volume '{node_from.GetName()}' and the segmentation "
                         f"'{node_to.GetName()}' are under different non-linear transforms; harden the "
                         "transforms first (Data module: right-click > Harden transform)")
    return _matrix_to_numpy(matrix)


def reference_grid(segmentation_node, reference_volume_node=None, segment_ids: Sequence[str] = ()) -> ReferenceGrid:
    """The grid to reconstruct on, in the segmentation node's frame.

    1. the reference volume, when one is given;
    2. else the segmentation's reference image geometry (the volume it was drawn on);
    3. else the union of the segments' labelmaps, padded on every side (a segmentation without
       reference geometry, e.g. one imported from a model)."""
    import slicer
    import vtk

    if reference_volume_node is not None:
        image_data = reference_volume_node.GetImageData()
        if image_data is None:
            raise InputError(f"the reference volume '{reference_volume_node.GetName()}' holds no image")
        ijk_to_ras = vtk.vtkMatrix4x4()
        reference_volume_node.GetIJKToRASMatrix(ijk_to_ras)
        matrix = _parent_transform_between(reference_volume_node, segmentation_node) @ _matrix_to_numpy(ijk_to_ras)
        return ReferenceGrid(tuple(matrix.ravel()), tuple(int(e) for e in image_data.GetExtent()),
                             f"volume '{reference_volume_node.GetName()}'")

    segmentation = segmentation_node.GetSegmentation()
    converter = slicer.vtkSegmentationConverter
    serialized = segmentation.GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    if serialized:
        image = slicer.vtkOrientedImageData()
        if converter.DeserializeImageGeometry(serialized, image, False):
            grid = _grid_from_oriented_image(image, "the segmentation's reference geometry")
            if min(grid.geometry.size) >= 1:
                return grid

    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    common = segmentation.DetermineCommonLabelmapGeometry(segmentation.EXTENT_UNION_OF_SEGMENTS, ids)
    image = slicer.vtkOrientedImageData()
    if not common or not converter.DeserializeImageGeometry(common, image, False):
        raise InputError(f"the segmentation '{segmentation_node.GetName()}' has no reference geometry; "
                         "choose a reference volume")
    grid = _grid_from_oriented_image(image, "the segments' own labelmap grid, padded")
    extent = np.array(grid.extent).reshape(3, 2)
    if np.any(extent[:, 1] < extent[:, 0]):
        raise InputError(f"the segmentation '{segmentation_node.GetName()}' has no reference geometry and "
                         "its segments are empty; choose a reference volume")
    # drawn planes bound the labelmap; the shape goes on beyond the outer ones
    pad = np.maximum(8, (extent[:, 1] - extent[:, 0] + 1) // 4)
    padded = np.stack([extent[:, 0] - pad, extent[:, 1] + pad], axis=1).ravel()
    return ReferenceGrid(grid.ijk_to_ras, tuple(int(e) for e in padded), grid.source)


# ---------------------------------------------------------------------------------------------
# reading segments


def _binary_labelmap_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


def _closed_surface_name() -> str:
    import slicer

    return slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()


def segment_labels(segmentation_node, segment_id: str, grid: ReferenceGrid) -> Tuple[np.ndarray, bool, int]:
    """The segment as a uint8 0/1 array indexed (i, j, k) on `grid`, whether its own labelmap
    lies on the grid's lattice (otherwise it was resampled, nearest neighbour), and how many of
    its voxels lie outside the grid (counted on its lattice only; 0 otherwise).

    Reads copies only: the segmentation is not modified, not even by a representation
    conversion (a segment whose source is a closed surface is converted in a scratch copy)."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    labelmap_name = _binary_labelmap_name()
    labelmap = slicer.vtkOrientedImageData()
    if segment.GetRepresentation(labelmap_name) is not None:
        # the node's accessor extracts this segment alone from a shared layer (values 0/1)
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    else:
        scratch = slicer.vtkSegmentation()
        scratch.SetSourceRepresentationName(segmentation.GetSourceRepresentationName())
        scratch.CopyConversionParameters(segmentation)
        scratch.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                                       grid.serialized())
        copy = slicer.vtkSegment()
        copy.DeepCopy(segment)
        scratch.AddSegment(copy, segment_id)
        if not scratch.CreateRepresentation(labelmap_name):
            raise InputError(f"segment '{segment.GetName()}' cannot be converted to a labelmap")
        labelmap.DeepCopy(scratch.GetSegment(segment_id).GetRepresentation(labelmap_name))

    reference = grid.oriented_image()
    size = grid.geometry.size
    extent = labelmap.GetExtent()
    empty = extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]
    if empty or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(size, dtype=np.uint8), True, 0
    on_lattice = _same_lattice(labelmap, reference)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, False):
        raise InputError(f"segment '{segment.GetName()}' could not be resampled onto the reference geometry")
    if tuple(resampled.GetExtent()) != tuple(grid.extent):
        raise InputError(f"segment '{segment.GetName()}': resampling gave extent {resampled.GetExtent()}, "
                         f"expected {grid.extent}")
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    labels = (values.reshape(size[2], size[1], size[0]) != 0).transpose(2, 1, 0)
    left_out = 0
    if on_lattice:  # the same voxels: what is not on the grid now was cut off
        drawn = int(np.count_nonzero(numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())))
        left_out = max(0, drawn - int(np.count_nonzero(labels)))
    return np.ascontiguousarray(labels, dtype=np.uint8), on_lattice, left_out


def _same_lattice(image, reference, tolerance: float = 1e-3) -> bool:
    """Whether `image`'s voxel centres are voxel centres of `reference` (same axes and spacing,
    origin shifted by whole voxels)."""
    import vtk

    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(a)
    reference.GetImageToWorldMatrix(b)
    a, b = _matrix_to_numpy(a), _matrix_to_numpy(b)
    if not np.allclose(a[:3, :3], b[:3, :3], atol=tolerance):
        return False
    shift = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])
    return bool(np.allclose(shift, np.round(shift), atol=tolerance))


# ---------------------------------------------------------------------------------------------
# the three parts


@dataclass
class SegmentInput:
    """One segment to reconstruct, as plain data (no MRML)."""

    segment_id: str
    name: str
    color: Tuple[float, float, float]
    labels: np.ndarray  # uint8 0/1, (i, j, k) on the job's drawing grid
    on_lattice: bool
    left_out: int = 0  # drawn voxels outside the grid the segment was read on (not used)


@dataclass
class ReconstructionJob:
    """What `compute` needs (plain data) and what `apply` needs to find the nodes again."""

    scene: Any
    segmentation_node_id: str
    segmentation_name: str
    reference_volume_node_id: Optional[str]
    grid: ReferenceGrid  # the output grid
    segments: List[SegmentInput]
    prior: Any  # name, path or a loaded Prior
    steps: Union[int, str, None]
    slices: str
    device: str
    output: str
    show_3d: bool
    export_model: bool
    single: bool  # the caller named one segment id: return one id, not a list
    timings: Dict[str, float] = field(default_factory=dict)
    precision: str = "auto"
    interpolation: Optional[float] = None  # None: the prior's card
    # the grid the segments were read on, where it is another grid than `grid` (None: `grid`):
    # drawn planes stay planes only on their own lattice, and a crop would cut the drawing
    drawing_grid: Optional[ReferenceGrid] = None

    @property
    def input_grid(self) -> ReferenceGrid:
        return self.drawing_grid or self.grid


@dataclass
class SegmentOutput:
    segment_id: str  # the input segment
    labels: np.ndarray  # uint8 0/1 on the job's (output) grid
    report: dict


@dataclass
class ComputedReconstruction:
    outputs: List[SegmentOutput]
    prior_name: str
    timings: Dict[str, float]


def is_reconstructed(segment) -> bool:
    """Whether the module wrote this segment (see RECONSTRUCTED_TAG)."""
    return bool(segment.HasTag(RECONSTRUCTED_TAG))


def _segment_ids(segmentation, segment_id) -> Tuple[List[str], bool]:
    if segment_id is None:
        every = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        ids = [sid for sid in every if not is_reconstructed(segmentation.GetSegment(sid))]
        if not ids:
            raise InputError("the segmentation has no segment to reconstruct" if not every else
                             "every segment of the segmentation is a reconstruction; select one to reconstruct "
                             "it again")
        return ids, False
    single = isinstance(segment_id, str)
    ids = [segment_id] if single else [str(s) for s in segment_id]
    if not ids:
        raise InputError("no segment selected")
    for sid in ids:
        if segmentation.GetSegment(sid) is None:
            names = ", ".join(f"{segmentation.GetNthSegmentID(i)} ({segmentation.GetNthSegment(i).GetName()})"
                              for i in range(segmentation.GetNumberOfSegments()))
            raise InputError(f"segment {sid!r} is not in the segmentation (segments: {names or 'none'})")
    if len(set(ids)) != len(ids):
        raise InputError("a segment is selected twice")
    return ids, single


def prepare(segmentation_node, segment_id=None, reference_volume_node=None, prior="kidney", steps=None,
            slices: str = "auto", device: str = "auto", output: str = "new_segment", show_3d: bool = True,
            export_model: bool = False, precision: str = "auto",
            interpolation: Optional[float] = None) -> ReconstructionJob:
    """Read the segments to reconstruct (main thread; the scene is not modified).

    segment_id: one id (str), a list of ids, or None for every segment of the node."""
    started = time.perf_counter()
    if segmentation_node is None:
        raise InputError("no segmentation selected")
    if not (hasattr(segmentation_node, "IsA") and segmentation_node.IsA("vtkMRMLSegmentationNode")):
        name = segmentation_node.GetName() if hasattr(segmentation_node, "GetName") else repr(segmentation_node)
        raise InputError(f"'{name}' is not a segmentation: import the labelmap into a segmentation first "
                         "(Data module: right-click > Convert labelmap to segmentation node)")
    if output not in OUTPUT_MODES:
        raise InputError(f"output {output!r}: expected one of {', '.join(OUTPUT_MODES)}")
    scene = segmentation_node.GetScene()
    if scene is None:
        raise InputError("the segmentation node is not in a scene")
    segmentation = segmentation_node.GetSegmentation()
    ids, single = _segment_ids(segmentation, segment_id)
    if output == "replace" and segmentation.GetSourceRepresentationName() != _binary_labelmap_name():
        raise InputError("replacing a segment needs a segmentation whose source representation is a binary "
                         "labelmap; choose a new segment or a new segmentation as output")
    grid = reference_grid(segmentation_node, reference_volume_node, ids)
    drawing_grid = None
    if reference_volume_node is not None:
        try:
            own = reference_grid(segmentation_node, None, ids)
        except InputError:  # no grid of its own: read the drawing on the chosen one
            own = None
        if own is not None and not own.geometry.same_grid(grid.geometry):
            # read there, all of it (a crop of the grid would cut the drawing), with slice numbers
            # counted there; the network is evaluated on `grid`
            drawing_grid = own
    segments = []
    for sid in ids:
        segment = segmentation.GetSegment(sid)
        labels, on_lattice, left_out = segment_labels(segmentation_node, sid, drawing_grid or grid)
        if not labels.any():
            raise InputError(f"segment '{segment.GetName()}' is empty on the reference geometry: draw it on a "
                             "few slices first")
        segments.append(SegmentInput(sid, segment.GetName(), tuple(segment.GetColor()), labels, on_lattice,
                                     left_out))
    return ReconstructionJob(
        scene=scene, segmentation_node_id=segmentation_node.GetID(), segmentation_name=segmentation_node.GetName(),
        reference_volume_node_id=reference_volume_node.GetID() if reference_volume_node is not None else None,
        grid=grid, segments=segments, prior=prior, steps=steps, slices=slices or "auto", device=device or "auto",
        output=output, show_3d=bool(show_3d), export_model=bool(export_model), single=single,
        timings={"read": time.perf_counter() - started}, precision=precision or "auto",
        interpolation=interpolation, drawing_grid=drawing_grid)


def _name_controls(message: str) -> str:
    """An engine message with the command-line options it names replaced by the module's controls."""
    for option, control in CONTROL_VALUES.items():
        message = message.replace(option, control)
    return re.sub(r"--[a-z][a-z-]*", lambda m: f"'{CONTROL_LABELS[m.group(0)]}'" if m.group(0) in CONTROL_LABELS
                  else m.group(0), message)


def _load(prior):
    from .prior import Prior, load_prior

    if isinstance(prior, Prior):
        return prior
    if not prior:
        raise InputError("no prior selected")
    return load_prior(str(prior))


def compute(job: ReconstructionJob, progress: Optional[Progress] = None,
            on_segment: Optional[Callable[[int, int, str], None]] = None) -> ComputedReconstruction:
    """Run the engine on every segment of the job. Touches no MRML node and no Qt object, so it
    can run in a worker thread.

    progress(step, total, loss) -> bool counts the steps of all segments together and may cancel
    by returning False (raises Cancelled); on_segment(index, count, name) announces each segment.
    Engine errors come back as InputError naming the segment."""
    from .pipeline import reconstruct

    started = time.perf_counter()
    try:
        prior = _load(job.prior)
    except InputError as error:
        raise InputError(_name_controls(str(error))) from None
    loaded = time.perf_counter()
    count = len(job.segments)
    done_steps = 0
    per_segment_total = [None]

    def segment_progress(step, total, loss):
        per_segment_total[0] = total
        if progress is None:
            return True
        # later segments are assumed to take as many steps as this one
        return progress(done_steps + step, done_steps + total * (count - index), loss)

    outputs = []
    for index, segment in enumerate(job.segments):
        if on_segment is not None:
            on_segment(index, count, segment.name)
        drawing = job.input_grid.geometry
        other_grid = job.grid.geometry if job.drawing_grid is not None else None
        try:
            result = reconstruct(segment.labels, drawing, prior, steps=job.steps, slices=job.slices,
                                 device=job.device, output_geometry=other_grid, progress=segment_progress,
                                 precision=job.precision, interpolation=job.interpolation)
        except InputError as error:
            raise InputError(f"segment '{segment.name}': {_name_controls(str(error))}") from None
        result.report["warnings"] = [_name_controls(w) for w in result.report.get("warnings", [])]
        if not segment.on_lattice:
            result.report.setdefault("warnings", []).append(
                "the segment was drawn on another grid than the reference geometry and was resampled onto it")
        if segment.left_out:
            result.report.setdefault("warnings", []).append(
                f"{segment.left_out} drawn voxel(s) lie outside the reference geometry and were not used")
        result.report["segment"] = {"id": segment.segment_id, "name": segment.name}
        outputs.append(SegmentOutput(segment.segment_id, result.labels, result.report))
        done_steps += per_segment_total[0] or 0
    finished = time.perf_counter()
    timings = {"load_prior": loaded - started, "reconstruct": finished - loaded}
    return ComputedReconstruction(outputs, prior.name, timings)


# ---------------------------------------------------------------------------------------------
# writing into the scene


@dataclass
class ReconstructionResult:
    """What a reconstruction wrote, its reports and timings; `undo()` takes it back."""

    segmentation_node_id: str
    segment_ids: List[str]
    output: str
    reports: List[dict]
    timings_s: Dict[str, float]
    prior: str
    model_node_ids: List[str] = field(default_factory=list)
    scene: Any = field(default=None, repr=False)
    _created_node_ids: List[str] = field(default_factory=list, repr=False)
    _added_segments: List[Tuple[str, str]] = field(default_factory=list, repr=False)  # (node id, segment id)
    # (node id, segment id, old labelmap, whether it was tagged RECONSTRUCTED_TAG)
    _replaced: List[Tuple[str, str, Any, bool]] = field(default_factory=list, repr=False)
    # Show 3D: (node id, whether it had closed surfaces, its 3-D visibility, replaced segments' 3-D visibility)
    _shown_3d: List[Tuple[str, bool, Optional[bool], Dict[str, bool]]] = field(default_factory=list, repr=False)

    @property
    def device(self) -> str:
        return self.reports[0]["device"] if self.reports else ""

    @property
    def dice_observed_planes(self) -> Dict[str, float]:
        """Dice of the result with the drawing on the observed planes, by segment name."""
        return {r["segment"]["name"]: float(r["dice_observed_planes"]) for r in self.reports}

    @property
    def warnings(self) -> List[str]:
        return [f"{r['segment']['name']}: {w}" for r in self.reports for w in r.get("warnings", [])]

    def as_dict(self) -> dict:
        """A JSON-friendly record."""
        return {"segmentation_node_id": self.segmentation_node_id, "segment_ids": list(self.segment_ids),
                "model_node_ids": list(self.model_node_ids), "output": self.output, "prior": self.prior,
                "device": self.device, "dice_observed_planes": self.dice_observed_planes,
                "timings_s": dict(self.timings_s), "warnings": self.warnings, "reports": self.reports}

    def summary(self) -> str:
        """One line for the user: what, how long, where, and how well it fits the drawing."""
        names = ", ".join(f"'{r['segment']['name']}'" for r in self.reports)
        dice = ", ".join(f"{d:.3f}" for d in self.dice_observed_planes.values())
        steps = sorted({int(r["steps"]) for r in self.reports})
        step_text = "/".join(str(s) for s in steps)
        interpolated = any((r.get("interpolation") or {}).get("logits_per_mm") for r in self.reports)
        return (f"Reconstructed {names} with prior '{self.prior}' in {self.timings_s.get('total', 0.0):.2f} s "
                f"({step_text} steps{', interpolating between close slices' if interpolated else ''}) on "
                f"{self.device}; Dice on the drawn planes {dice}")

    def undo(self) -> None:
        """Remove what this reconstruction added and restore what it replaced (latest first)."""
        scene = self.scene
        if scene is None:
            return
        for node_id, had_surface, visible, segment_visible in reversed(self._shown_3d):
            node = scene.GetNodeByID(node_id)
            if node is None:
                continue
            if not had_surface:
                node.RemoveClosedSurfaceRepresentation()
            display = node.GetDisplayNode()
            if display is not None and visible is not None:
                display.SetVisibility3D(visible)
                for segment_id, shown in segment_visible.items():
                    if node.GetSegmentation().GetSegment(segment_id) is not None:
                        display.SetSegmentVisibility3D(segment_id, shown)
        for node_id, segment_id, old, tagged in reversed(self._replaced):
            node = scene.GetNodeByID(node_id)
            if node is not None and node.GetSegmentation().GetSegment(segment_id) is not None:
                _set_segment_labelmap(node, segment_id, old)
                if not tagged:
                    node.GetSegmentation().GetSegment(segment_id).RemoveTag(RECONSTRUCTED_TAG)
        for node_id, segment_id in reversed(self._added_segments):
            node = scene.GetNodeByID(node_id)
            if node is not None and node.GetSegmentation().GetSegment(segment_id) is not None:
                node.GetSegmentation().RemoveSegment(segment_id)
        for node_id in reversed(self._created_node_ids):
            node = scene.GetNodeByID(node_id)
            if node is not None:
                _remove_node(scene, node)
        self._shown_3d, self._replaced, self._added_segments, self._created_node_ids = [], [], [], []
        self.segment_ids, self.model_node_ids = [], []


def _remove_node(scene, node) -> None:
    """Remove a node with the display and storage nodes it owns (Slicer's application logic
    does this in the application; a bare scene does not)."""
    owned = []
    if node.IsA("vtkMRMLDisplayableNode"):
        owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for other in owned:
        if other is not None and other.GetScene() is scene:
            scene.RemoveNode(other)


def _set_segment_labelmap(segmentation_node, segment_id: str, labelmap) -> None:
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    # alone in its layer, so writing it cannot touch the voxels of the segments it shared a layer with
    segmentation.SeparateSegmentLabelmap(segment_id)
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not write segment {segment_id}")


def _parent_id(node) -> Optional[str]:
    parent = node.GetParentTransformNode()
    return parent.GetID() if parent is not None else None


def _unique_segment_name(segmentation, name: str) -> str:
    candidate, number = name, 2
    while segmentation.GetSegmentIdBySegmentName(candidate):
        candidate = f"{name[:-1]} {number})" if name.endswith(")") else f"{name} {number}"
        number += 1
    return candidate


def _place_beside(scene, node, beside) -> None:
    """Put `node` in the subject hierarchy folder of `beside` (when the hierarchy knows both)."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    item, other = hierarchy.GetItemByDataNode(node), hierarchy.GetItemByDataNode(beside)
    if item and other:
        hierarchy.SetItemParent(item, hierarchy.GetItemParent(other))


def _new_segment(name: str, color, labelmap):
    import slicer

    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*color)
    segment.SetTag(RECONSTRUCTED_TAG, "1")
    segment.AddRepresentation(_binary_labelmap_name(), labelmap)
    return segment


def _created(result: "ReconstructionResult", scene, node) -> None:
    """Record a node this reconstruction added (for `undo`); with scene undo on, let the scene's
    undo remove it and the display and storage nodes it owns (nodes are not undoable by default)."""
    result._created_node_ids.append(node.GetID())
    if scene.GetUndoFlag():
        owned = [node]
        if node.IsA("vtkMRMLDisplayableNode"):
            owned += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            owned += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        for each in owned:
            if each is not None:
                each.SetUndoEnabled(True)


def _export_model(scene, result, target_node, segment_id: str) -> Any:
    """A model node of the segment's closed surface, beside `target_node`. A segment without a
    stored surface (Show 3D off) gets a surface made for the model only, not stored on the segment."""
    import slicer
    import vtk

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    surface_name = _closed_surface_name()
    segmentation = target_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id)
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", scene.GenerateUniqueName(segment.GetName()))
    model.CreateDefaultDisplayNodes()
    _created(result, scene, model)
    if segment.GetRepresentation(surface_name) is not None:
        if not logic.ExportSegmentToRepresentationNode(segment, model):
            raise RuntimeError(f"could not export segment '{segment.GetName()}' as a model")
    else:
        # (the export needs the surface stored on a segment of a segmentation node)
        surface = logic.CreateRepresentationForOneSegment(segmentation, segment_id, surface_name)
        if surface is None:
            raise RuntimeError(f"could not make the surface of segment '{segment.GetName()}'")
        polydata = vtk.vtkPolyData()
        polydata.DeepCopy(surface)
        model.SetAndObservePolyData(polydata)
    if target_node.GetParentTransformNode() is not None:
        model.SetAndObserveTransformNodeID(target_node.GetParentTransformNode().GetID())
    if model.GetDisplayNode() is not None:
        model.GetDisplayNode().SetColor(*segment.GetColor())
    _place_beside(scene, model, target_node)
    return model


def apply(job: ReconstructionJob, computed: ComputedReconstruction) -> ReconstructionResult:
    """Write the results into the scene (main thread), all or nothing."""
    import slicer

    started = time.perf_counter()
    scene = job.scene
    source_node = scene.GetNodeByID(job.segmentation_node_id)
    if source_node is None:
        raise InputError(f"the segmentation '{job.segmentation_name}' was removed while reconstructing")
    source = source_node.GetSegmentation()
    if job.output == "replace":
        missing = [s.name for s in job.segments if source.GetSegment(s.segment_id) is None]
        if missing:
            raise InputError(f"segment '{missing[0]}' was removed while reconstructing")
    result = ReconstructionResult(segmentation_node_id=job.segmentation_node_id, segment_ids=[], output=job.output,
                                  reports=[o.report for o in computed.outputs], timings_s={}, prior=computed.prior_name,
                                  scene=scene)
    scene_undo = bool(scene.GetUndoFlag())
    if scene_undo:  # Slicer's scene undo is on: one undo step takes the whole change back
        source_was_undoable = source_node.GetUndoEnabled()
        source_node.SetUndoEnabled(True)
        scene.SaveStateForUndo()
    inputs = {s.segment_id: s for s in job.segments}
    target_node = source_node
    was_modifying = None
    try:
        if job.output == "new_segmentation":
            name = scene.GenerateUniqueName(job.segmentation_name + RECONSTRUCTED_SUFFIX)
            target_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            target_node.CreateDefaultDisplayNodes()
            _created(result, scene, target_node)
            if source_node.GetParentTransformNode() is not None:
                target_node.SetAndObserveTransformNodeID(source_node.GetParentTransformNode().GetID())
            volume = scene.GetNodeByID(job.reference_volume_node_id) if job.reference_volume_node_id else None
            if volume is not None and _parent_id(volume) == _parent_id(source_node):
                target_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            else:
                target_node.GetSegmentation().SetConversionParameter(
                    slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), job.grid.serialized())
            _place_beside(scene, target_node, source_node)
        result.segmentation_node_id = target_node.GetID()
        target = target_node.GetSegmentation()
        had_surface = target.GetNumberOfSegments() > 0 and target.ContainsRepresentation(_closed_surface_name())
        was_modifying = target_node.StartModify()

        for output in computed.outputs:
            segment_input = inputs[output.segment_id]
            labelmap = job.grid.oriented_image(output.labels, crop=True)
            if job.output == "replace":
                old = slicer.vtkOrientedImageData()
                target_node.GetBinaryLabelmapRepresentation(output.segment_id, old)
                replaced = target.GetSegment(output.segment_id)
                result._replaced.append((target_node.GetID(), output.segment_id, old,
                                         is_reconstructed(replaced)))
                _set_segment_labelmap(target_node, output.segment_id, labelmap)
                replaced.SetTag(RECONSTRUCTED_TAG, "1")
                new_id = output.segment_id
            else:
                name = segment_input.name if job.output == "new_segmentation" else \
                    _unique_segment_name(target, segment_input.name + RECONSTRUCTED_SUFFIX)
                segment = _new_segment(name, segment_input.color, labelmap)
                new_id = target.GenerateUniqueSegmentID(segment_input.segment_id if job.output == "new_segmentation"
                                                        else segment_input.segment_id + "_reconstructed")
                if not target.AddSegment(segment, new_id):
                    raise RuntimeError(f"could not add segment '{name}'")
                result._added_segments.append((target_node.GetID(), new_id))
            result.segment_ids.append(new_id)

        if job.show_3d:
            display = target_node.GetDisplayNode()
            replaced_visible = ({sid: bool(display.GetSegmentVisibility3D(sid)) for sid in result.segment_ids}
                                if display is not None and job.output == "replace" else {})
            result._shown_3d.append((target_node.GetID(), had_surface,
                                     None if display is None else bool(display.GetVisibility3D()), replaced_visible))
            target_node.CreateClosedSurfaceRepresentation()  # Slicer's "Show 3D"
            if display is not None:
                display.SetVisibility3D(True)
                for new_id in result.segment_ids:
                    display.SetSegmentVisibility3D(new_id, True)
        # Show 3D off: no surface is made (a segmentation that already has one converts new
        # segments itself, as for any segment)

        if job.export_model:
            for new_id in result.segment_ids:
                model = _export_model(scene, result, target_node, new_id)
                result.model_node_ids.append(model.GetID())
    except BaseException:
        if was_modifying is not None:
            target_node.EndModify(was_modifying)
            was_modifying = None
        result.undo()
        if scene_undo:  # take back the undo step too: nothing happened
            scene.Undo()
            scene.ClearRedoStack()
            source_node.SetUndoEnabled(source_was_undoable)
        raise
    finally:
        if was_modifying is not None:
            target_node.EndModify(was_modifying)

    finished = time.perf_counter()
    result.timings_s = dict(job.timings, **computed.timings, write=finished - started)
    result.timings_s["total"] = sum(result.timings_s.values())
    return result


def reconstruct_segment(segmentation_node, segment_id=None, reference_volume_node=None, prior="kidney",
                        steps=None, slices: str = "auto", device: str = "auto", output: str = "new_segment",
                        progress: Optional[Progress] = None, show_3d: bool = True, export_model: bool = False,
                        precision: str = "auto", interpolation: Optional[float] = None):
    """Reconstruct the complete 3-D shape of sparsely drawn segments, in the scene.

    segmentation_node: a vtkMRMLSegmentationNode; segment_id: a segment id (str), a list of ids,
    or None for every segment. reference_volume_node: the output grid (default: the
    segmentation's reference geometry, i.e. the volume it was drawn on). prior: a bundled prior
    name, a .safetensors path or a loaded Prior. steps: adaptation steps (None: the prior's
    default; "auto": until converged). slices: "auto" (find the drawn planes) or
    "AXIS:STEP[:OFFSET]". device: "auto", "cpu" or "cuda". precision: "auto" (bfloat16 on CPUs
    with native bfloat16, else float32), "float32" or "bfloat16". interpolation: the weight of
    shape-based interpolation between parallel drawn planes (None: the prior's; 0: the network
    alone). output: "new_segment" (a segment
    "<name> (reconstructed)" in the same segmentation), "new_segmentation" (a new node beside the
    input) or "replace" (the input segment's voxels; no other segment is touched).
    progress(step, total, loss) -> bool may cancel by returning False.

    Returns (written segment id, or a list of ids when segment_id is a list or None;
    ReconstructionResult). Raises InputError (a message for the user) or Cancelled, and then
    the scene is as it was."""
    job = prepare(segmentation_node, segment_id, reference_volume_node, prior=prior, steps=steps, slices=slices,
                  device=device, output=output, show_3d=show_3d, export_model=export_model, precision=precision,
                  interpolation=interpolation)
    computed = compute(job, progress)
    result = apply(job, computed)
    return (result.segment_ids[0] if job.single else list(result.segment_ids)), result


# ---------------------------------------------------------------------------------------------
# what the widget needs before torch is imported


def available_priors() -> Dict[str, dict]:
    """{name: {"path": .safetensors path, "card": model card}} of the bundled priors (and those in
    $METASHAPERECON_PRIORS), read without importing torch so the module opens fast."""
    found: Dict[str, dict] = {}
    for name, path in list_bundled_priors().items():
        try:
            found[name] = {"path": path, "card": prior_card(path)}
        except InputError:
            continue  # not a prior (or a broken one): load_prior will say why if asked for it
    return found


def describe_prior(card: Mapping) -> str:
    """One or two lines about a prior for the user: anatomy, training data, results, licence."""
    parts = []
    anatomy = card.get("anatomy") or card.get("name", "")
    description = card.get("description")
    parts.append(f"{anatomy}: {description}" if description else str(anatomy))
    training = card.get("training_data")
    if isinstance(training, dict) and training.get("cases"):
        parts.append(f"trained on {training.get('cases')} cases"
                     + (f" of {training['dataset']}" if training.get("dataset") else ""))
    steps = (card.get("adaptation") or {}).get("steps")
    if steps is not None:
        parts.append(f"{steps} steps by default")
    if card.get("license"):
        parts.append(f"licence {card['license']}")
    return "; ".join(p for p in parts if p)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_gib: float

    def label(self) -> str:
        return f"{self.name}, {self.memory_gib:.0f} GiB"


def detect_nvidia_gpus(timeout_s: float = 3.0) -> List[GpuInfo]:
    """NVIDIA GPUs as the driver reports them (nvidia-smi), without importing torch. Empty when
    there is no NVIDIA driver; whether the installed PyTorch can use them is known only later."""
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                   timeout=timeout_s, check=False,
                                   creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console on Windows
    except (OSError, subprocess.SubprocessError):
        return []
    if completed.returncode != 0:
        return []
    gpus = []
    for line in completed.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            gpus.append(GpuInfo(int(fields[0]), fields[1], float(fields[2]) / 1024.0))
        except ValueError:
            continue
    return gpus


def slices_spec(axis: str, step: int = 8, offset: int = 0) -> str:
    """The engine's observed-planes rule for the widget's choice: "auto" or "AXIS:STEP:OFFSET"."""
    axis = (axis or "auto").lower()
    if axis == "auto":
        return "auto"
    return f"{axis}:{int(step)}:{int(offset) % max(1, int(step))}"


# ---------------------------------------------------------------------------------------------
# one persistent worker thread for the torch work


class Task:
    """A unit of work on the worker. `progress` is what the engine calls (in the worker); the
    main thread reads `latest`, `segment` and `done`, and calls `cancel()`."""

    def __init__(self, function: Callable[["Task"], Any]):
        self._function = function
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._latest: Optional[Tuple[int, int, Optional[float]]] = None
        self._segment: Optional[Tuple[int, int, str]] = None
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def progress(self, step: int, total: int, loss: Optional[float]) -> bool:
        with self._lock:
            self._latest = (int(step), int(total), None if loss is None else float(loss))
        return not self._cancel.is_set()

    def on_segment(self, index: int, count: int, name: str) -> None:
        with self._lock:
            self._segment = (index, count, name)

    @property
    def latest(self) -> Optional[Tuple[int, int, Optional[float]]]:
        with self._lock:
            return self._latest

    @property
    def segment(self) -> Optional[Tuple[int, int, str]]:
        with self._lock:
            return self._segment

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the task has finished (releases the GIL while waiting)."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _run(self) -> None:
        try:
            if self.cancelled:  # cancelled while it waited behind another task (the warm-up)
                raise Cancelled("cancelled")
            self.result = self._function(self)
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error
        finally:
            self._done.set()


def _warm_up_torch() -> None:
    """Import PyTorch and take one step, so the first reconstruction does not pay for it. A
    failure here only costs that time: it is logged, and the reconstruction reports its own."""
    try:
        from .adaptation import warm_up  # imports torch: on the worker thread, never in the GUI's way

        warm_up()
    except Exception as error:
        logging.warning(f"MetaShapeRecon: warming PyTorch up failed ({type(error).__name__}: {error})")


class ReconstructionWorker:
    """One long-lived thread that runs every reconstruction: PyTorch keeps per-thread state
    (cuDNN handles, thread pools), so reusing a thread makes repeated runs faster. Work never
    touches MRML or Qt; the main thread applies the results."""

    def __init__(self):
        self._tasks = queue.Queue()  # Task, or None to stop
        self._thread = threading.Thread(target=self._loop, name="MetaShapeRecon worker", daemon=True)
        self._thread.start()
        # the first task pays PyTorch's first-use cost while the user is still drawing
        self.warm_up_task = self.submit(lambda task: _warm_up_torch())

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            task._run()

    def submit(self, function: Callable[[Task], Any]) -> Task:
        if not self._thread.is_alive():
            raise RuntimeError("the reconstruction worker has stopped")
        task = Task(function)
        self._tasks.put(task)
        return task

    def compute(self, job: "ReconstructionJob") -> Task:
        """Run `compute(job)` on the worker, reporting through the task."""
        return self.submit(lambda task: compute(job, task.progress, task.on_segment))

    def shutdown(self, timeout: Optional[float] = None) -> None:
        self._tasks.put(None)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


__all__ = ["OUTPUT_MODES", "RECONSTRUCTED_TAG", "Cancelled", "GpuInfo", "InputError", "ReconstructionJob",
           "ReconstructionResult", "ReconstructionWorker", "ReferenceGrid", "Task", "apply", "available_priors",
           "compute", "describe_prior", "detect_nvidia_gpus", "geometry_from_ijk_to_ras", "ijk_to_ras_from_geometry",
           "is_reconstructed", "prepare", "prior_card", "reconstruct_segment", "reference_grid", "segment_labels",
           "slices_spec"]
