"""MedSegXSlicerLogic: MRML in, segment out. No Qt: usable from the Python console, batch mode and CI.

Console::

    import MedSegXSlicerLib
    logic = MedSegXSlicerLib.MedSegXSlicerLogic(weightsPath="/path/to/weights")
    segmentId = logic.segment(getNode("CT"), getNode("Segmentation"), text="liver",
                              pointsNode=getNode("MedSegX positive points"), roiNode=getNode("R"))

How one request runs (the widget uses the two halves, the console the whole):
1. ``startSegmentation`` (main thread): checks the inputs and turns MRML into engine inputs: the volume's voxels
   with its world geometry (parent transforms applied to a copy) and the prompts in the same world frame. Every
   user mistake (no volume, no prompt, unknown text, a point outside the volume, missing weights or
   dependencies) is raised here, before any work starts. The engine job is queued on the one worker thread.
2. The worker loads the model (once), encodes the volume (once per volume, see session.py) and segments.
3. ``finishSegmentation`` (main thread): writes the mask into one segment (segment_writer.py). A failure or a
   cancel before this point leaves the segmentation node untouched; a new segmentation node is only created here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from medsegx_core.errors import GeometryError, InputError, WeightsError
from medsegx_core.progress import CancelToken, ProgressCallback, scaled

from . import install, mrml_conversion, segment_writer
from .appearance import segment_appearance
from .session import SessionStore
from .worker import EngineWorker, Job

try:  # Slicer's base class (imports Qt): inside Slicer only. slicer-core / plain Python get a Qt-free stand-in.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # pragma: no cover - depends on the environment
    ScriptedLoadableModuleLogic = object

logger = logging.getLogger("MedSegX")

MODULE_NAME = "MedSegXSlicer"
DEVICES = ("auto", "cuda", "cpu")
UNDO_DEPTH = 20


def default_weights():
    """The engine's choice when the user picked no weights: ``$MEDSEGX_WEIGHTS``, then official weights installed
    under ``$MEDSEGX_HOME`` (``~/.medsegx``; where "Import official checkpoint" puts them), then the bundled
    starter model. Returns ``medsegx_core.weights.default.DefaultWeights`` (path, kind, one-line explanation)."""
    from medsegx_core.weights.default import default_weights as engine_default_weights
    return engine_default_weights()


def import_destination() -> Path:
    """Where "Import official checkpoint" writes the converted weights (found first by ``default_weights``)."""
    from medsegx_core.weights.default import OFFICIAL_NAME
    from medsegx_core.weights.hub import weights_dir
    return weights_dir() / OFFICIAL_NAME


def _load_model(path: str):
    from medsegx_core.weights.store import load_model
    return load_model(path)


def _make_predictor(model, device: str):
    from medsegx_core.predictor import Predictor
    return Predictor(model, device=device)


@dataclass
class SegmentationTask:
    """A request in flight: the engine job plus what the main thread needs to write its result."""

    job: Job
    volume_node: object
    segmentation_node: Optional[object]
    segment_id: Optional[str]
    segment_name: str
    rename_existing: bool
    ijk_to_world: np.ndarray
    shape_kji: tuple
    prompts: object = None  # medsegx_core.prompts.Prompts as handed to the engine (world RAS / volume voxels)
    warnings: list = field(default_factory=list)

    def cancel(self) -> None:
        self.job.cancel()


@dataclass
class _UndoRecord:
    segmentation_node_id: str
    segment_id: str
    snapshot: object  # vtkSegment copy, or None when the segment was new
    position: int


class MedSegXSlicerLogic(ScriptedLoadableModuleLogic):
    """Promptable segmentation of a volume node into a segment; see the module docstring for the flow."""

    def __init__(self, weightsPath=None, device: str = "auto", worker: Optional[EngineWorker] = None):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._weightsPath = Path(weightsPath).expanduser() if weightsPath else None
        self.device = device
        self.worker = worker or EngineWorker()
        self.sessions = SessionStore(_load_model, _make_predictor)
        self._undo: list = []

    # ---- settings ---------------------------------------------------------------------------------------------
    @property
    def weightsPath(self) -> Path:
        """The weights chosen by the user, else the engine's default (see :func:`default_weights`)."""
        return self._weightsPath or default_weights().path

    @weightsPath.setter
    def weightsPath(self, value) -> None:
        self._weightsPath = Path(value).expanduser() if value else None

    @property
    def device(self) -> str:
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        value = (value or "auto").lower()
        if value not in DEVICES:
            raise InputError(f"device {value!r} is not one of {', '.join(DEVICES)}")
        self._device = value

    def checkWeights(self) -> Path:
        """The weights in use if they exist, else a ``WeightsError`` saying how to get weights."""
        return self.describeWeights()[0]

    def describeWeights(self) -> tuple:
        """``(path, one-line explanation)`` of the weights in use; ``WeightsError`` when there are none."""
        if self._weightsPath is None:
            chosen = default_weights()
            return chosen.path, chosen.explanation
        if not self._weightsPath.exists():
            raise WeightsError(
                f"no MedSegX weights at {self._weightsPath}: click 'Import official checkpoint' to convert "
                f"SegVol's pytorch_model.bin, run 'medsegx weights download segvol', or clear the field to use the "
                f"installed or bundled starter weights")
        return self._weightsPath, f"using the weights in {self._weightsPath}"

    # ---- the whole request (console, batch) -------------------------------------------------------------------
    def segment(self, volumeNode, segmentationNode=None, text: Optional[str] = None, pointsNode=None,
                roiNode=None, segmentId: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, negativePointsNode=None, segmentName: Optional[str] = None,
                modality: Optional[str] = None) -> str:
        """Segment and write the result into ``segmentationNode`` (created if None); returns the segment ID.

        ``pointsNode``: clicks, positive unless the node is marked negative (``mrml_conversion``);
        ``negativePointsNode``: clicks that are negative whatever their node says; ``roiNode``: the box;
        ``segmentId``: an existing segment to refine (replace), else a new segment is added.
        Blocks the calling thread (the engine still runs on the worker thread); raises ``MedSegXError``
        subclasses for user errors and ``Cancelled`` when ``cancel`` is set; then nothing is written.
        """
        task = self.startSegmentation(volumeNode, segmentationNode, text=text, pointsNode=pointsNode,
                                      roiNode=roiNode, segmentId=segmentId, cancel=cancel,
                                      negativePointsNode=negativePointsNode, segmentName=segmentName,
                                      modality=modality)
        task.job.wait(on_progress=progress)
        return self.finishSegmentation(task)

    # ---- the two halves (widget) ------------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, segmentationNode=None, text: Optional[str] = None, pointsNode=None,
                          roiNode=None, segmentId: Optional[str] = None, cancel: Optional[CancelToken] = None,
                          negativePointsNode=None, segmentName: Optional[str] = None,
                          modality: Optional[str] = None) -> SegmentationTask:
        """Check the inputs, convert them, and queue the engine work; returns at once (main thread)."""
        mrml_conversion.check_volume_node(volumeNode)
        if segmentationNode is not None and not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"output '{segmentationNode.GetName()}' is a {segmentationNode.GetClassName()}, "
                             f"not a segmentation: choose or create a segmentation node")
        text = (text or "").strip() or None
        term = _resolve_text(text) if text else None
        install.require_engine()
        weights = self.checkWeights()

        key = mrml_conversion.volume_key(volumeNode)
        current = self.sessions.current
        reuse = current is not None and current.key == key
        volume = current.volume if reuse else mrml_conversion.volume_from_node(volumeNode, modality)
        scene_prompts = mrml_conversion.prompts_from_nodes(
            volume, volumeNode.GetName(), text=term.name if term else None,
            points_nodes=[pointsNode], negative_nodes=[negativePointsNode], roi_node=roiNode)
        scene_prompts.prompts.to_voxel(volume)  # the engine's own checks, now, while the user is looking
        for warning in scene_prompts.warnings:
            logger.warning(warning)

        existing = segmentationNode is not None and segmentId is not None and \
            segmentationNode.GetSegmentation().GetSegment(segmentId) is not None
        name = segmentName or (term.name if term else None)
        if name is None:
            name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName() if existing else \
                _default_segment_name(segmentationNode)
        device, volume_modality = self.device, modality or volume.modality

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            session = self.sessions.session_for(key, volume, str(weights), device, volume_modality,
                                                scaled(progress, 0.0, 0.6), cancel_token)
            return session.segment(scene_prompts.prompts, scaled(progress, 0.6, 1.0), cancel_token)

        job = self.worker.submit(run, cancel, description=f"segment {name!r} in '{volumeNode.GetName()}'")
        return SegmentationTask(job, volumeNode, segmentationNode, segmentId, name,
                                rename_existing=bool(segmentName or term) or not existing,
                                ijk_to_world=volume.ijk_to_ras, shape_kji=volume.array.shape,
                                prompts=scene_prompts.prompts, warnings=scene_prompts.warnings)

    def finishSegmentation(self, task: SegmentationTask) -> str:
        """Write a finished job's mask into its segment (main thread); re-raises the job's error or ``Cancelled``."""
        result = task.job.result()
        mask = np.asarray(result.mask)
        if mask.shape != tuple(task.shape_kji):
            raise GeometryError(f"the engine returned a mask of shape {mask.shape} for volume "
                                f"'{task.volume_node.GetName()}' of shape {tuple(task.shape_kji)}")
        segmentation_node = task.segmentation_node
        created_node = segmentation_node is None
        if created_node:
            scene = task.volume_node.GetScene()
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        f"{task.volume_node.GetName()} MedSegX")
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        existed = task.segment_id is not None and segmentation.GetSegment(task.segment_id) is not None
        record = _UndoRecord(segmentation_node.GetID(), task.segment_id or "",
                             segment_writer.snapshot_segment(segmentation, task.segment_id) if existed else None,
                             segmentation.GetSegmentIndex(task.segment_id) if existed else -1)
        color, terminology = segment_appearance(task.segment_name, segmentation.GetNumberOfSegments())
        try:
            segment_id = segment_writer.write_segment(
                segmentation_node, mask, task.ijk_to_world, segment_id=task.segment_id, name=task.segment_name,
                color=color, terminology=terminology, reference_volume_node=task.volume_node,
                rename_existing=task.rename_existing)
        except BaseException:
            if created_node:
                segmentation_node.GetScene().RemoveNode(segmentation_node)
            raise
        record.segment_id = segment_id
        if not existed:
            record.position = segmentation.GetSegmentIndex(segment_id)
        self._undo = (self._undo + [record])[-UNDO_DEPTH:]
        task.segmentation_node, task.segment_id = segmentation_node, segment_id
        return segment_id

    # ---- undo, import, completion -----------------------------------------------------------------------------
    def canUndo(self) -> bool:
        return bool(self._undo)

    def undoLastSegmentation(self, scene=None) -> bool:
        """Put back the segment the last result replaced (or remove the segment it created)."""
        import slicer

        scene = scene or slicer.mrmlScene
        while self._undo:
            record = self._undo.pop()
            node = scene.GetNodeByID(record.segmentation_node_id)
            if node is None:
                continue  # the node was deleted since: nothing to undo there
            segment_writer.restore_segment(node.GetSegmentation(), record.segment_id, record.snapshot, record.position)
            return True
        return False

    def importCheckpoint(self, checkpointPath, destination=None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> Path:
        """Convert an official checkpoint (SegVol ``pytorch_model.bin`` / ``.pth`` / safetensors, tokenizer files
        beside it) into our weights folder and make it the weights in use. Runs on the worker thread."""
        from medsegx_core.weights.store import save_model

        install.require_engine()
        source = Path(checkpointPath).expanduser()
        destination = Path(destination).expanduser() if destination else import_destination()

        def run(progress_cb: ProgressCallback, cancel_token: CancelToken):
            progress_cb(0.05, f"reading {source.name}")
            model = _load_model(str(source))
            cancel_token.raise_if_cancelled()
            return save_model(model, destination, source={"imported_from": str(source)}, overwrite=True,
                              progress=scaled(progress_cb, 0.5, 1.0), cancel=cancel_token)

        folder = self.worker.submit(run, cancel, description=f"import {source}").wait(on_progress=progress)
        self.weightsPath = folder
        self.sessions.forget()
        return folder

    @staticmethod
    def textCompletions() -> list:
        """Every structure name the hierarchy knows (for the text field's completer), sorted."""
        from medsegx_core.data.hierarchy import iter_terms
        return sorted({node.name for node in iter_terms() if node.level > 0})

    def cleanup(self, timeout_s: float = 5.0) -> None:
        """Stop the worker thread (after the job in progress) and free the model and embeddings."""
        self.worker.shutdown(timeout_s)
        self.sessions.forget()


def _resolve_text(text: str):
    from medsegx_core.data.hierarchy import resolve_term
    return resolve_term(text)


def _default_segment_name(segmentation_node) -> str:
    count = segmentation_node.GetSegmentation().GetNumberOfSegments() if segmentation_node is not None else 0
    return f"MedSegX {count + 1}"

