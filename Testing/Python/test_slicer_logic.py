"""The module's Qt-free logic against the real MRML classes of the slicer-core wheel.

Scenes are built the way Slicer builds them (a vtkSlicerSegmentationsModuleLogic owns the scene,
so the labelmap <-> closed-surface converters are registered; segments drawn with
SetBinaryLabelmapToSegment share a labelmap layer like Segment Editor's) and results are read
back through Slicer's own export (ExportSegmentsToLabelmapNode), not through the code under test.

Until a trained `kidney` prior is bundled, the tests fit a small untrained SIREN to the drawing
(steps="auto"): slower per case and less accurate than a prior, but enough to show that the
geometry, the segments and the scene are handled right.
"""

import hashlib
import os
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
vtk = pytest.importorskip("vtk")

from MetaShapeReconLib.errors import Cancelled, InputError  # noqa: E402
from MetaShapeReconLib.geometry import Geometry  # noqa: E402
from MetaShapeReconLib.pipeline import dice  # noqa: E402
from MetaShapeReconLib.prior import initial_prior, list_bundled_priors, load_prior, save_prior  # noqa: E402
from MetaShapeReconLib.slicer_logic import (  # noqa: E402
    ReferenceGrid,
    apply,
    compute,
    geometry_from_ijk_to_ras,
    ijk_to_ras_from_geometry,
    prepare,
    reconstruct_segment,
)
from shapes import ellipsoid, sparse_planes  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_TRUTH = os.path.join(REPO, "Resources", "Samples", "kidney", "truth.nii.gz")
KITS_CASE = "case_00002"


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


OBLIQUE = rotation([1, 0.4, 0.2], 25) @ rotation([0, 0, 1], 15)  # columns: image axes in LPS


# ---------------------------------------------------------------------------------------------
# scene helpers


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the segmentation converters
    scene._test_logic = logic  # keep it alive with the scene
    yield scene
    logic.SetMRMLScene(None)
    scene.Clear(True)


def add_volume(scene, geometry: Geometry, name="reference"):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*geometry.size)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(0)
    volume.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras_from_geometry(geometry)[r, c])
    volume.SetIJKToRASMatrix(matrix)
    return volume


