"""MetaShapeRecon: the complete 3-D shape of a structure drawn on a few slices, from a
meta-learned implicit shape prior.

Slicer's four scripted-module roles (Module, Widget, Logic, Test) and the parameter node. The
work is in MetaShapeReconLib: the engine, and `slicer_logic` (reading segments, running the
engine, writing results; Qt-free and tested with slicer-core). This file is GUI and glue.

This file does not import PyTorch, so the module opens fast, also before PyTorch is installed;
installing it (through the PyTorch extension) happens on request only. When it is installed, the
widget starts the persistent worker thread, which imports it and warms it up in the background.
Adaptation runs on that thread; only the main thread touches MRML and Qt.
"""

import contextlib
import importlib.util
import logging
import os
import traceback
from typing import Annotated, Optional

import qt
import slicer
import vtk
from MetaShapeReconLib import slicer_logic
from MetaShapeReconLib.errors import Cancelled, InputError
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_TORCH_VERSION = "2.1"
SAFETENSORS_REQUIREMENT = "safetensors>=0.4"
LOAD_PRIOR_FILE = "__load_prior_file__"
PLANE_AXES = ("auto", "sagittal", "coronal", "axial")
DEVICES = ("auto", "cuda", "cpu")
POLL_INTERVAL_S = 0.05  # how often the main thread looks at the worker while it runs


#
# MetaShapeRecon
#


class MetaShapeRecon(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MetaShapeRecon")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MetaShapeRecon contributors"]
        self.parent.helpText = _("""
Reconstruct the complete 3D shape of a structure (kidney, left atrium, pancreas, ...) that you
drew on a few slices only, for example every 8th sagittal slice. A shape prior, meta-learned on
many segmentations of that anatomy, is adapted to your drawing in a few gradient steps.
<ol>
<li>Draw the structure on a few slices with Segment Editor.</li>
<li>Select the segmentation and the segment (or all segments), and the prior of that anatomy.</li>
<li>Click <b>Reconstruct</b>. The result is a new segment "&lt;name&gt; (reconstructed)" (or a new
segmentation, or it replaces the input segment); no other segment is changed.</li>
</ol>
See the <a href="https://github.com/metashaperecon/SlicerMetaShapeRecon/blob/main/docs/SLICER.md">documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Method: De Paolis et al., "Fast Medical Shape Reconstruction via Meta-learned Implicit Neural
Representations". Bundled priors carry the licence and attribution of the data they were trained
on (shown with each prior).
""")


#
# Parameter node
#


@parameterNodeWrapper
class MetaShapeReconParameterNode:
    """The module's settings, saved with the scene.

    segmentationNode, segmentID: the drawing (no GUI connector exists for segment selectors, so
    the widget syncs these two itself). prior: a bundled prior's name or a prior file's path.
    steps: -1 for the prior's default. planes: "auto" or the axis of planesStep/planesOffset.
    interpolate: weigh in shape-based interpolation between parallel drawn planes as the
    prior's card sets it (off: the prior alone).
    """

    segmentationNode: vtkMRMLSegmentationNode
    segmentID: str = ""
    allSegments: bool = False
    referenceVolume: vtkMRMLScalarVolumeNode
    prior: str = "kidney"
    steps: Annotated[int, WithinRange(-1, 10000)] = -1
    untilConverged: bool = False
    planes: Annotated[str, Choice(list(PLANE_AXES))] = "auto"
    planesStep: Annotated[int, WithinRange(1, 64)] = 8
    planesOffset: Annotated[int, WithinRange(0, 63)] = 0
    interpolate: bool = True
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    output: Annotated[str, Choice(list(slicer_logic.OUTPUT_MODES))] = "new_segment"
    show3D: bool = True
    exportModel: bool = False


#
# MetaShapeReconWidget
#


class MetaShapeReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGUI = False
        self._task = None  # the running reconstruction (a slicer_logic.Task)
        self._lastResult = None  # for Undo
        self._gpus = []
        self._priors = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MetaShapeRecon.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MetaShapeReconLogic()
        if not MetaShapeReconLogic.missingDependencies():
            self.logic.worker()  # started now: it warms PyTorch up while the user draws
        self._populateChoices()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # widgets without a parameter-node connector are synced here
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.priorComboBox.connect("currentIndexChanged(int)", self.onPriorChanged)
        self.ui.planesComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.outputComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)

        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstructButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._task is not None:
            self._task.cancel()
        self.removeObservers()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._task.cancel()
        self._lastResult = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ---------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.segmentationNode:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if first:
                self._parameterNode.segmentationNode = first

    def setParameterNode(self, inputParameterNode: Optional[MetaShapeReconParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Parameter node -> the widgets that have no connector, and the button states."""
        if self._parameterNode is None or self._updatingGUI:
            self._updateButtons()
            return
        self._updatingGUI = True
        try:
            node = self._parameterNode
            self.ui.segmentSelector.setCurrentNode(node.segmentationNode)
            if node.segmentID:
                self.ui.segmentSelector.setCurrentSegmentID(node.segmentID)
            self._selectPrior(node.prior)
            self._selectData(self.ui.planesComboBox, node.planes)
            self._selectData(self.ui.deviceComboBox, node.device)
            self._selectData(self.ui.outputComboBox, node.output)
            namedPlanes = node.planes != "auto"
            self.ui.planesStepSpinBox.enabled = namedPlanes
            self.ui.planesOffsetSpinBox.enabled = namedPlanes
            self.ui.stepsSpinBox.enabled = not node.untilConverged
        finally:
            self._updatingGUI = False
        # what the widgets fell back to (first segment, first prior) is what will be used
        shownSegment = self.ui.segmentSelector.currentSegmentID() or ""
        if shownSegment != self._parameterNode.segmentID:
            self._parameterNode.segmentID = shownSegment
        shown = self._currentData(self.ui.priorComboBox)
        if shown and shown != LOAD_PRIOR_FILE and shown != self._parameterNode.prior:
            saved = self._parameterNode.prior
            self._parameterNode.prior = shown  # the saved prior is gone: use the one shown, and say so
            if saved:
                self.ui.statusLabel.text = _("The scene's prior {saved} is not available here; {shown} is selected "
                                             "instead.").format(saved=saved, shown=shown)
        self._updatePriorInfo()
        self._updateButtons()

    def updateParameterNodeFromGUI(self, *args) -> None:
        """The widgets that have no connector -> parameter node."""
        if self._parameterNode is None or self._updatingGUI:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            node = self._parameterNode
            node.segmentationNode = self.ui.segmentSelector.currentNode()
            node.segmentID = self.ui.segmentSelector.currentSegmentID() or ""
            prior = self._currentData(self.ui.priorComboBox)
            if prior and prior != LOAD_PRIOR_FILE:
                node.prior = prior
            node.planes = self._currentData(self.ui.planesComboBox) or "auto"
            node.device = self._currentData(self.ui.deviceComboBox) or "auto"
            node.output = self._currentData(self.ui.outputComboBox) or "new_segment"
        finally:
            self._parameterNode.EndModify(wasModified)

    # -- choices ----------------------------------------------------------------------------

    def _populateChoices(self) -> None:
        self.ui.planesComboBox.clear()
        for value, label in zip(PLANE_AXES, (_("Auto-detect"), _("Sagittal"), _("Coronal"), _("Axial"))):
            self.ui.planesComboBox.addItem(label, value)

        self.ui.outputComboBox.clear()
        labels = (_("New segment in this segmentation"), _("New segmentation"), _("Replace the input segment"))
        for value, label in zip(slicer_logic.OUTPUT_MODES, labels):
            self.ui.outputComboBox.addItem(label, value)

        # the driver tells us about NVIDIA GPUs without importing torch
        self._gpus = slicer_logic.detect_nvidia_gpus()
        self.ui.deviceComboBox.clear()
        if self._gpus:
            gpu = self._gpus[0].label()
            self.ui.deviceComboBox.addItem(_("Auto (GPU: {gpu})").format(gpu=gpu), "auto")
            self.ui.deviceComboBox.addItem(_("CUDA: {gpu}").format(gpu=gpu), "cuda")
        else:
            self.ui.deviceComboBox.addItem(_("Auto (CPU: no NVIDIA GPU found)"), "auto")
            self.ui.deviceComboBox.addItem(_("CUDA (no NVIDIA GPU found)"), "cuda")
        self.ui.deviceComboBox.addItem(_("CPU"), "cpu")

        self.ui.priorComboBox.clear()
        self._priors = slicer_logic.available_priors()
        if not self._priors:  # something other than "Load prior file..." must be selectable
            self.ui.priorComboBox.addItem(_("(no prior bundled)"), "")
        for name in sorted(self._priors):
            card = self._priors[name]["card"]
            anatomy = card.get("anatomy") or name
            label = name if anatomy == name else f"{anatomy} ({name})"
            self.ui.priorComboBox.addItem(label, name)
            self.ui.priorComboBox.setItemData(self.ui.priorComboBox.count - 1,
                                              slicer_logic.describe_prior(card), qt.Qt.ToolTipRole)
        self.ui.priorComboBox.addItem(_("Load prior file..."), LOAD_PRIOR_FILE)

    @staticmethod
    def _currentData(comboBox):
        return comboBox.itemData(comboBox.currentIndex) if comboBox.currentIndex >= 0 else None

    @staticmethod
    def _selectData(comboBox, value) -> bool:
        index = comboBox.findData(value)
        if index >= 0:
            comboBox.currentIndex = index
        return index >= 0

    def _selectPrior(self, prior: str) -> None:
        if self._selectData(self.ui.priorComboBox, prior):
            return
        if prior and os.path.isfile(prior):  # a prior file chosen earlier (saved in the scene)
            self._addPriorFile(prior)
        else:
            self.ui.priorComboBox.currentIndex = 0  # the first bundled prior, or the placeholder

    def _addPriorFile(self, path: str) -> None:
        index = self.ui.priorComboBox.findData(LOAD_PRIOR_FILE)
        self.ui.priorComboBox.insertItem(index, os.path.basename(path), path)
        self.ui.priorComboBox.setItemData(index, path, qt.Qt.ToolTipRole)
        self.ui.priorComboBox.currentIndex = index

    def onPriorChanged(self, index=None) -> None:
        if self._updatingGUI:
            return
        if self._currentData(self.ui.priorComboBox) == LOAD_PRIOR_FILE:
            path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Load a MetaShapeRecon prior"), "",
                                                  _("MetaShapeRecon prior (*.safetensors)"))
            self._updatingGUI = True
            try:
                if path:
                    try:
                        slicer_logic.prior_card(path)
                    except InputError as error:
                        slicer.util.errorDisplay(str(error), windowTitle=_("MetaShapeRecon"))
                        path = ""
                if path:
                    existing = self.ui.priorComboBox.findData(path)
                    if existing >= 0:
                        self.ui.priorComboBox.currentIndex = existing
                    else:
                        self._addPriorFile(path)
                else:  # cancelled: back to the prior in use
                    self._selectPrior(self._parameterNode.prior if self._parameterNode else "")
            finally:
                self._updatingGUI = False
        self.updateParameterNodeFromGUI()
        self._updatePriorInfo()

    def _currentPriorCard(self) -> Optional[dict]:
        prior = self._currentData(self.ui.priorComboBox)
        if not prior or prior == LOAD_PRIOR_FILE:
            return None
        if prior in self._priors:
            return self._priors[prior]["card"]
        try:
            return slicer_logic.prior_card(prior)
        except InputError:
            return None

    def _updatePriorInfo(self) -> None:
        card = self._currentPriorCard()
        if card is None:
            self.ui.priorInfoLabel.text = _("No prior is bundled with this version: load a prior file.") \
                if not self._priors else ""
            self.ui.stepsSpinBox.specialValueText = _("Prior default")
            return
        self.ui.priorInfoLabel.text = slicer_logic.describe_prior(card)
        steps = (card.get("adaptation") or {}).get("steps")
        self.ui.stepsSpinBox.specialValueText = _("Prior default ({steps})").format(steps=steps) \
            if steps is not None else _("Prior default")

    def _updateButtons(self) -> None:
        running = self._task is not None
        node = self._parameterNode
        ready = bool(node and node.segmentationNode and (node.allSegments or node.segmentID))
        ready = ready and self._currentPriorCard() is not None
        if running:
            self.ui.reconstructButton.text = _("Cancelling...") if self._task.cancelled else _("Cancel")
            self.ui.reconstructButton.toolTip = _("Stop the reconstruction; the scene stays as it was.")
            self.ui.reconstructButton.enabled = not self._task.cancelled
        else:
            self.ui.reconstructButton.text = _("Reconstruct")
            self.ui.reconstructButton.toolTip = _("Reconstruct the complete 3D shape from the drawn slices.") if ready \
                else _("Select a segmentation, a segment (or all segments) and a prior.")
            self.ui.reconstructButton.enabled = ready
        for widget in (self.ui.inputsCollapsibleButton, self.ui.settingsCollapsibleButton):
            widget.enabled = not running
        self.ui.undoButton.enabled = not running and self._lastResult is not None and bool(
            self._lastResult.segment_ids or self._lastResult.model_node_ids)

    # -- running ----------------------------------------------------------------------------

    def onReconstructButton(self) -> None:
        if self._task is not None:  # the button is Cancel while running
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self._updateButtons()
            return
        try:
            self._reconstruct()
        except (InputError, Cancelled) as error:
            self._showError(error)
        except Exception as error:  # a bug: show it, with the details, never fail silently
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(_("Reconstruction failed: {error}").format(error=error),
                                     windowTitle=_("MetaShapeRecon"), detailedText=traceback.format_exc())
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)

    def _showError(self, error) -> None:
        if isinstance(error, Cancelled):
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            return
        self.ui.statusLabel.text = _("Not reconstructed: {error}").format(error=error)
        slicer.util.errorDisplay(str(error), windowTitle=_("MetaShapeRecon"))

    def _reconstruct(self) -> None:
        node = self._parameterNode
        if not self.logic.ensureDependencies(askConfirmation=True):
            self.ui.statusLabel.text = _("PyTorch and safetensors are needed to reconstruct.")
            return
        segmentId = None if node.allSegments else node.segmentID
        # "auto": the prior's steps until the fit to the drawing stops improving
        steps = "auto" if node.untilConverged else (None if node.steps < 0 else node.steps)
        job = slicer_logic.prepare(
            node.segmentationNode, segmentId, node.referenceVolume, prior=node.prior, steps=steps,
            slices=slicer_logic.slices_spec(node.planes, node.planesStep, node.planesOffset),
            device=node.device, output=node.output, show_3d=node.show3D, export_model=node.exportModel,
            interpolation=None if node.interpolate else 0.0)

        self.ui.resultLabel.text = ""
        self.ui.statusLabel.text = _("Loading the prior...")
        self.ui.progressBar.setRange(0, 0)  # busy until the first step is reported
        self.ui.progressBar.show()
        try:
            self._task = self.logic.worker().compute(job)
            self._updateButtons()
            # Pump Qt events while the worker runs: the GUI stays responsive (and Cancel works),
            # and waiting on the task releases the GIL to the worker.
            while not self._task.wait(POLL_INTERVAL_S):
                self._showProgress(self._task)
                slicer.app.processEvents()
            task = self._task
        finally:
            self._task = None
            self.ui.progressBar.hide()
            self._updateButtons()
        if task.error is not None:
            raise task.error
        if task.cancelled:  # Cancel, a scene close or the module closing came after the last step
            raise Cancelled("cancelled")
        with slicer.util.RenderBlocker(), self._keptSegmentSelection():
            result = slicer_logic.apply(job, task.result)
        self._lastResult = result
        self.ui.statusLabel.text = ""
        text = result.summary()
        if result.warnings:
            text += "\n" + _("Warnings: {warnings}").format(warnings="; ".join(result.warnings))
        self.ui.resultLabel.text = text
        logging.info(text)
        self._updateButtons()

    @contextlib.contextmanager
    def _keptSegmentSelection(self):
        """Keep the selected segment through a change of the segmentation's segments: the segment
        selector refills itself on every segment added, removed or retagged, and falls back to
        the first segment, which the next Reconstruct would then take."""
        selector = self.ui.segmentSelector
        node, segmentId = selector.currentNode(), selector.currentSegmentID()
        try:
            yield
        finally:
            if (node is not None and segmentId and selector.currentNode() is node
                    and node.GetSegmentation().GetSegment(segmentId) is not None
                    and selector.currentSegmentID() != segmentId):
                selector.setCurrentSegmentID(segmentId)

    def _showProgress(self, task) -> None:
        latest, segment = task.latest, task.segment
        if latest is None:
            return
        step, total, loss = latest
        self.ui.progressBar.setRange(0, max(1, total))
        self.ui.progressBar.value = min(step, total)
        prefix = ""
        if segment is not None and segment[1] > 1:
            prefix = _("Segment {index}/{count} '{name}': ").format(index=segment[0] + 1, count=segment[1],
                                                                     name=segment[2])
        if task.cancelled:
            self.ui.statusLabel.text = _("Cancelling...")
        elif loss is None:
            self.ui.statusLabel.text = prefix + _("evaluating the shape ({step}/{total})").format(
                step=step, total=total)
        else:
            self.ui.statusLabel.text = prefix + _("step {step}/{total}, loss {loss:.4f}").format(
                step=step, total=total, loss=loss)

    def onUndoButton(self) -> None:
        if self._lastResult is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True), self._keptSegmentSelection():
            self._lastResult.undo()
            self.ui.resultLabel.text = _("Last reconstruction undone.")
        self._lastResult = None
        self._updateButtons()


#
# MetaShapeReconLogic
#


class MetaShapeReconLogic(ScriptedLoadableModuleLogic):
    """Reconstruction from Slicer's Python console, without the widget::

        logic = slicer.util.getModuleLogic("MetaShapeRecon")
        segmentation = getNode("Segmentation")
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("kidney")  # e.g. "Segment_1"
        newId, result = logic.process(segmentation, segmentId, prior="kidney")
        print(result.summary())

    A thin layer over MetaShapeReconLib.slicer_logic.reconstruct_segment."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._worker = None

    def getParameterNode(self):
        return MetaShapeReconParameterNode(super().getParameterNode())

    def worker(self):
        """The persistent worker thread (started when the module opens, or on first use)."""
        if self._worker is None or not self._worker.alive:
            self._worker = slicer_logic.ReconstructionWorker()
        return self._worker

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(timeout=5)
            self._worker = None

    # -- dependencies -----------------------------------------------------------------------

    @staticmethod
    def missingDependencies():
        """Python packages the engine needs that are not installed (checked without importing them)."""
        missing = []
        if importlib.util.find_spec("torch") is None:
            missing.append("PyTorch")
        if importlib.util.find_spec("safetensors") is None:
            missing.append("safetensors")
        return missing

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Install what is missing, after the user agrees: PyTorch through the PyTorch extension's
        PyTorchUtils (a build for this computer's GPU, at least MINIMUM_TORCH_VERSION), safetensors
        through Slicer's pip. Returns False when the user declines."""
        missing = self.missingDependencies()
        if "PyTorch" not in missing:
            self._checkTorchVersion()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MetaShapeRecon needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                  "Install them now? PyTorch is a large download (up to a few GB) and may take several minutes.")
                .format(packages="\n".join(f"  - {p}" for p in missing)),
                windowTitle=_("Install Python packages")):
            return False
        if "PyTorch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise InputError(_("MetaShapeRecon needs the PyTorch extension: install 'PyTorch' from the "
                                   "Extensions Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            with slicer.util.WaitCursor():
                torch = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise InputError(_("PyTorch could not be installed; see the PyTorch Utils module."))
        if "safetensors" in missing:
            with slicer.util.WaitCursor():
                slicer.util.pip_install(SAFETENSORS_REQUIREMENT)
        return True

    @staticmethod
    def _checkTorchVersion() -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("torch")
        except PackageNotFoundError:
            return
        from packaging.version import Version

        if Version(installed.split("+")[0]) < Version(MINIMUM_TORCH_VERSION):
            raise InputError(_("PyTorch {installed} is installed; MetaShapeRecon needs {minimum} or newer. "
                               "Install a newer version in the PyTorch Utils module.").format(
                installed=installed, minimum=MINIMUM_TORCH_VERSION))

    # -- processing -------------------------------------------------------------------------

    def process(self, segmentationNode, segmentId=None, referenceVolumeNode=None, prior="kidney", steps=None,
                slices="auto", device="auto", output="new_segment", show3D=True, exportModel=False, progress=None,
                interpolation=None, precision="auto"):
        """Reconstruct (blocking) and write the result into the scene.

        See MetaShapeReconLib.slicer_logic.reconstruct_segment for the arguments. Returns
        (segment id, or a list of ids when segmentId is a list or None; the result record)."""
        if not self.ensureDependencies(askConfirmation=True):
            raise InputError("MetaShapeRecon needs PyTorch and safetensors; the installation was declined")
        return slicer_logic.reconstruct_segment(
            segmentationNode, segmentId, referenceVolumeNode, prior=prior, steps=steps, slices=slices, device=device,
            output=output, progress=progress, show_3d=show3D, export_model=exportModel, interpolation=interpolation,
            precision=precision)


#
# MetaShapeReconTest
#


class MetaShapeReconTest(ScriptedLoadableModuleTest):
    """Reconstructs the bundled sample case in the application and checks the result."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MetaShapeRecon_sample()

    def test_MetaShapeRecon_sample(self):
        import numpy as np

        samples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", "Samples", "kidney")
        sparsePath, truthPath = os.path.join(samples, "sparse.nii.gz"), os.path.join(samples, "truth.nii.gz")
        if not (os.path.isfile(sparsePath) and os.path.isfile(truthPath)):
            self.delayDisplay("The bundled sample is missing: test skipped")
            return
        if "kidney" not in slicer_logic.available_priors():
            self.delayDisplay("The kidney prior is not bundled: test skipped")
            return
        self.delayDisplay("Loading the sample")
        sparse = slicer.util.loadLabelVolume(sparsePath)
        truth = slicer.util.loadLabelVolume(truthPath)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Sample")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(sparse)
        self.assertTrue(slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(sparse, segmentation))
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)

        self.delayDisplay("Reconstructing")
        logic = MetaShapeReconLogic()
        newId, result = logic.process(segmentation, segmentId, prior="kidney")
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 2)
        self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(newId))

        reconstructed = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, newId, truth) > 0
        expected = slicer.util.arrayFromVolume(truth) > 0
        dice = 2.0 * np.logical_and(reconstructed, expected).sum() / (reconstructed.sum() + expected.sum())
        self.delayDisplay(f"{result.summary()}; Dice with the truth {dice:.3f}")
        self.assertGreater(dice, 0.85)
        self.assertGreater(min(result.dice_observed_planes.values()), 0.9)

        result.undo()
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.delayDisplay("Test passed")
