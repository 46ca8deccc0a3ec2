"""A finished segmentation task's masks written into segments (main thread), as one undo step.

Every structure that finished is written, in request order: a new segment (named and coloured from the anatomy
terminology) or the refined one replaced. If writing fails half-way, what was written is put back and a
segmentation node created for this task is removed, so a failure changes nothing. The task then carries the
segment IDs, the latency and the status line ("Done: 'liver' from LiteMedSAM on cpu fp32 in 1.2 s.").
"""
from __future__ import annotations

import time
from typing import Tuple

import numpy as np

from medsegx_core.errors import Cancelled, GeometryError

from . import box_mode, segment_writer, structures
from .appearance import segment_appearance
from .segmentation_task import SegmentationTask, StructureResult
from .undo import UndoStep


def write_results(task: SegmentationTask) -> Tuple[UndoStep, bool]:
    """``(undo step, cancelled)``: cancelled is True when a cancel came after some structures had finished (they
    are written). Re-raises the job's error, and ``Cancelled`` when nothing had finished."""
    cancelled = False
    try:
        task.job.result()
    except Cancelled:
        if not task.finished:
            task.status = "Cancelled: the segmentation was not changed."
            raise
        cancelled = True
    done = list(task.finished)
    for item in done:
        shape = np.asarray(item.result.mask).shape
        if shape != tuple(task.shape_kji):
            raise GeometryError(f"the engine returned a mask of shape {shape} for volume "
                                f"'{task.volume_node.GetName()}' of shape {tuple(task.shape_kji)}")
    segmentation_node = task.segmentation_node
    created_node = segmentation_node is None
    if created_node:
        segmentation_node = task.volume_node.GetScene().AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{task.volume_node.GetName()} MedSegX")
        segmentation_node.CreateDefaultDisplayNodes()
    step = UndoStep(segmentation_node.GetID())
    try:
        for item in done:
            step.entries.append(_write_structure(segmentation_node, task, item))
    except BaseException:
        step.restore(segmentation_node.GetSegmentation())
        if created_node:
            segmentation_node.GetScene().RemoveNode(segmentation_node)
        raise
    task.segmentation_node = segmentation_node
    task.segment_ids = [entry[0] for entry in step.entries]
    task.latency_s = time.monotonic() - task.started
    task.status = _status(task, done, cancelled)
    return step, cancelled


def _write_structure(segmentation_node, task: SegmentationTask, item: StructureResult) -> list:
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


def _status(task: SegmentationTask, done: list, cancelled: bool) -> str:
    kept = [item.request.name for item in done]
    runtime = done[-1].result.runtime if done else ""
    origin = f"from {task.model_label}" + (f" on {runtime}" if runtime else "")
    if cancelled:
        rest = [r.name for r in task.requests[len(done):]]
        return (f"Cancelled after {len(done)} of {len(task.requests)} structures: kept "
                f"{structures.describe(kept)} ({origin}); {structures.describe(rest)} not segmented.")
    status = f"Done: {structures.describe(kept, limit=4)} {origin} in {task.latency_s:.1f} s."
    if task.model_label == box_mode.MODEL_NAME:   # e.g. "nothing found in the box on slice 12"
        notes = [note for item in done for note in getattr(item.result, "notes", [])]
        status += "".join(f" Note: {note}." for note in notes)
    return status