def add_segmentation(scene, volume, name="segmentation"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def draw(node, volume, name, labels_ijk, color=(0.8, 0.3, 0.2)):
    """Add a segment painted with `labels_ijk` on the volume's grid, as Segment Editor does."""
    segment_id = node.GetSegmentation().AddEmptySegment("", name, color)
    grid = ReferenceGrid(tuple(_ijk_to_ras(volume).ravel()), tuple(volume.GetImageData().GetExtent()), "test")
    image = grid.oriented_image(labels_ijk.astype(np.uint8))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(image, node, segment_id, logic.MODE_REPLACE)
    return segment_id


def _ijk_to_ras(volume):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def exported(scene, node, segment_id, volume):
    """The segment on the volume's grid as Slicer exports it: uint8 array indexed (i, j, k).
    Every node the export adds (labelmap, display, color table) is removed again."""
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
        assert np.allclose(_ijk_to_ras(labelmap), _ijk_to_ras(volume), atol=1e-4)
        return (values.transpose(2, 1, 0) != 0).astype(np.uint8)
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in existing:
                scene.RemoveNode(node)


def snapshot(scene):
    """Every node (id, class, name) and, for segmentations, every segment with its source
    representation (stored labelmap voxels and their grid, or the surface's points)."""
    nodes = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        entry = [node.GetID(), node.GetClassName(), node.GetName()]
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(i)
                segment = segmentation.GetSegment(segment_id)
                image = slicer.vtkOrientedImageData()
                if segment.GetRepresentation("Binary labelmap") is not None:
                    node.GetBinaryLabelmapRepresentation(segment_id, image)
                scalars = image.GetPointData().GetScalars()
                digest = hashlib.sha1(numpy_support.vtk_to_numpy(scalars).tobytes()).hexdigest() if scalars else None
                if segmentation.GetSourceRepresentationName() == "Closed surface":  # the source is the surface
                    points = segment.GetRepresentation("Closed surface").GetPoints()
                    digest = hashlib.sha1(numpy_support.vtk_to_numpy(points.GetData()).tobytes()).hexdigest()
                matrix = vtk.vtkMatrix4x4()
                image.GetImageToWorldMatrix(matrix)
                entry.append((segment_id, segment.GetName(), tuple(segment.GetColor()), tuple(image.GetExtent()),
                              tuple(round(matrix.GetElement(r, c), 6) for r in range(4) for c in range(4)), digest))
        nodes.append(tuple(entry))
    return nodes


# ---------------------------------------------------------------------------------------------
# priors


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread: on a busy 2-core machine, two OpenMP threads fighting other processes make
    the small adaptations here 30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bundled_kidney():
    return list_bundled_priors().get("kidney")


@pytest.fixture(scope="module")
def fitted_prior():
    """(prior, steps): the bundled kidney prior at its default steps, or else a small untrained
    SIREN fitted to each drawing until converged (test-only; never a shipped prior)."""
    if bundled_kidney():
        return load_prior("kidney"), None
    prior = initial_prior("test-untrained", extent_mm=160.0, hidden_features=64, linear_layers=5, omega_0=10.0)
    prior.card["adaptation"]["context_points"] = 2048
    prior.card["adaptation"]["auto"] = {"optimizer": "adam", "lr": 1e-3, "patience": 10, "max_steps": 300}
    return prior, "auto"


@pytest.fixture(scope="module")
def quick_prior():
    """An untrained prior for tests where the shape does not matter (few fixed steps)."""
    prior = initial_prior("test-quick", extent_mm=160.0, hidden_features=32, linear_layers=3, omega_0=10.0)
    prior.card["adaptation"]["context_points"] = 1024
    prior.card["adaptation"]["steps"] = 2
    return prior


# ---------------------------------------------------------------------------------------------
# geometry conversion


def test_geometry_matches_slicer_ras_with_x_and_y_negated():
    geometry = Geometry.create((20, 30, 40), (0.7, 1.3, 2.9), (10.0, -20.0, 35.0), OBLIQUE.ravel())
    ijk_to_ras = ijk_to_ras_from_geometry(geometry)
    ijk = np.array([[0, 0, 0], [19, 0, 0], [3, 7, 11], [19, 29, 39]], float)
    ras = np.c_[ijk, np.ones(len(ijk))] @ ijk_to_ras.T
    assert np.allclose(geometry.index_to_physical(ijk), ras[:, :3] * [-1, -1, 1])
    back = geometry_from_ijk_to_ras(ijk_to_ras, (0, 19, 0, 29, 0, 39))
    assert back.same_grid(geometry, tol=1e-9)
    # an extent that does not start at 0 moves the origin to its first voxel
    shifted = geometry_from_ijk_to_ras(ijk_to_ras, (3, 19, 7, 29, 11, 39))
    assert shifted.size == (17, 23, 29)
    assert np.allclose(shifted.origin, geometry.index_to_physical([[3, 7, 11]])[0])


def test_segment_read_on_the_reference_grid_matches_slicer_export(scene):
    geometry = Geometry.create((30, 26, 22), (1.1, 0.8, 2.2), (-15.0, 10.0, -20.0), OBLIQUE.ravel())
    volume = add_volume(scene, geometry)
    node = add_segmentation(scene, volume)
    shape = ellipsoid(geometry, geometry.index_to_physical([[15, 13, 11]])[0], (10, 7, 12))
    drawn = sparse_planes(shape, 0, 4, 1)
    segment_id = draw(node, volume, "blob", drawn)
    other = draw(node, volume, "other", np.roll(shape, 3, axis=1) & ~shape)
    before = snapshot(scene)
    job = prepare(node, segment_id, prior="unused until compute")
    assert snapshot(scene) == before  # reading does not touch the scene
    assert job.grid.geometry.same_grid(geometry, tol=1e-6)
    assert np.array_equal(job.segments[0].labels, drawn.astype(np.uint8))
    assert np.array_equal(job.segments[0].labels, exported(scene, node, segment_id, volume))
    assert job.segments[0].on_lattice
    assert other != segment_id


# ---------------------------------------------------------------------------------------------
# a real shape on an oblique, anisotropic reference volume


def real_kidney(data_dir):
    """A real kidney: the bundled sample's truth, or one kidney of a KiTS19 case (LPS mask +
    the SimpleITK image it lives on)."""
    import SimpleITK as sitk

    if os.path.isfile(SAMPLE_TRUTH):
        image = sitk.ReadImage(SAMPLE_TRUTH)
        return sitk.Cast(image > 0, sitk.sitkUInt8)
    path = os.path.join(data_dir, "kits19", KITS_CASE, "segmentation.nii.gz")
    if not os.path.isfile(path):
        pytest.skip(f"real data not available: {path}")
    image = sitk.ReadImage(path)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(image > 0), sortByObjectSize=True)
    return sitk.Cast(components == 1, sitk.sitkUInt8)


@pytest.fixture(scope="module")
def kidney_case(request):
    """(truth mask on an oblique anisotropic grid (i, j, k), that grid)."""
    import SimpleITK as sitk

    data_dir = os.environ.get("METASHAPERECON_DATA")
    if not os.path.isfile(SAMPLE_TRUTH) and not data_dir:
        pytest.skip("real data not available: no bundled sample yet and METASHAPERECON_DATA is not set")
    kidney = real_kidney(data_dir or "")
    mask = sitk.GetArrayFromImage(kidney).transpose(2, 1, 0)
    found = np.argwhere(mask)
    source = Geometry.create(kidney.GetSize(), kidney.GetSpacing(), kidney.GetOrigin(), kidney.GetDirection())
    points = source.index_to_physical(found)
    spacing = np.array([1.0, 1.3, 1.7])
    direction = OBLIQUE
    # the oblique grid's box around the kidney, 12 mm margin
    along = points @ direction
    low, high = along.min(axis=0) - 12.0, along.max(axis=0) + 12.0
    size = np.ceil((high - low) / spacing).astype(int) + 1
    origin = direction @ low
    target = Geometry.create(size, spacing, origin, direction.ravel())
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in target.size])
    resampler.SetOutputSpacing(target.spacing)
    resampler.SetOutputOrigin(target.origin)
    resampler.SetOutputDirection(target.direction)
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    truth = sitk.GetArrayFromImage(resampler.Execute(kidney)).transpose(2, 1, 0).astype(bool)
    assert truth.sum() > 1000
    return truth, target


