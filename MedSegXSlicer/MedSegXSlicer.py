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

from MedSegXSlicerLib import MedSegXSlicerLogic, install, mrml_conversion  # noqa: E402
from medsegx_core.errors import Cancelled, MedSegXError  # noqa: E402

POSITIVE_COLOR = (0.25, 0.85, 0.35)
NEGATIVE_COLOR = (0.95, 0.25, 0.25)
POLL_INTERVAL_MS = 100


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
Promptable segmentation of CT and MR volumes: type a structure name (e.g. <i>liver</i>), click inside it
(include points) or where the result leaks (exclude points), and/or draw a box (ROI), then press <b>Segment</b>.
More clicks refine the selected segment quickly because the volume's embeddings are kept.
The engine re-implements SegVol (zoom-out-zoom-in) with MedSegX's hierarchy-routed adapter experts.
From the Python console: <code>MedSegXSlicerLib.MedSegXSlicerLogic().segment(volumeNode, segmentationNode,
text="liver")</code>. Batch mode: <code>Slicer --no-main-window --python-script medsegx_batch.py --help</code>.
""")
        self.parent.acknowledgementText = _("""
SegVol (Du et al., BAAI-DCAI) and MedSegX (MedSegDB hierarchy, ConMoAE) are the methods re-implemented here;
their published checkpoints can be imported. Built on 3D Slicer, MONAI and PyTorch.
""")


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
    text - structure name.
    device - auto / cuda / cpu.
    autoSegment - segment again after each click.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    boxRoi: vtkMRMLMarkupsROINode
    text: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    autoSegment: bool = True


#
# MedSegXSlicerWidget
#
class MedSegXSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[MedSegXSlicerLogic] = None
        self._parameterNode: Optional[MedSegXSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._task = None
        self._rerunWhenDone = False
        self._observedPointNodes = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resource_path("UI/MedSegXSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSegXSlicerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for placeWidget in (self.ui.positivePointsPlaceWidget, self.ui.negativePointsPlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            placeWidget.deleteAllControlPointsOptionVisible = True
        self._setupTextCompletion()
        self.ui.weightsPathLineEdit.currentPath = str(self.logic.weightsPath)
        self._updateWeightsStatus()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTask)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegmentButton)
        self.ui.clearPromptsButton.connect("clicked(bool)", self.onClearPromptsButton)
        self.ui.importCheckpointButton.connect("clicked(bool)", self.onImportCheckpointButton)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)

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

    def cleanup(self) -> None:
        self.removeObservers()
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
        self.logic.sessions.forget()

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
            self._parameterNode.positivePoints = self._newPointsNode(_("MedSegX include points"),
                                                                     mrml_conversion.POSITIVE, POSITIVE_COLOR)
        if not self._parameterNode.negativePoints:
            self._parameterNode.negativePoints = self._newPointsNode(_("MedSegX exclude points"),
                                                                     mrml_conversion.NEGATIVE, NEGATIVE_COLOR)

    @staticmethod
    def _newPointsNode(name: str, label: str, color) -> vtkMRMLMarkupsFiducialNode:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        mrml_conversion.mark_points_node(node, label)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(color)
        node.GetDisplayNode().SetColor(color)
        return node

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
        busy = self._task is not None
        hasPrompt = bool(p.text.strip()) or p.boxRoi is not None or any(
            node is not None and node.GetNumberOfDefinedControlPoints() > 0
            for node in (p.positivePoints, p.negativePoints))
        self.ui.segmentButton.enabled = not busy and p.inputVolume is not None and hasPrompt
        self.ui.segmentButton.toolTip = _("Segment the structure described by the prompts.") if p.inputVolume \
            else _("Select an input volume first.")
        self.ui.cancelButton.enabled = busy
        self.ui.undoButton.enabled = not busy and bool(self.logic.canUndo())

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

    def onPointPlaced(self, caller, event) -> None:
        self._updateButtons()
        if self._parameterNode and self._parameterNode.autoSegment and self._parameterNode.inputVolume:
            if self._task is not None:
                self._rerunWhenDone = True  # the latest clicks are used once the running request ends
            else:
                self.onSegmentButton()

    # ---- segment ----------------------------------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not start."), waitCursor=True):
            install.ensure_dependencies()
            self.logic.device = p.device
            self._task = self.logic.startSegmentation(
                p.inputVolume, p.outputSegmentation, text=p.text, pointsNode=p.positivePoints,
                negativePointsNode=p.negativePoints, roiNode=p.boxRoi,
                segmentId=self.ui.segmentSelector.currentSegmentID() or None)
            for warning in self._task.warnings:
                slicer.util.showStatusMessage(f"MedSegX: {warning}", 5000)
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Segmenting...")
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
            return
        self.pollTimer.stop()
        self._task = None
        self.ui.progressBar.visible = False
        try:
            segmentId = self.logic.finishSegmentation(task)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled: the segmentation was not changed.")
        except MedSegXError as exc:
            self.ui.statusLabel.text = _("Failed: the segmentation was not changed.")
            slicer.util.errorDisplay(str(exc), windowTitle="MedSegX")
        except Exception as exc:  # noqa: BLE001 - a bug: show it with its traceback
            import traceback
            self.ui.statusLabel.text = _("Failed: the segmentation was not changed.")
            slicer.util.errorDisplay(_("MedSegX failed unexpectedly: ") + str(exc), windowTitle="MedSegX",
                                     detailedText=traceback.format_exc())
        else:
            self._parameterNode.outputSegmentation = task.segmentation_node
            self.ui.segmentSelector.setCurrentNode(task.segmentation_node)
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)
            name = task.segmentation_node.GetSegmentation().GetSegment(segmentId).GetName()
            self.ui.statusLabel.text = _("Done: segment '{name}'.").format(name=name)
        self._updateButtons()
        if self._rerunWhenDone:
            self._rerunWhenDone = False
            self.onSegmentButton()

    def onCancelButton(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
        self._rerunWhenDone = False

    def onUndoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("MedSegX could not undo."), waitCursor=True):
            self.logic.undoLastSegmentation()
        self._updateButtons()

    def onNewSegmentButton(self) -> None:
        self.ui.segmentSelector.setCurrentSegmentID("")
        self.onClearPromptsButton()

    def onClearPromptsButton(self) -> None:
        for node in (self._parameterNode.positivePoints, self._parameterNode.negativePoints):
            if node is not None:
                node.RemoveAllControlPoints()
        self._updateButtons()

    # ---- weights ----------------------------------------------------------------------------------------------
    def onWeightsPathChanged(self, path: str) -> None:
        self.logic.weightsPath = path or None
        self.logic.sessions.forget()
        self._updateWeightsStatus()

    def _updateWeightsStatus(self) -> None:
        try:
            _path, explanation = self.logic.describeWeights()
        except MedSegXError as exc:
            self.ui.weightsStatusLabel.text = str(exc)
        else:
            self.ui.weightsStatusLabel.text = explanation[:1].upper() + explanation[1:]

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
                install.ensure_dependencies()
                folder = self.logic.importCheckpoint(checkpoint, progress=onProgress)
                self.ui.weightsPathLineEdit.currentPath = str(folder)
        finally:
            progressDialog.close()
        self._updateWeightsStatus()


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
        return volume, points

    def _tinyWeights(self):
        from medsegx_core.modeling.build import build_model
        from medsegx_core.weights.store import save_model

        folder = os.path.join(tempfile.mkdtemp(prefix="MedSegXTest"), "tiny")
        return save_model(build_model("tiny"), folder)

    def test_segment_refine_undo_and_cancel(self):
        self.delayDisplay("MedSegX: segment, refine, undo, cancel")
        install.ensure_dependencies()
        volume, points = self._makeScene()
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
        volume, points = self._makeScene()
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

