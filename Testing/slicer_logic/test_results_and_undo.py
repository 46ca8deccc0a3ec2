"""Writing a finished task's masks and undoing them, on a real MRML scene (slicer-core) without a model: the
engine's own result type (``SegmentationResult``) carries known masks from a job on the real worker thread, so
what lands in the segments, the status line, the roll-back and the undo history are checked exactly."""
from __future__ import annotations

import numpy as np
import pytest
import slicer

import scene_builders as sb
from MedSegXSlicerLib import mrml_conversion, result_writer, segment_writer
from MedSegXSlicerLib.segmentation_task import SegmentationTask, StructureRequest, StructureResult
from MedSegXSlicerLib.undo import UndoHistory, UndoStep
from MedSegXSlicerLib.worker import EngineWorker
from medsegx_core.errors import Cancelled, GeometryError
from medsegx_core.predictor import SegmentationResult
from medsegx_core.progress import CancelToken

SHAPE = (6, 8, 10)   # k, j, i


@pytest.fixture
def volume(slicer_app):
    ijk_to_ras = sb.affine(np.diag([-1.5, -1.5, 2.5]), (20.0, -10.0, 5.0))
    return slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.int16), ijk_to_ras, "scan")


@pytest.fixture
def worker():
    worker = EngineWorker()
    yield worker
    worker.shutdown()


def box_mask(k: slice, j: slice, i: slice, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[k, j, i] = 1
    return mask


def finished_task(worker, volume, segmentation_node, named_masks, cancel_after=None, segment_id=None):
    """A task whose job ran on the worker thread and finished ``named_masks`` in order; ``cancel_after``: the
    number of structures done when Cancel came (the job then ends cancelled)."""
    requests = [StructureRequest(name, prompts=None, segment_id=segment_id) for name, _mask in named_masks]
    finished, token = [], CancelToken()

    def run(progress, cancel):
        for count, (request, (name, mask)) in enumerate(zip(requests, named_masks)):
            if cancel_after is not None and count == cancel_after:
                token.cancel()
                cancel.raise_if_cancelled()
            finished.append(StructureResult(request, SegmentationResult(mask, name, runtime="cpu fp32"), 0.1))
        return finished

    job = worker.submit(run, token, description="known masks")
    if cancel_after is None:
        job.wait()
    else:
        with pytest.raises(Cancelled):
            job.wait()
    return SegmentationTask(job, volume, segmentation_node, requests, mrml_conversion.world_ijk_to_ras(volume),
                            SHAPE, model_label="SegVol", finished=finished)


def masks_of(segmentation_node, volume) -> dict:
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetSegment(segment_id).GetName(): segment_writer.read_segment_mask(
        segmentation_node, segment_id, mrml_conversion.world_ijk_to_ras(volume), SHAPE)
        for segment_id in segmentation.GetSegmentIDs()}


def test_results_go_into_a_new_segmentation_and_one_undo_step_removes_them(volume, worker):
    liver, spleen = box_mask(slice(1, 4), slice(2, 6), slice(1, 5)), box_mask(slice(2, 5), slice(1, 3), slice(6, 9))
    task = finished_task(worker, volume, None, [("liver", liver), ("spleen", spleen)])
    step, cancelled = result_writer.write_results(task)

    assert not cancelled and task.segmentation_node.GetName() == "scan MedSegX"
    written = masks_of(task.segmentation_node, volume)
    assert list(written) == ["liver", "spleen"]
    np.testing.assert_array_equal(written["liver"], liver)
    np.testing.assert_array_equal(written["spleen"], spleen)
    assert task.status.startswith("Done: 'liver' and 'spleen' from SegVol on cpu fp32 in ")
    assert [entry[0] for entry in step.entries] == task.segment_ids

    history = UndoHistory()
    history.push(step)
    assert history.undo(volume.GetScene()) and not history.can_undo()
    assert task.segmentation_node.GetSegmentation().GetNumberOfSegments() == 0


def test_refining_replaces_the_segment_and_undo_puts_the_old_one_back_in_its_place(volume, worker):
    node = volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    world = mrml_conversion.world_ijk_to_ras(volume)
    old = box_mask(slice(0, 2), slice(0, 2), slice(0, 2))
    first = segment_writer.write_segment(node, old, world, segment_id=None, name="tumour", color=(1, 0, 0),
                                         reference_volume_node=volume)
    segment_writer.write_segment(node, old, world, segment_id=None, name="after", color=(0, 1, 0),
                                 reference_volume_node=volume)
    new = box_mask(slice(2, 6), slice(3, 7), slice(4, 9))
    task = finished_task(worker, volume, node, [("tumour", new)], segment_id=first)
    step, _cancelled = result_writer.write_results(task)
    np.testing.assert_array_equal(masks_of(node, volume)["tumour"], new)

    history = UndoHistory()
    history.push(step)
    assert history.undo(volume.GetScene())
    np.testing.assert_array_equal(masks_of(node, volume)["tumour"], old)
    assert list(node.GetSegmentation().GetSegmentIDs())[0] == first     # back in its place, before "after"


def test_a_cancel_keeps_the_structures_finished_before_it_and_says_which(volume, worker):
    masks = [(name, box_mask(slice(n, n + 2), slice(1, 4), slice(1, 4))) for n, name in enumerate(
        ("liver", "spleen", "pancreas"))]
    task = finished_task(worker, volume, None, masks, cancel_after=1)
    step, cancelled = result_writer.write_results(task)
    assert cancelled and list(masks_of(task.segmentation_node, volume)) == ["liver"]
    assert task.status == ("Cancelled after 1 of 3 structures: kept 'liver' (from SegVol on cpu fp32); 'spleen' "
                           "and 'pancreas' not segmented.")
    assert len(step.entries) == 1

    nothing = finished_task(worker, volume, None, masks, cancel_after=0)
    scene_nodes = volume.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(Cancelled):
        result_writer.write_results(nothing)
    assert nothing.status == "Cancelled: the segmentation was not changed."
    assert volume.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == scene_nodes


def test_a_mask_on_another_grid_is_refused_before_any_node_is_made(volume, worker):
    task = finished_task(worker, volume, None, [("liver", np.ones((6, 8, 9), np.uint8))])
    with pytest.raises(GeometryError, match=r"mask of shape \(6, 8, 9\) for volume 'scan' of shape \(6, 8, 10\)"):
        result_writer.write_results(task)
    assert volume.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_undo_history_keeps_the_newest_steps_and_skips_deleted_nodes(volume):
    scene, world = volume.GetScene(), mrml_conversion.world_ijk_to_ras(volume)
    kept, deleted = (scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name) for name in ("kept", "deleted"))
    history = UndoHistory(depth=2)
    for node, name in ((kept, "oldest"), (kept, "middle"), (deleted, "newest")):
        segment_id = segment_writer.write_segment(node, box_mask(slice(0, 3), slice(0, 3), slice(0, 3)), world,
                                                  segment_id=None, name=name, color=(0, 0, 1),
                                                  reference_volume_node=volume)
        history.push(UndoStep(node.GetID(), [[segment_id, None, node.GetSegmentation().GetNumberOfSegments() - 1]]))
    scene.RemoveNode(deleted)

    segmentation = kept.GetSegmentation()
    names = lambda: [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]  # noqa: E731
    assert names() == ["oldest", "middle"]
    assert history.undo(scene)      # "newest" is skipped with its node; "middle" is undone
    assert names() == ["oldest"]
    assert not history.undo(scene)  # "oldest" fell out of the two steps kept
    assert names() == ["oldest"]