def test_real_kidney_on_oblique_anisotropic_volume(scene, kidney_case, fitted_prior):
    truth, geometry = kidney_case
    prior, steps = fitted_prior
    volume = add_volume(scene, geometry, "CT")
    node = add_segmentation(scene, volume, "Segmentation")
    sagittal = geometry.patient_axis_order()[0]
    drawn = sparse_planes(truth, sagittal, 8, 4)
    kidney_id = draw(node, volume, "kidney", drawn, (0.85, 0.55, 0.45))
    # another segment in the same layer, overlapping the kidney's bounding box
    other = np.zeros_like(truth)
    other[: truth.shape[0] // 2, : truth.shape[1] // 2, :] = True
    other &= ~truth
    other_id = draw(node, volume, "liver", other, (0.6, 0.3, 0.2))
    before = snapshot(scene)
    other_before = exported(scene, node, other_id, volume)
    calls = []

    new_id, result = reconstruct_segment(node, kidney_id, prior=prior, steps=steps,
                                         progress=lambda *a: calls.append(a) or True)

    assert isinstance(new_id, str) and new_id not in (kidney_id, other_id)
    segmentation = node.GetSegmentation()
    assert segmentation.GetSegment(new_id).GetName() == "kidney (reconstructed)"
    assert segmentation.GetSegment(new_id).GetColor() == pytest.approx((0.85, 0.55, 0.45))
    # the result lies on the reference geometry: same axes, spacing, origin; extent inside it
    image = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(new_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    stored = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(stored, _ijk_to_ras(volume), atol=1e-6)
    extent = np.array(image.GetExtent()).reshape(3, 2)
    assert np.all(extent[:, 0] >= 0) and np.all(extent[:, 1] < np.array(geometry.size))
    # it matches the truth, and keeps the drawing on the drawn planes
    reconstructed = exported(scene, node, new_id, volume)
    score = dice(reconstructed, truth)
    assert score > 0.9, f"Dice {score:.3f}"
    # auto-detection finds the drawn planes that hold foreground; there the drawing is kept
    holding = np.nonzero(drawn.any(axis=tuple(a for a in range(3) if a != sagittal)))[0]
    assert result.reports[0]["observed_planes"][0]["indices"] == holding.tolist()
    assert np.array_equal(np.take(reconstructed, holding, axis=sagittal), np.take(drawn, holding, axis=sagittal))
    # a closed surface, for the 3D view
    surface = segmentation.GetSegment(new_id).GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 100
    # nothing else changed: same nodes, the input and the other segment keep their voxels
    after = {entry[0]: entry for entry in snapshot(scene)}
    assert sorted(after) == sorted(entry[0] for entry in before)
    for entry in before:
        if entry[0] != node.GetID():
            assert after[entry[0]] == entry
        else:  # the segmentation node: same name, its old segments as they were, plus the new one
            assert after[entry[0]][:3] == entry[:3]
            assert set(entry[3:]) <= set(after[entry[0]][3:]) and len(after[entry[0]]) == len(entry) + 1
    assert np.array_equal(exported(scene, node, kidney_id, volume), drawn.astype(np.uint8))
    assert np.array_equal(exported(scene, node, other_id, volume), other_before)
    # the record the widget shows
    assert result.segment_ids == [new_id]
    assert result.dice_observed_planes["kidney"] > 0.9
    assert result.timings_s["total"] > 0 and set(result.timings_s) >= {"read", "reconstruct", "write", "total"}
    assert result.device.startswith(("cpu", "cuda"))
    assert "kidney" in result.summary() and "Dice" in result.summary()
    assert result.reports[0]["observed_planes"][0]["axis"] == "sagittal"
    assert calls and calls[-1][0] == calls[-1][1]
    print(f"\nreal kidney, oblique grid {geometry.size}: Dice {score:.3f}, {result.summary()}")


# ---------------------------------------------------------------------------------------------
# several segments, other outputs


def two_blobs(geometry):
    centre = geometry.index_to_physical([[s / 2 for s in geometry.size]])[0]
    left = ellipsoid(geometry, centre + [-22, 0, 0], (16, 11, 13))
    right = ellipsoid(geometry, centre + [21, 3, 0], (14, 15, 10))
    return left, right


@pytest.fixture(scope="module")
def blob_geometry():
    return Geometry.create((64, 44, 40), (1.5, 1.2, 1.4), (-48.0, -26.0, -28.0), OBLIQUE.ravel())


def test_several_segments_in_one_call_into_a_new_segmentation(scene, fitted_prior, blob_geometry):
    prior, steps = fitted_prior
    if bundled_kidney():  # blobs are no kidneys: fit them instead
        prior, steps = initial_prior("test-untrained", extent_mm=160.0, hidden_features=64, linear_layers=5,
                                     omega_0=10.0), "auto"
        prior.card["adaptation"]["context_points"] = 2048
        prior.card["adaptation"]["auto"] = {"lr": 1e-3, "patience": 10, "max_steps": 300}
    geometry = blob_geometry
    left, right = two_blobs(geometry)
    volume = add_volume(scene, geometry)
    node = add_segmentation(scene, volume, "Blobs")
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 4, 1), (1, 0, 0)),
           draw(node, volume, "right", sparse_planes(right, 0, 4, 1), (0, 0, 1))]
    before = snapshot(scene)

    new_ids, result = reconstruct_segment(node, None, prior=prior, steps=steps, output="new_segmentation")

    assert isinstance(new_ids, list) and len(new_ids) == 2
    created = scene.GetNodeByID(result.segmentation_node_id)
    assert created is not None and created.GetID() != node.GetID()
    assert created.GetName() == "Blobs (reconstructed)"
    assert snapshot(scene)[: len(before)] == before  # the input node is untouched
    assert [created.GetSegmentation().GetSegment(i).GetName() for i in new_ids] == ["left", "right"]
    for new_id, truth in zip(new_ids, (left, right)):
        score = dice(exported(scene, created, new_id, volume), truth)
        assert score > 0.85, f"Dice {score:.3f}"
        assert created.GetSegmentation().GetSegment(new_id).GetRepresentation("Closed surface") is not None
    # the new node knows its reference geometry
    reference = created.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert reference == node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert [r["segment"]["id"] for r in result.reports] == ids
    assert set(result.dice_observed_planes) == {"left", "right"}

    result.undo()
    assert snapshot(scene) == before


