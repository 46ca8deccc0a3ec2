"""MedSegXSlicerLogic: the one object the widget, the Python console and the batch script talk to. No Qt.

Console::

    import MedSegXSlicerLib
    logic = MedSegXSlicerLib.MedSegXSlicerLogic(weightsPath="/path/to/weights")
    segmentId = logic.segment(getNode("CT"), getNode("Segmentation"), text="liver",
                              pointsNode=getNode("MedSegX positive points"), roiNode=getNode("R"))
    logic.lastStatus            # "Done: 'liver' from LiteMedSAM on cpu fp32, ..." (which model ran)

Every method is one user action and hands it to the job that does it, each a small Qt-free class of its own:
- ``ModelChoice`` (model_choice.py): the weights, expert pack and device in use, and which model a request runs
  (a box: LiteMedSAM unless other weights are chosen; text and clicks: SegVol; slice mode: MedSegX 2D);
- ``SegmentationSession`` (segmentation.py): a request from MRML to segments, the engines kept between requests
  (a refining click re-uses the volume's encoding), one undo step per request;
- ``ModelDownloads`` (model_downloads.py): the official weights' download, checkpoint import;
- ``ExpertTraining`` (expert_training.py): "Learn from my segments".
Slow work runs on one engine thread (worker.py); the widget polls a task's ``job.progress`` and calls the
``finish...`` half, the console and batch paths use the whole call (``segment``, ``downloadWeights``, ...), which
waits. User mistakes are ``MedSegXError`` subclasses raised before any work starts; a failure or a cancel leaves
the scene as it was (a list of structures keeps those finished before the cancel, and says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from medsegx_core.errors import Cancelled, WeightsError
from medsegx_core.inference.slice_interpolation import check_slice_step
from medsegx_core.progress import CancelToken, ProgressCallback

from . import box_mode, models, prompt_nodes, structures
from .expert_training import ExpertTraining
from .install import Dependencies
from .model_choice import ModelChoice
from .model_downloads import ModelDownloads, import_destination
from .segmentation import SegmentationSession
from .structure_requests import PromptInputs
from .worker import BackgroundTask, EngineWorker

try:  # Slicer's base class (imports Qt): inside Slicer only. slicer-core / plain Python get a Qt-free stand-in.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # pragma: no cover - depends on the environment
    ScriptedLoadableModuleLogic = object


class MedSegXSlicerLogic(ScriptedLoadableModuleLogic):
    """Promptable segmentation of a volume node into segments, and the models it runs; see the module docstring."""

    def __init__(self, weightsPath=None, device: str = "auto", worker: Optional[EngineWorker] = None,
                 expertPack=None):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self.worker = worker or EngineWorker()
        self.dependencies = Dependencies()
        self.choice = ModelChoice(weightsPath, device, expertPack)
        self.segmentation = SegmentationSession(self.choice, self.worker, self.dependencies)
        self.downloads = ModelDownloads(self.worker, self.dependencies)
        self.training = ExpertTraining(self.choice, self.worker, self.dependencies)

    # ---- settings (console, batch) ----------------------------------------------------------------------------
    weightsPath = property(lambda self: self.choice.weights_path,
                           lambda self, value: setattr(self.choice, "weights_path", value),
                           doc="The weights chosen by the user, else the engine's default.")
    device = property(lambda self: self.choice.device, lambda self, value: setattr(self.choice, "device", value),
                      doc="auto, cuda or cpu.")
    expertPack = property(lambda self: self.choice.expert_pack,
                          lambda self, value: setattr(self.choice, "expert_pack", value),
                          doc="None: the weights' own experts; 'none': no experts; else a pack file (checked).")
    useLiteMedSAMForBoxes = property(lambda self: self.choice.use_litemedsam_for_boxes,
                                     lambda self, value: setattr(self.choice, "use_litemedsam_for_boxes", value),
                                     doc="False: boxes use the weights in use, as the other prompts do.")
    sliceStep = property(lambda self: self.segmentation.slice_step,
                         lambda self, value: setattr(self.segmentation, "slice_step", check_slice_step(value)),
                         doc="LiteMedSAM's fast mode: 1 (every slice), or n: decode every n-th slice and "
                             "interpolate the slices between (FAST_MODE_SLICE_STEP is the widget's).")
    installMissingPackages = property(lambda self: self.dependencies.install_missing,
                                      lambda self, value: setattr(self.dependencies, "install_missing", value),
                                      doc="True (the widget): missing packages are installed after the user "
                                          "agrees; else an error names them.")
    sessions = property(lambda self: self.segmentation.segvol_sessions,
                        lambda self, value: setattr(self.segmentation, "segvol_sessions", value),
                        doc="SegVol's model and volume encoding (segvol_mode.py); the batch script sets its own.")
    boxSessions = property(lambda self: self.segmentation.litemedsam_sessions,
                           lambda self, value: setattr(self.segmentation, "litemedsam_sessions", value),
                           doc="LiteMedSAM's predictor and slice embeddings (box_mode.py).")
    lastStatus = property(lambda self: self.segmentation.last_status,
                          doc="The status line of the last result written (which model ran, on what, how long).")

    def checkWeights(self) -> Path:
        return self.choice.check_weights()

    def describeWeights(self) -> tuple:
        """``(path, one-line explanation)`` of the weights in use; ``WeightsError`` when there are none."""
        return self.choice.describe_weights()

    def modelLabel(self) -> str:
        return self.choice.label()

    def boxWeights(self) -> Optional[Path]:
        """The LiteMedSAM weights a box runs, or None when boxes go to the weights in use."""
        return self.choice.box_weights()

    def describeBoxModel(self) -> str:
        return self.choice.describe_box_model()

    # ---- segmentation -----------------------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, segmentationNode=None, text=None, pointsNode=None, roiNode=None,
                          segmentId: Optional[str] = None, cancel: Optional[CancelToken] = None,
                          negativePointsNode=None, segmentName: Optional[str] = None,
                          modality: Optional[str] = None, sliceMode: bool = False, propagate: bool = False):
        """Check the inputs, convert them, queue the engine work; returns the task at once (main thread).

        ``text``: a structure, a list ("liver, spleen"), or a preset ("abdominal organs"), one new segment each;
        ``pointsNode``: clicks, positive unless the node is marked negative; ``negativePointsNode``: negative
        clicks; ``roiNode``: the box (LiteMedSAM unless other weights are chosen: the axial slices it spans, or
        with ``propagate`` from its middle slice until the structure ends); ``segmentId``: the segment to refine;
        ``sliceMode``: MedSegX's 2D model on the box's slice (``propagate``: and its neighbours)."""
        inputs = PromptInputs(text, pointsNode, negativePointsNode, roiNode, segmentId, segmentName)
        return self.segmentation.start(volumeNode, segmentationNode, inputs, modality, propagate, sliceMode, cancel)

    def encodeAhead(self, volumeNode, roiNode, modality: Optional[str] = None, propagate: bool = False):
        """Start encoding the slices the ROI will need (LiteMedSAM) while the user is still placing it; returns the
        background job, or None when the box would not run LiteMedSAM. The next request cancels it and re-uses
        what it encoded (main thread; the widget calls it when the ROI moves)."""
        return self.segmentation.encode_ahead(volumeNode, roiNode, modality, propagate)

    def showPreview(self, task) -> bool:
        """Show the mask so far of a running LiteMedSAM request (from its start slice on) in a scratch node, never
        in the output segmentation, which changes only when the request finishes (main thread; the widget's poll
        timer calls it; ``preview.py``). Returns whether the display changed."""
        from . import preview

        return preview.show(task)

    def finishSegmentation(self, task):
        """Write a finished task's masks (main thread); returns the segment ID (a list for several structures).
        Re-raises the job's error; ``Cancelled`` after writing the structures that had finished, if any."""
        return self.segmentation.finish(task)

    def segment(self, volumeNode, segmentationNode=None, text=None, pointsNode=None, roiNode=None,
                segmentId: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, negativePointsNode=None, segmentName: Optional[str] = None,
                modality: Optional[str] = None, propagate: bool = False):
        """Console and batch: :meth:`startSegmentation`, wait (progress in this thread), :meth:`finishSegmentation`.
        ``segmentationNode`` None: a new one is created with the first result."""
        task = self.startSegmentation(volumeNode, segmentationNode, text=text, pointsNode=pointsNode,
                                      roiNode=roiNode, segmentId=segmentId, cancel=cancel,
                                      negativePointsNode=negativePointsNode, segmentName=segmentName,
                                      modality=modality, propagate=propagate)
        try:
            task.job.wait(on_progress=progress)
        except Cancelled:
            pass  # finishSegmentation keeps what finished and re-raises
        return self.finishSegmentation(task)

    def segmentSlice(self, volumeNode, roiNode, segmentationNode=None, text=None, propagate: bool = False,
                     sliceIndex: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, **kwargs) -> str:
        """Console: MedSegX slice mode on the ROI's slice (``sliceIndex`` another; ``propagate``: its neighbours
        too), the chosen weights when they are MedSegX's 2D model, else the installed one."""
        task = self.segmentation.slice_mode().start(self.worker, volumeNode, roiNode, segmentationNode, text=text,
                                                    propagate=propagate, sliceIndex=sliceIndex, cancel=cancel,
                                                    **kwargs)
        task.job.wait(on_progress=progress)
        return self.finishSegmentation(task)

    def canUndo(self) -> bool:
        return self.segmentation.undo_history.can_undo()

    def undoLastSegmentation(self, scene=None) -> bool:
        """Put back what the last result replaced (every structure of a list; new segments are removed)."""
        import slicer
        return self.segmentation.undo(scene or slicer.mrmlScene)

    def resetSession(self) -> None:
        """Forget the loaded models and the volume's encodings (scene closed, other weights chosen)."""
        self.segmentation.forget()

    # ---- prompts ----------------------------------------------------------------------------------------------
    @staticmethod
    def createPointsNode(name: str, negative: bool = False, color=None, scene=None):
        """A point list for include (or exclude) clicks, marked so that the Logic reads it that way."""
        import slicer
        return prompt_nodes.create_points_node(scene or slicer.mrmlScene, name, negative, color)

    @staticmethod
    def startPlacingBox(roiNode=None, name: str = "MedSegX box", scene=None):
        """Enter place mode for the box (a new ROI node unless ``roiNode``); returns the ROI node."""
        import slicer
        return prompt_nodes.start_placing_box(scene or slicer.mrmlScene, slicer.modules.markups.logic(), roiNode,
                                              name)

    @staticmethod
    def clearPrompts(*pointsNodes) -> int:
        """Remove every click of these point lists (None skipped); returns how many were removed."""
        return prompt_nodes.clear_points(*pointsNodes)

    @staticmethod
    def structurePresets() -> dict:
        """Preset name -> its structures, for the text field's menu."""
        return {name: list(names) for name, names in structures.PRESET_STRUCTURES.items()}

    @staticmethod
    def textCompletions() -> list:
        """Every structure name the hierarchy knows (for the text field's completer), sorted."""
        from medsegx_core.data.hierarchy import iter_terms
        return sorted({node.name for node in iter_terms() if node.level > 0})

    # ---- models panel -----------------------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list:
        """Every model and expert pack the panel lists (``models.ModelEntry``: source, size, licence, devices)."""
        return models.available_models()

    @staticmethod
    def downloadOffer(name: str = "segvol") -> str:
        """What the user is told (licence, size, destination) before the official weights are downloaded."""
        return models.download_offer(name)

    @staticmethod
    def offlineInstructions(name: str = "segvol") -> str:
        return models.offline_instructions(name)

    def selectWeights(self, path=None) -> tuple:
        """Use these weights (None: the engine's default); returns ``describeWeights()``."""
        self.choice.weights_path = path
        self.resetSession()
        return self.describeWeights()

    def selectExpertPack(self, pack=None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> str:
        """Use this expert pack (None: the weights' own, "none": no experts, else a pack file) after loading the
        model with it on the engine thread: a pack trained on other base weights or another hierarchy is refused
        (``WeightsError``) and the previous choice stays. Returns the model label."""
        pack = self.choice.checked_expert_pack(pack)
        self.dependencies.require()
        if self.choice.pack_base_model(pack) == box_mode.MODEL_NAME:   # boxes and known texts run it
            sessions = self.segmentation.litemedsam_sessions
            spec = self.choice.box_spec(self.choice.litemedsam_base(), pack)
        else:
            sessions = self.segmentation.segvol_sessions
            spec = self.choice.segvol_spec(self.choice.check_weights(), pack)
        self.segmentation.load_model(sessions, spec, progress, cancel)
        self.choice.expert_pack = pack
        return self.modelLabel()

    def saveChoice(self, settings) -> None:
        """Remember weights, expert pack and device in Slicer's settings (``slicer.app.settings()``)."""
        self.choice.save(settings)

    def restoreChoice(self, settings) -> tuple:
        """Apply the remembered choice (what no longer exists on disk is dropped); returns ``describeWeights()``."""
        self.choice.restore(settings)
        self.resetSession()
        return self.describeWeights()

    def startDownload(self, name: str = "segvol", cancel: Optional[CancelToken] = None) -> BackgroundTask:
        """Download and convert the published weights ``name`` on the engine thread (progress, Cancel)."""
        return self.downloads.start_download(name, cancel)

    def finishDownload(self, task: BackgroundTask) -> Path:
        """Select the downloaded weights (main thread); re-raises the download's error (with what to do
        without the download) or ``Cancelled``."""
        try:
            folder = task.job.result()
        except WeightsError as exc:   # unreachable, refused or failed: how to install without the download
            raise WeightsError(f"{exc}\n\n{self.offlineInstructions()}") from exc
        self.selectWeights(None if folder == import_destination() else folder)
        return folder

    def downloadWeights(self, name: str = "segvol", progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelToken] = None) -> Path:
        """Console: :meth:`startDownload` + wait + :meth:`finishDownload`."""
        task = self.startDownload(name, cancel)
        try:
            task.job.wait(on_progress=progress)
        except Cancelled:
            pass
        return self.finishDownload(task)

    def importCheckpoint(self, checkpointPath, destination=None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> Path:
        """Convert an official checkpoint (SegVol ``pytorch_model.bin`` / ``.pth`` / safetensors, tokenizer files
        beside it) into our weights folder and make it the weights in use."""
        folder = self.downloads.import_checkpoint(checkpointPath, destination, progress, cancel)
        self.selectWeights(folder)
        return folder

    # ---- expert packs from the user's segments ----------------------------------------------------------------
    def unresolvedSegmentNames(self, segmentationNodes, mapping: Optional[Mapping[str, str]] = None) -> dict:
        """Segment name -> suggestions for names the anatomy hierarchy does not know (ask the user for these)."""
        return self.training.unresolved_segment_names(segmentationNodes, mapping)

    def startTrainingExperts(self, volumeNodes, segmentationNodes, packName: str = "my experts",
                             mapping: Optional[Mapping[str, str]] = None, steps: Optional[int] = None,
                             cancel: Optional[CancelToken] = None, **settings) -> BackgroundTask:
        """Fine-tune ConMoAE experts on the segments of ``segmentationNodes`` (one per volume) on top of the
        model boxes run (LiteMedSAM by default, else SegVol: ``expert_training.py``); the pack goes to
        ``$MEDSEGX_HOME/experts/<packName>.safetensors``. ``mapping``: segment name -> hierarchy name (or
        "NAME@PARENT"); ``steps``: None for the recipe's; ``settings``: more ``FinetuneSettings`` fields. Every
        segment trains; ``val_fraction`` > 0 holds out that share of the structures, and progress messages then
        carry the validation Dice."""
        return self.training.start(volumeNodes, segmentationNodes, packName, mapping, steps, cancel, **settings)

    def finishTrainingExperts(self, task: BackgroundTask, select: bool = True):
        """The training outcome (``experts.TrainingOutcome``: pack, structures, Dice); selects the new pack."""
        outcome = task.job.result()
        if select:
            self.choice.expert_pack = outcome.pack
            self.segmentation.forget()
        return outcome

    def trainExperts(self, volumeNodes, segmentationNodes, packName: str = "my experts",
                     mapping: Optional[Mapping[str, str]] = None, steps: Optional[int] = None,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     select: bool = True, **settings):
        """Console: :meth:`startTrainingExperts` + wait + :meth:`finishTrainingExperts`."""
        task = self.startTrainingExperts(volumeNodes, segmentationNodes, packName, mapping, steps, cancel,
                                         **settings)
        task.job.wait(on_progress=progress)
        return self.finishTrainingExperts(task, select)

    def cleanup(self, timeout_s: float = 5.0) -> None:
        """Stop the worker thread (after the job in progress) and free the models and embeddings."""
        self.worker.shutdown(timeout_s)
        self.resetSession()
