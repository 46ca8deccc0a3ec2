"""The segmentation session: one request from MRML to a mask in a segment, the engines kept between requests, undo.

Which engine a request runs (the rules are ``ModelChoice``'s):
- slice mode (asked for): MedSegX's 2D model on the box's slice, or propagated (slice_mode.py);
- a box that LiteMedSAM takes: LiteMedSAM slice by slice over the box, or propagated from its middle slice
  (box_mode.py);
- anything else: SegVol on the volume, several structures from one encoding (segvol_mode.py).

``start`` runs on the main thread: it checks the inputs and turns MRML into engine inputs (every user mistake is
raised here, before any work), then queues the engine work on the one worker thread and returns the task.
``finish`` (main thread) writes the masks into segments (result_writer.py) as one undo step. A failure or a cancel
before that leaves the segmentation node untouched; a new segmentation node is only created there.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from medsegx_core.data.modality import check_modality_choice
from medsegx_core.inference.slice_interpolation import check_slice_step
from medsegx_core.errors import Cancelled, InputError
from medsegx_core.progress import CancelToken, ProgressCallback, scaled

from . import box_mode, models, mrml_conversion, preview, result_writer, segvol_mode, structures
from .install import Dependencies
from .model_choice import ModelChoice
from .segmentation_task import PreviewSlot, SegmentationTask, StructureRequest, StructureResult
from .structure_requests import PromptInputs, resolve_terms, structure_requests
from .undo import UndoHistory, UndoStep
from .worker import EngineWorker

logger = logging.getLogger("MedSegX")


class SegmentationSession:
    """Requests in, segments out; keeps each engine's model and volume encoding, and the undo history."""

    def __init__(self, choice: ModelChoice, worker: EngineWorker, dependencies: Dependencies):
        self._choice, self._worker, self._dependencies = choice, worker, dependencies
        #: SegVol's model and the current volume's embeddings (segvol_mode.py)
        self.segvol_sessions = segvol_mode.new_session_store()
        #: LiteMedSAM's predictor and per-slice embeddings for box requests (box_mode.py)
        self.litemedsam_sessions = box_mode.new_session_store()
        self._slice_mode = None
        self.undo_history = UndoHistory()
        #: The status line of the last result written (which model ran, on what, how long)
        self.last_status = ""
        #: LiteMedSAM's fast mode: decode every n-th slice and interpolate between (1: every slice)
        self.slice_step = 1
        #: The encode-ahead job of the box being placed (encode_ahead), cancelled by the next request
        self._ahead = None

    def load_model(self, sessions, spec, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> None:
        """Load the model of ``sessions`` (``segvol_sessions`` or ``litemedsam_sessions``) as ``spec`` says on the
        engine thread now, waiting for it (a pack that does not fit the weights is refused here, not at the next
        click)."""
        device = self._choice.device
        self._worker.submit(lambda progress_cb, _cancel: sessions.model_for(spec, device, progress_cb), cancel,
                            description=f"load {spec}").wait(on_progress=progress)

    def forget(self) -> None:
        """Drop the loaded models and the volume's encodings (scene closed, other weights chosen)."""
        self.segvol_sessions.forget()
        self.litemedsam_sessions.forget()

    # ---- encode ahead (main thread) ----------------------------------------------------------------------------
    def encode_ahead(self, volume_node, roi_node, modality: Optional[str] = None, propagate: bool = False,
                     cancel: Optional[CancelToken] = None):
        """Queue the encoding of the slices a box will need while the user is still placing it (LiteMedSAM's
        embeddings: the segmentation that follows runs only the decoder where this got to). Returns the job, or
        None when the box would not run LiteMedSAM. A newer call, or any request, cancels the previous one."""
        self.cancel_encode_ahead()
        if roi_node is None or volume_node is None or self._choice.box_weights() is None:
            return None
        mrml_conversion.check_volume_node(volume_node)
        check_modality_choice(modality)
        key = (mrml_conversion.volume_key(volume_node), modality)
        volume = _session_volume(self.litemedsam_sessions.current, key, volume_node, modality)
        prompts = mrml_conversion.prompts_from_nodes(volume, volume_node.GetName(), roi_node=roi_node).prompts
        if propagate:
            prompts = box_mode.on_middle_slice(prompts, volume, roi_node)
        sessions, device = self.litemedsam_sessions, self._choice.device
        spec = self._choice.box_spec(self._choice.box_weights())

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            return box_mode.encode_ahead(sessions, key, volume, spec, device, modality, prompts, propagate,
                                         progress, cancel_token)

        self._ahead = self._worker.submit(run, cancel, description=f"{box_mode.MODEL_NAME}: encoding the slices of "
                                                                   f"'{roi_node.GetName()}' ahead")
        return self._ahead

    def cancel_encode_ahead(self) -> None:
        """Stop the encode-ahead job at its next slice (what it encoded stays cached), so that a request does not
        wait behind it."""
        if self._ahead is not None and not self._ahead.finished:
            self._ahead.cancel()
        self._ahead = None

    # ---- start (main thread) ----------------------------------------------------------------------------------
    def start(self, volume_node, segmentation_node, inputs: PromptInputs, modality: Optional[str] = None,
              propagate: bool = False, slice_mode: bool = False, cancel: Optional[CancelToken] = None):
        """Check, convert, queue; returns a ``SegmentationTask`` (a ``slice_mode.SliceTask`` in slice mode)."""
        self.cancel_encode_ahead()
        if slice_mode:
            return self.slice_mode().start(self._worker, volume_node, inputs.roi_node, segmentation_node,
                                           text=inputs.text, modality=modality, propagate=propagate,
                                           segmentName=inputs.segment_name, cancel=cancel)
        mrml_conversion.check_volume_node(volume_node)
        check_modality_choice(modality)   # a typed modality is checked strictly, before anything is queued
        if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"output '{segmentation_node.GetName()}' is a {segmentation_node.GetClassName()}, "
                             f"not a segmentation: choose or create a segmentation node")
        terms = resolve_terms(inputs)
        self._dependencies.require()
        has_box = inputs.roi_node is not None
        if has_box and self._choice.boxes_default_to_litemedsam() and models.litemedsam_weights() is None:
            self._dependencies.offer_litemedsam()   # the widget: offered once; declined, boxes run SegVol
        # a box, or a text the engine's text localiser finds (it gives LiteMedSAM a box per slice)
        box_weights = self._choice.box_weights() if has_box else self._choice.text_weights([t.name for t in terms])
        if box_weights is None:
            if not has_box:
                self._choice.refuse_litemedsam_without_box()
            weights = self._choice.check_weights()
            current = self.segvol_sessions.current
        else:
            current = self.litemedsam_sessions.current
        key = (mrml_conversion.volume_key(volume_node), modality)   # another modality routes the experts anew
        volume = _session_volume(current, key, volume_node, modality)
        requests, warnings = structure_requests(inputs, terms, volume, volume_node, segmentation_node)
        if box_weights is not None:
            return self._start_litemedsam(volume_node, segmentation_node, requests, inputs.roi_node, volume, key,
                                          box_weights, modality, propagate, cancel, warnings)
        return self._start_segvol(volume_node, segmentation_node, requests, has_box, volume, key, weights,
                                  modality, propagate, cancel, warnings)

    def _start_segvol(self, volume_node, segmentation_node, requests, has_box: bool, volume, key, weights,
                      modality, propagate: bool, cancel, warnings: list) -> SegmentationTask:
        """Queue SegVol on every structure (segvol_mode.py): one encoding of the volume for all."""
        label, notes = self._choice.label(), []
        if has_box and self._choice.boxes_default_to_litemedsam():
            notes.append(f"{box_mode.MODEL_NAME} is not installed, so the box runs {label}: "
                         f"{models.litemedsam_install_hint()}")
        if has_box and propagate:
            notes.append(f"Propagate follows a box with {box_mode.MODEL_NAME} or in slice mode; {label} segments "
                         f"the whole box at once")
        if self.slice_step != 1:
            notes.append(f"the fast mode (every {self.slice_step} slices) is {box_mode.MODEL_NAME}'s; {label} "
                         f"segments the whole volume at once")
        for note in notes:
            logger.warning(note)
        warnings += notes
        spec, device, finished = self._choice.segvol_spec(weights), self._choice.device, []
        sessions = self.segvol_sessions

        # Only the user's choice goes on as ``modality`` (checked strictly); the file's own (volume.modality) is
        # read leniently by the engine's one rule (data.modality.routing_modality): a DICOM PT is not an error.
        def run(progress: ProgressCallback, cancel_token: CancelToken):
            return segvol_mode.segment_structures(sessions, key, volume, spec, device, modality, requests,
                                                  finished, progress, cancel_token)

        names = structures.describe([r.name for r in requests], limit=3)
        job = self._worker.submit(run, cancel, description=f"segment {names} in '{volume_node.GetName()}'")
        return SegmentationTask(job, volume_node, segmentation_node, requests, ijk_to_world=volume.ijk_to_ras,
                                shape_kji=volume.array.shape, model_label=label, warnings=warnings,
                                finished=finished)

    def _start_litemedsam(self, volume_node, segmentation_node, requests: list, roi_node, volume,
                          key: tuple, weights, modality: Optional[str], propagate: bool, cancel,
                          warnings: list) -> SegmentationTask:
        """Queue LiteMedSAM (box_mode.py) on the box (one structure, one segment) or on each text the text
        localiser finds (one segment each; a structure not found is written empty and said in the status)."""
        if roi_node is not None and propagate:
            request = requests[0]
            prompts = box_mode.on_middle_slice(request.prompts, volume, roi_node)
            requests = [StructureRequest(request.name, prompts, request.segment_id, request.rename_existing)]
        sessions, device, finished = self.litemedsam_sessions, self._choice.device, []
        slice_step = check_slice_step(self.slice_step)
        spec, label = self._choice.box_spec(weights), self._choice.box_model_label()
        slot = PreviewSlot()

        def run(progress: ProgressCallback, cancel_token: CancelToken):
            share = 1.0 / len(requests)
            for index, request in enumerate(requests):
                started = time.monotonic()
                result = box_mode.segment(sessions, key, volume, spec, device, modality, request.prompts,
                                          propagate, scaled(progress, index * share, (index + 1) * share),
                                          cancel_token, slice_step=slice_step,
                                          preview=lambda mask, _decoded, at=index: slot.put(at, mask))
                cancel_token.raise_if_cancelled()
                finished.append(StructureResult(request, result, time.monotonic() - started))
            return finished

        names = structures.describe([r.name for r in requests], limit=3)
        what = "find and segment" if roi_node is None else "propagate" if propagate else "segment the box"
        job = self._worker.submit(run, cancel, description=f"{box_mode.MODEL_NAME}: {what} {names} in "
                                                           f"'{volume_node.GetName()}'")
        return SegmentationTask(job, volume_node, segmentation_node, requests, ijk_to_world=volume.ijk_to_ras,
                                shape_kji=volume.array.shape, model_label=label, warnings=warnings,
                                finished=finished, preview=slot)

    def slice_mode(self):
        """MedSegX's 2D model (slice_mode.SliceModeLogic), rebuilt when the weights or the device change."""
        from .slice_mode import SliceModeLogic

        weights = self._choice.medsegx2d_weights()
        if self._slice_mode is None or self._slice_mode.weightsPath != weights \
                or self._slice_mode.device != self._choice.device:
            self._slice_mode = SliceModeLogic(weights, self._choice.device)
        return self._slice_mode

    # ---- finish (main thread) ---------------------------------------------------------------------------------
    def finish(self, task):
        """Write a finished task's masks (one undo step); returns the segment ID (a list for several structures).
        Re-raises the job's error; ``Cancelled`` after writing the structures that had finished, if any."""
        if not isinstance(task, SegmentationTask):     # slice mode
            segment_id = self._slice_mode.finish(task)
            index = task.segmentation_node.GetSegmentation().GetSegmentIndex(segment_id)
            self.undo_history.push(UndoStep(task.segmentation_node.GetID(), [[segment_id, None, index]]))
            self.last_status = task.status
            return segment_id
        try:
            step, cancelled = result_writer.write_results(task)
        finally:
            self.last_status = task.status or self.last_status
            preview.clear(task.volume_node.GetScene())
        self.undo_history.push(step)
        if cancelled:   # the structures that had finished are written: one undo step removes them too
            raise Cancelled(task.status[0].lower() + task.status[1:])
        return task.segment_ids[0] if len(task.requests) == 1 else list(task.segment_ids)

    def undo(self, scene) -> bool:
        return self.undo_history.undo(scene)


def _session_volume(current, key: tuple, volume_node, modality: Optional[str]):
    """The engine volume of ``volume_node``: the current session's when it holds this node (no second read of a
    large array), else read from the node."""
    if current is not None and current.key == key:
        return current.volume
    return mrml_conversion.volume_from_node(volume_node, modality)