def test_replace_keeps_every_other_segment_and_can_be_undone(scene, quick_prior, blob_geometry):
    geometry = blob_geometry
    left, right = two_blobs(geometry)
    volume = add_volume(scene, geometry)
    node = add_segmentation(scene, volume)
    left_id = draw(node, volume, "left", sparse_planes(left, 0, 6, 2))
    right_id = draw(node, volume, "right", right)
    assert node.GetSegmentation().GetNumberOfLayers() == 1  # shared layer, as Segment Editor leaves it
    before = snapshot(scene)
    right_before = exported(scene, node, right_id, volume)

    written, result = reconstruct_segment(node, [left_id], prior=quick_prior, output="replace", show_3d=False,
                                          export_model=True, precision="float32")

    assert written == [left_id] and result.reports[0]["precision"] == "float32"
    assert np.array_equal(exported(scene, node, right_id, volume), right_before)
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    assert node.GetSegmentation().GetSegment(left_id).GetName() == "left"
    model = scene.GetNodeByID(result.model_node_ids[0])
    assert model is not None and model.GetPolyData().GetNumberOfPoints() > 0

    models = list(result.model_node_ids)
    result.undo()
    assert [scene.GetNodeByID(i) for i in models] == [None]
    assert np.array_equal(exported(scene, node, left_id, volume), sparse_planes(left, 0, 6, 2).astype(np.uint8))
    assert np.array_equal(exported(scene, node, right_id, volume), right_before)
    assert [e[:3] for e in snapshot(scene)] == [e[:3] for e in before]


def test_compute_runs_without_touching_mrml_and_apply_writes(scene, quick_prior, blob_geometry):
    """The widget's path: prepare on the main thread, compute in a worker thread, then apply."""
    node, volume, left_id = draw_left_blob(scene, blob_geometry)
    job = prepare(node, left_id, prior=quick_prior, slices="sagittal:6:2", interpolation=4)
    computed = {}
    worker = threading.Thread(target=lambda: computed.setdefault("result", compute(job)))
    worker.start()
    worker.join()
    result = apply(job, computed["result"])
    assert result.segment_ids and node.GetSegmentation().GetSegment(result.segment_ids[0]) is not None
    assert result.reports[0]["observed_planes"][0]["pattern"] == "sagittal:6:2"
    assert result.reports[0]["interpolation"] == {"weight": 4.0, "plane_gap_mm": pytest.approx(6 * blob_geometry.spacing[0]),
                                                  "logits_per_mm": pytest.approx(4 * (8 / (6 * blob_geometry.spacing[0])) ** 4),
                                                  "curve": "linear"}
    assert "interpolating between close slices" in result.summary()


# ---------------------------------------------------------------------------------------------
# failures leave the scene as it was


def failing_calls(tmp_path, quick_prior):
    """case -> (arguments, expected exception)."""
    save_prior(quick_prior, str(tmp_path / "broken"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    return {
        "missing prior": (dict(prior=str(tmp_path / "nowhere.safetensors")), InputError),
        "corrupt prior": (dict(prior=str(tmp_path / "broken.safetensors")), InputError),
        "unknown prior name": (dict(prior="no-such-anatomy"), InputError),
        "empty segment": (dict(segment_id=["left", "EMPTY"]), InputError),
        "unknown segment": (dict(segment_id=["left", "nope"]), InputError),
        "cancel": (dict(progress=lambda step, total, loss: step < 2), Cancelled),
        # the first segment is done (half the steps and its last one) when the second is cancelled
        "cancel in second segment": (dict(progress=lambda step, total, loss: step <= total // 2 + 1), Cancelled),
        "bad slices": (dict(slices="oblique:8"), InputError),
        "bad output": (dict(output="overwrite_everything"), InputError),
        "unavailable device": (dict(device="cuda:7"), InputError),
        "unknown precision": (dict(precision="float16"), InputError),
        "negative interpolation": (dict(interpolation=-1.0), InputError),
    }


@pytest.mark.parametrize("case", ["missing prior", "corrupt prior", "unknown prior name", "empty segment",
                                  "unknown segment", "cancel", "cancel in second segment", "bad slices", "bad output",
                                  "unavailable device", "unknown precision", "negative interpolation"])
@pytest.mark.parametrize("output", ["new_segment", "new_segmentation", "replace"])
def test_failing_call_leaves_the_scene_unchanged(scene, quick_prior, blob_geometry, tmp_path, case, output):
    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = {"left": draw(node, volume, "left", sparse_planes(left, 0, 6, 2)),
           "right": draw(node, volume, "right", sparse_planes(right, 0, 6, 2))}
    ids["EMPTY"] = node.GetSegmentation().AddEmptySegment("", "empty")
    node.CreateClosedSurfaceRepresentation()
    arguments = dict(segment_id=["left", "right"], prior=quick_prior, output=output, steps=4)
    changes, expected = failing_calls(tmp_path, quick_prior)[case]
    arguments.update(changes)
    arguments["segment_id"] = [ids.get(name, name) for name in arguments["segment_id"]]
    seen = []
    if "progress" in arguments:
        cancel = arguments["progress"]
        arguments["progress"] = lambda *a: seen.append(a) or cancel(*a)
    before = snapshot(scene)
    mtime = node.GetSegmentation().GetMTime()

    with pytest.raises(expected) as caught:
        reconstruct_segment(node, **arguments)

    assert snapshot(scene) == before
    assert node.GetSegmentation().GetMTime() == mtime
    if isinstance(caught.value, InputError):
        message = str(caught.value)
        assert message and "\n" not in message and "Traceback" not in message
    if case == "cancel in second segment":
        assert seen[-1][0] > seen[-1][1] // 2  # it did get to the second segment


def test_failure_while_writing_rolls_back(scene, quick_prior, blob_geometry, monkeypatch):
    from MetaShapeReconLib import slicer_logic

    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 6, 2)),
           draw(node, volume, "right", sparse_planes(right, 0, 6, 2))]
    before = snapshot(scene)
    original = slicer_logic._new_segment
    made = []

    def fail_on_second(*args):
        made.append(args[0])
        if len(made) == 2:
            raise RuntimeError("disk full")
        return original(*args)

    monkeypatch.setattr(slicer_logic, "_new_segment", fail_on_second)
    for output in ("new_segment", "new_segmentation"):
        made.clear()
        with pytest.raises(RuntimeError):
            reconstruct_segment(node, ids, prior=quick_prior, output=output, export_model=True)
        assert snapshot(scene) == before


def test_closed_surface_source_segmentation(scene, quick_prior, blob_geometry):
    """A segmentation made from models (closed-surface source) is read through a scratch copy."""
    node, volume, left_id = draw_left_blob(scene, blob_geometry)
    node.CreateClosedSurfaceRepresentation()
    node.SetSourceRepresentationToClosedSurface()
    node.RemoveBinaryLabelmapRepresentation()
    assert node.GetSegmentation().GetSegment(left_id).GetRepresentation("Binary labelmap") is None
    before = snapshot(scene)
    with pytest.raises(InputError, match="source representation"):
        reconstruct_segment(node, left_id, prior=quick_prior, output="replace")
    assert snapshot(scene) == before
    job = prepare(node, left_id, prior=quick_prior)
    assert node.GetSegmentation().GetSegment(left_id).GetRepresentation("Binary labelmap") is None
    assert job.segments[0].labels.any()
    new_id, _ = reconstruct_segment(node, left_id, prior=quick_prior, slices="auto")
    assert node.GetSegmentation().GetSegment(new_id).GetRepresentation("Closed surface") is not None


# ---------------------------------------------------------------------------------------------
# what the widget uses: the worker thread, priors and devices without torch


def test_worker_runs_compute_off_the_main_thread_and_cancels(scene, quick_prior, blob_geometry):
    from MetaShapeReconLib.slicer_logic import ReconstructionWorker

    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 6, 2)),
           draw(node, volume, "right", sparse_planes(right, 0, 6, 2))]
    job = prepare(node, ids, prior=quick_prior, steps=3)
    worker = ReconstructionWorker()
    try:
        task = worker.compute(job)
        assert task.wait(120) and task.error is None
        assert task.latest[0] == task.latest[1]  # the last report is the end
        assert task.segment == (1, 2, "right")
        result = apply(job, task.result)
        assert len(result.segment_ids) == 2

        threads = set()
        elsewhere = worker.submit(lambda task: threads.add(threading.get_ident()) or "ran")
        assert elsewhere.wait(10) and elsewhere.result == "ran"
        assert threading.get_ident() not in threads

        cancelled = worker.compute(prepare(node, ids, prior=quick_prior, steps=50))
        cancelled.cancel()
        assert cancelled.wait(120)
        assert isinstance(cancelled.error, Cancelled)
    finally:
        worker.shutdown(10)
    assert not worker.alive


def test_priors_are_listed_without_torch_like_the_engine_lists_them(tmp_path, monkeypatch, quick_prior):
    from MetaShapeReconLib.slicer_logic import available_priors, describe_prior, prior_card

    save_prior(quick_prior, str(tmp_path / "blob"))
    (tmp_path / "notes.safetensors").write_bytes(b"no card beside it")
    monkeypatch.setenv("METASHAPERECON_PRIORS", str(tmp_path))
    listed = available_priors()
    assert listed["blob"]["path"] == str(tmp_path / "blob.safetensors")
    assert {name: entry["path"] for name, entry in listed.items()} == list_bundled_priors()
    assert "test-quick" in describe_prior(listed["blob"]["card"])
    with pytest.raises(InputError):
        prior_card(str(tmp_path / "notes.safetensors"))


def test_gpu_detection_and_slice_rules(monkeypatch, tmp_path):
    from MetaShapeReconLib.slicer_logic import detect_nvidia_gpus, slices_spec

    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    gpus = detect_nvidia_gpus()
    assert len(gpus) == 1 and gpus[0].name == "NVIDIA H100 80GB HBM3" and round(gpus[0].memory_gib) == 80
    assert gpus[0].label() == "NVIDIA H100 80GB HBM3, 80 GiB"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_nvidia_gpus() == []
    assert slices_spec("auto", 8, 3) == "auto"
    assert slices_spec("Sagittal", 8, 4) == "sagittal:8:4"
    assert slices_spec("axial", 4, 6) == "axial:4:2"


@pytest.mark.parametrize("output", ["new_segment", "replace"])
def test_scene_undo_takes_the_change_back(scene, quick_prior, blob_geometry, output):
    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 6, 2)), draw(node, volume, "right", right)]
    before = snapshot(scene)
    scene.SetUndoOn()
    reconstruct_segment(node, ids[0], prior=quick_prior, output=output, show_3d=False)
    assert snapshot(scene) != before
    scene.Undo()
    restored = scene.GetNodeByID(node.GetID())
    assert [restored.GetSegmentation().GetNthSegmentID(i) for i in range(2)] == ids
    assert restored.GetSegmentation().GetNumberOfSegments() == 2
    for segment_id, truth in zip(ids, (sparse_planes(left, 0, 6, 2), right)):
        assert np.array_equal(exported(scene, restored, segment_id, volume), truth.astype(np.uint8))


def draw_left_blob(scene, geometry):
    """A segmentation on a volume of `geometry` with the left blob drawn every 6th i-plane from 2:
    (segmentation node, volume node, segment id)."""
    left, _ = two_blobs(geometry)
    volume = add_volume(scene, geometry)
    node = add_segmentation(scene, volume)
    return node, volume, draw(node, volume, "left", sparse_planes(left, 0, 6, 2))


@pytest.mark.parametrize("output", ["new_segmentation", "new_segment"])
def test_scene_undo_also_removes_the_nodes_it_created(scene, quick_prior, blob_geometry, output):
    """One undo step: the new segmentation and the model nodes go too, with their display nodes."""
    node, volume, left_id = draw_left_blob(scene, blob_geometry)
    scene.SetUndoOn()
    before = snapshot(scene)
    _, result = reconstruct_segment(node, left_id, prior=quick_prior, output=output, export_model=True)
    created = [result.segmentation_node_id] if output == "new_segmentation" else []
    assert len(result.model_node_ids) == 1
    created += result.model_node_ids
    owned = [scene.GetNodeByID(i).GetDisplayNode().GetID() for i in created]

    scene.Undo()

    assert [scene.GetNodeByID(i) for i in created + owned] == [None] * len(created + owned)
    assert snapshot(scene) == before


def finer(geometry):
    """The grid with half the spacing over the same box: each voxel splits into 2x2x2."""
    return Geometry.create(tuple(2 * n for n in geometry.size), tuple(s / 2 for s in geometry.spacing),
                           geometry.index_to_physical([[-0.25, -0.25, -0.25]])[0], geometry.direction)


def test_finer_output_geometry_reads_the_drawing_on_its_own_grid(scene, quick_prior, fitted_prior, blob_geometry):
    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    drawn = sparse_planes(left, 0, 6, 2)
    left_id = draw(node, volume, "left", drawn)
    draw(node, volume, "right", right)
    fine_geometry = finer(blob_geometry)
    fine = add_volume(scene, fine_geometry, "fine")

    prior, steps = fitted_prior
    new_id, result = reconstruct_segment(node, left_id, fine, prior=prior, steps=steps, show_3d=False)

    # the planes are found on the grid they were drawn on
    holding = np.nonzero(drawn.any(axis=(1, 2)))[0]
    assert result.reports[0]["observed_planes"][0]["indices"] == holding.tolist()
    assert not result.reports[0]["output"]["keeps_drawn_planes"]  # the engine's rule on another grid
    assert Geometry.create(**{k: result.reports[0]["output"][k] for k in ("size", "spacing", "origin",
                                                                          "direction")}).same_grid(fine_geometry)
    # written on the fine grid
    image = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(new_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    assert np.allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], _ijk_to_ras(fine), atol=1e-6)
    # the network's shape on the fine grid follows the drawing on its planes (two fine planes each)
    reconstructed = exported(scene, node, new_id, fine)
    upsampled = drawn.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine_planes = np.sort(np.r_[2 * holding, 2 * holding + 1])
    on_planes = reconstructed[fine_planes].astype(bool), upsampled[fine_planes].astype(bool)
    assert 2 * (on_planes[0] & on_planes[1]).sum() / (on_planes[0].sum() + on_planes[1].sum()) > 0.8
    # the default output geometry is unchanged: the drawing's grid, no resampling
    job = prepare(node, left_id, prior=quick_prior)
    assert job.drawing_grid is None and job.grid.geometry.same_grid(blob_geometry, tol=1e-6)


def test_all_segments_leave_out_the_reconstructed_ones(scene, quick_prior, blob_geometry):
    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 6, 2)),
           draw(node, volume, "right", sparse_planes(right, 0, 6, 2))]
    segmentation = node.GetSegmentation()
    first, _ = reconstruct_segment(node, ids[0], prior=quick_prior, show_3d=False)
    assert segmentation.GetSegment(first).HasTag("MetaShapeRecon.Reconstructed")
    assert not segmentation.GetSegment(ids[0]).HasTag("MetaShapeRecon.Reconstructed")

    again, result = reconstruct_segment(node, None, prior=quick_prior, show_3d=False)

    assert [r["segment"]["id"] for r in result.reports] == ids
    assert [segmentation.GetSegment(i).GetName() for i in again] == ["left (reconstructed 2)", "right (reconstructed)"]
    # named explicitly, a reconstruction is still taken
    assert [s.segment_id for s in prepare(node, [first], prior=quick_prior).segments] == [first]
    # a segmentation of reconstructions only
    _, written = reconstruct_segment(node, ids, prior=quick_prior, output="new_segmentation", show_3d=False)
    created = scene.GetNodeByID(written.segmentation_node_id)
    before = snapshot(scene)
    with pytest.raises(InputError, match="every segment of the segmentation is a reconstruction"):
        reconstruct_segment(created, None, prior=quick_prior)
    assert snapshot(scene) == before
    # a replaced segment is tagged, and untagged again by undo
    _, replaced = reconstruct_segment(node, ids[1], prior=quick_prior, output="replace", show_3d=False)
    assert segmentation.GetSegment(ids[1]).HasTag("MetaShapeRecon.Reconstructed")
    replaced.undo()
    assert not segmentation.GetSegment(ids[1]).HasTag("MetaShapeRecon.Reconstructed")


@pytest.mark.parametrize("case", ["device", "dense drawing", "steps", "interpolation"])
def test_errors_name_the_module_controls_not_command_line_options(scene, quick_prior, blob_geometry, case):
    left, _ = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    left_id = draw(node, volume, "left", left if case == "dense drawing" else sparse_planes(left, 0, 6, 2))
    arguments, control = {"device": (dict(device="cuda:7"), "'Device'"),
                          "dense drawing": ({}, "'Drawn planes'"),
                          "steps": (dict(steps="many"), "'Adaptation steps'"),
                          "interpolation": (dict(interpolation=-1.0), "'interpolate close slices'")}[case]
    before = snapshot(scene)
    with pytest.raises(InputError) as caught:
        reconstruct_segment(node, left_id, prior=quick_prior, **arguments)
    message = str(caught.value)
    assert control in message and "--" not in message, message
    assert message.startswith("segment 'left': ")
    assert snapshot(scene) == before


def test_a_labelmap_volume_is_not_taken_for_a_segmentation(scene, quick_prior, blob_geometry):
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "drawing")
    before = snapshot(scene)
    for call in (lambda: reconstruct_segment(labelmap, None, prior=quick_prior),
                 lambda: prepare(labelmap, "Segment_1", prior=quick_prior)):
        with pytest.raises(InputError, match="import the labelmap into a segmentation first"):
            call()
    assert snapshot(scene) == before


@pytest.mark.parametrize("output", ["new_segmentation", "new_segment"])
def test_show_3d_off_makes_no_surface(scene, quick_prior, blob_geometry, output):
    node, volume, left_id = draw_left_blob(scene, blob_geometry)

    new_id, result = reconstruct_segment(node, left_id, prior=quick_prior, output=output, show_3d=False,
                                         export_model=True)

    target = scene.GetNodeByID(result.segmentation_node_id)
    assert not target.GetSegmentation().ContainsRepresentation("Closed surface")
    assert target.GetSegmentation().GetSegment(new_id).GetRepresentation("Closed surface") is None
    # the model still gets its surface, in the segment's colour
    model = scene.GetNodeByID(result.model_node_ids[0])
    assert model.GetPolyData().GetNumberOfPoints() > 100
    assert model.GetDisplayNode().GetColor() == pytest.approx(target.GetSegmentation().GetSegment(new_id).GetColor())
    # with Show 3D on, the surface is made and shown
    on_id, on = reconstruct_segment(node, left_id, prior=quick_prior, output=output)
    shown = scene.GetNodeByID(on.segmentation_node_id)
    assert shown.GetSegmentation().GetSegment(on_id).GetRepresentation("Closed surface") is not None
    assert shown.GetDisplayNode().GetSegmentVisibility3D(on_id)


def test_reference_volume_under_another_linear_transform(scene, blob_geometry):
    """The output grid is expressed in the segmentation's frame, whatever transforms the nodes are under."""
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    left, _ = two_blobs(blob_geometry)
    left_id = draw(node, volume, "left", sparse_planes(left, 0, 6, 2))
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 12.0)  # 12 mm towards R
    shift.SetMatrixTransformToParent(matrix)
    other = add_volume(scene, blob_geometry, "moved")
    other.SetAndObserveTransformNodeID(shift.GetID())
    job = prepare(node, left_id, other, prior="unused until compute")
    expected = _ijk_to_ras(other).copy()
    expected[0, 3] += 12.0
    assert np.allclose(job.grid.matrix, expected)
    # the same transform above both: nothing to compose
    node.SetAndObserveTransformNodeID(shift.GetID())
    assert np.allclose(prepare(node, left_id, other, prior="unused").grid.matrix, _ijk_to_ras(other))
    # a non-linear transform between them is refused with a clear message
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        prepare(node, left_id, other, prior="unused")


def test_worker_warms_pytorch_up_before_the_first_reconstruction():
    """The worker's first task pays PyTorch's first-use cost (torch.func loads its compiler
    stack) while the user is still drawing; a fresh interpreter shows what it saves."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'MetaShapeRecon')\n"
            "from MetaShapeReconLib.slicer_logic import ReconstructionWorker\n"
            "fresh = 'torch._dynamo' not in sys.modules\n"
            "worker = ReconstructionWorker()\n"
            "finished = worker.warm_up_task.wait(60)\n"
            "print(fresh, finished, worker.warm_up_task.error, 'torch._dynamo' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", "True", "None", "True"], done.stderr[-2000:]


def test_warnings_name_the_module_controls_too(scene, quick_prior, blob_geometry):
    node, volume, left_id = draw_left_blob(scene, blob_geometry)

    _, result = reconstruct_segment(node, left_id, prior=quick_prior, slices="i:12:2", show_3d=False)

    off = [w for w in result.reports[0]["warnings"] if "lie off the observed planes" in w]
    assert len(off) == 1 and "'Drawn planes'" in off[0] and "--" not in off[0], result.reports[0]["warnings"]


def test_a_cropped_output_geometry_reads_the_whole_drawing_where_it_was_drawn(scene, quick_prior, blob_geometry):
    """A volume on the drawing's voxels that cuts through the drawing (Crop Volume at the same
    spacing): the drawing is read whole on its own grid, slice numbers count there, and the
    result keeps the drawing where the crop covers it."""
    node, volume, left_id = draw_left_blob(scene, blob_geometry)
    drawn = exported(scene, node, left_id, volume)
    assert drawn[:20].any() and drawn[20:].any()
    crop = Geometry.create((44, 44, 40), blob_geometry.spacing, blob_geometry.index_to_physical([[20, 0, 0]])[0],
                           blob_geometry.direction)
    cropped = add_volume(scene, crop, "cropped")

    job = prepare(node, left_id, cropped, prior=quick_prior, slices="i:6:2")  # planes 2, 8, ... of the drawn grid
    assert job.drawing_grid is not None and int(job.segments[0].labels.sum()) == int(drawn.sum())
    new_id, result = reconstruct_segment(node, left_id, cropped, prior=quick_prior, slices="i:6:2", show_3d=False)

    report = result.reports[0]
    assert report["observed_planes"][0]["indices"] == list(range(2, 64, 6)) and not result.warnings
    assert report["output"]["keeps_drawn_planes"]
    written = exported(scene, node, new_id, cropped)
    planes = [i - 20 for i in range(2, 64, 6) if i >= 20]
    np.testing.assert_array_equal(written[planes], drawn[20:][planes])


def test_drawn_voxels_outside_the_reference_geometry_are_named_in_a_warning(scene, quick_prior, blob_geometry):
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    larger = Geometry.create((80, 56, 40), blob_geometry.spacing, blob_geometry.index_to_physical([[-8, -6, 0]])[0],
                             blob_geometry.direction)
    left, _ = two_blobs(larger)
    drawing = sparse_planes(np.roll(left, -20, axis=0), 0, 6, 2)  # partly in the 8 planes before the reference
    left_id = draw(node, add_volume(scene, larger, "larger"), "left", drawing)
    outside = int(drawing.sum()) - int(drawing[8:72, 6:50].sum())
    assert outside > 0

    _, result = reconstruct_segment(node, left_id, prior=quick_prior, show_3d=False)

    assert result.warnings == [f"left: {outside} drawn voxel(s) lie outside the reference geometry and were not used"]


def test_undo_takes_back_show_3d_too(scene, quick_prior, blob_geometry):
    left, right = two_blobs(blob_geometry)
    volume = add_volume(scene, blob_geometry)
    node = add_segmentation(scene, volume)
    ids = [draw(node, volume, "left", sparse_planes(left, 0, 6, 2)), draw(node, volume, "right", right)]
    display = node.GetDisplayNode()
    display.SetVisibility3D(False)  # the user had hidden the segmentation in 3-D
    display.SetSegmentVisibility3D(ids[0], False)
    segmentation = node.GetSegmentation()

    def state():
        return (segmentation.ContainsRepresentation("Closed surface"),
                [segmentation.GetSegment(i).GetRepresentation("Closed surface") is not None for i in ids],
                bool(display.GetVisibility3D()), bool(display.GetSegmentVisibility3D(ids[0])))

    before = state()
    for output in ("new_segment", "replace"):
        _, result = reconstruct_segment(node, ids[0], prior=quick_prior, output=output, show_3d=True)
        assert state() == (True, [True, True], True, output == "replace")  # a replaced segment is shown
        result.undo()
        assert state() == before == (False, [False, False], False, False)


def test_a_failure_with_scene_undo_on_leaves_no_undo_step(scene, quick_prior, blob_geometry, monkeypatch):
    from MetaShapeReconLib import slicer_logic

    node, volume, left_id = draw_left_blob(scene, blob_geometry)
    scene.SetUndoOn()
    before = snapshot(scene)
    levels, undoable = scene.GetNumberOfUndoLevels(), node.GetUndoEnabled()

    def disk_full(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slicer_logic, "_new_segment", disk_full)
    with pytest.raises(RuntimeError, match="disk full"):
        reconstruct_segment(node, left_id, prior=quick_prior)

    assert snapshot(scene) == before
    assert (scene.GetNumberOfUndoLevels(), scene.GetNumberOfRedoLevels(), node.GetUndoEnabled()) == (levels, 0, undoable)


def test_engine_messages_name_the_modules_controls_and_their_values():
    from MetaShapeReconLib.slicer_logic import _name_controls

    assert _name_controls("--steps auto: the loss was still improving") == "'until converged': the loss was still improving"
    assert _name_controls("try --device cpu or a coarser --output-spacing") == \
        "try 'Device' CPU or a coarser 'Output geometry'"
    assert _name_controls("e.g. --slices axial:1)") == "e.g. 'Drawn planes' Axial, every 1)"
    assert _name_controls("--steps many: expected a whole number") == "'Adaptation steps' many: expected a whole number"


def test_a_task_cancelled_while_it_waits_never_runs():
    from MetaShapeReconLib.slicer_logic import ReconstructionWorker

    worker = ReconstructionWorker()
    release, ran = threading.Event(), []
    try:
        busy = worker.submit(lambda task: release.wait(30))  # as the warm-up, ahead in the queue
        waiting = worker.submit(lambda task: ran.append(True))
        waiting.cancel()
        release.set()
        assert busy.wait(30) and waiting.wait(30)
        assert isinstance(waiting.error, Cancelled) and ran == []
    finally:
        release.set()
        worker.shutdown(10)
