"""MedSegXSlicerLogic end to end on real MRML (slicer-core): a real CT, markups, the engine's tiny parity model.

The expected masks come from running the engine's Predictor directly on a Volume built from Slicer's own
hardened copy of the node (geometry from Slicer, voxels from the file), with prompts built from the voxels the
markups were placed on, so a wrong transform, axis order or prompt conversion in the Logic shows up as a
different mask. Tiny random weights: the masks mean nothing anatomically, but they depend on every prompt and
on the geometry (canonical preprocessing reorients to RAS+).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import slicer
import slicerio

import scene_builders as sb
from scene_builders import ct, imported_weights, moved_ct  # noqa: F401 (fixtures)
from MedSegXSlicerLib import MedSegXSlicerLogic, mrml_conversion, segment_writer
from medsegx_core.data.terminology import lookup
from medsegx_core.data.volume import Volume
from medsegx_core.errors import Cancelled, InputError, PromptError, UnknownTermError, WeightsError
from medsegx_core.progress import CancelToken
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts

POSITIVE_VOXELS = [(45, 55, 15), (60, 48, 12)]
NEGATIVE_VOXEL = (90, 30, 20)
BOX = ((30, 35, 5), (80, 75, 25))


@pytest.fixture(scope="module")
def logic(imported_weights):
    logic = MedSegXSlicerLogic(weightsPath=imported_weights, device="cpu")
    yield logic
    logic.cleanup()


@pytest.fixture(scope="module")
def reference_predictor(imported_weights):
    from medsegx_core.predictor import Predictor
    from medsegx_core.weights.store import load_model
    return Predictor(load_model(imported_weights), device="cpu")


def hardened_volume(volume_node) -> Volume:
    """Slicer's own hardening of a copy of the node, as an engine Volume."""
    clone = slicer.modules.volumes.logic().CloneVolume(volume_node.GetScene(), volume_node, "hardened copy")
    clone.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    slicer.vtkSlicerTransformLogic().hardenTransform(clone)
    directions = np.zeros((3, 3))
    clone.GetIJKToRASDirections(directions)
    volume = Volume(slicer.util.arrayFromVolume(clone).copy(), clone.GetSpacing(), clone.GetOrigin(), directions,
                    source=volume_node.GetName())
    volume_node.GetScene().RemoveNode(clone)
    return volume


def engine_mask(predictor, volume_node, prompts) -> np.ndarray:
    volume = hardened_volume(volume_node)
    predictor.set_volume(volume)
    return predictor.segment(prompts).mask


def mask_in(segmentation_node, segment_id, volume_node) -> np.ndarray:
    return segment_writer.read_segment_mask(segmentation_node, segment_id, sb.to_world(volume_node)
                                            @ sb.ijk_to_ras(volume_node), slicer.util.arrayFromVolume(volume_node).shape)


def segmentation_with_other_segment(volume_node):
    """A segmentation that already holds a user's segment overlapping where MedSegX will write."""
    node = volume_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "user segmentation")
    node.CreateDefaultDisplayNodes()
    mask = np.zeros(slicer.util.arrayFromVolume(volume_node).shape, np.uint8)
    mask[5:25, 30:80, 30:90] = 1
    segment_writer.write_segment(node, mask, mrml_conversion.world_ijk_to_ras(volume_node), segment_id="mine",
                                 name="my tumour", color=(0.1, 0.2, 0.9), reference_volume_node=volume_node)
    return node


# ---- results -----------------------------------------------------------------------------------------------------
def test_text_prompt_creates_a_named_coloured_segment_and_leaves_others_alone(ct, logic, reference_predictor,
                                                                              tmp_path):
    segmentation = segmentation_with_other_segment(ct)
    mine_before = sb.segmentation_state(segmentation, ct)["mine"]
    segment_id = logic.segment(ct, segmentation, text="Liver")

    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    terminology, color = lookup("liver")
    assert segment.GetName() == "liver"
    assert np.allclose(segment.GetColor(), color)
    assert dict(sb.segment_tags(segment))["TerminologyEntry"] == terminology.to_slicer_string()
    expected = engine_mask(reference_predictor, ct, Prompts(text="liver"))
    assert expected.any()
    assert np.array_equal(mask_in(segmentation, segment_id, ct), expected)
    assert sb.segmentation_state(segmentation, ct)["mine"] == mine_before

    # Slicer's own storage node writes it; Slicer's reader and slicerio read the same segments back.
    path = tmp_path / "result.seg.nrrd"
    assert slicer.util.saveNode(segmentation, str(path))
    reloaded = slicer.util.loadSegmentation(str(path))
    assert sb.segmentation_state(reloaded, ct) == sb.segmentation_state(segmentation, ct)
    read = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in read["segments"]}
    assert set(by_name) == {"liver", "my tumour"}
    assert by_name["liver"]["terminology"]["type"][1] == terminology.type.value
    assert np.array_equal(slicerio.segment_mask(read, by_name["liver"]["id"]).transpose(2, 1, 0).astype(bool),
                          expected.astype(bool))


def test_clicks_and_box_on_oblique_flipped_volume_under_a_transform_then_refine_and_undo(moved_ct, logic,
                                                                                         reference_predictor):
    scene = moved_ct.GetScene()
    click_parent = sb.linear_transform(scene, sb.affine(sb.rotation("A", 33.0), (-8.0, 2.0, 5.0)), "clicks")
    positive = sb.add_points(scene, "include", [sb.world_of_voxel(moved_ct, POSITIVE_VOXELS[0])],
                             parent=click_parent)
    negative = sb.add_points(scene, "exclude", [sb.world_of_voxel(moved_ct, NEGATIVE_VOXEL)],
                             label=mrml_conversion.NEGATIVE)
    roi = sb.add_roi_on_voxels(scene, moved_ct, *BOX)
    segmentation = segmentation_with_other_segment(moved_ct)
    encodings = logic.sessions.volume_encodings

    task = logic.startSegmentation(moved_ct, segmentation, text="liver", pointsNode=positive,
                                   negativePointsNode=negative, roiNode=roi)
    voxel_prompts = task.prompts.to_voxel(hardened_volume(moved_ct))  # prompts reach the engine on these voxels
    assert np.array_equal(np.rint(voxel_prompts.points_ijk), [POSITIVE_VOXELS[0], NEGATIVE_VOXEL])
    assert voxel_prompts.labels.tolist() == [1, 0]
    assert np.array_equal(voxel_prompts.box_ijk, BOX)
    task.job.wait()
    segment_id = logic.finishSegmentation(task)
    first = mask_in(segmentation, segment_id, moved_ct)

    def reference(text, positive_voxels):
        points = [PointPrompt(sb.world_of_voxel(moved_ct, v)) for v in positive_voxels] + \
            [PointPrompt(sb.world_of_voxel(moved_ct, NEGATIVE_VOXEL), positive=False)]
        return engine_mask(reference_predictor, moved_ct, Prompts(text=text, points=tuple(points),
                                                                  box=BoxPrompt(*BOX, space="ijk")))

    assert np.array_equal(first, reference("liver", POSITIVE_VOXELS[:1]))

    # Another click (and another name) refines the same segment without encoding the volume again.
    positive.AddControlPoint(*(np.linalg.inv(sb.to_world(positive))
                               @ np.append(sb.world_of_voxel(moved_ct, POSITIVE_VOXELS[1]), 1.0))[:3])
    task = logic.startSegmentation(moved_ct, segmentation, text="spleen", pointsNode=positive,
                                   negativePointsNode=negative, roiNode=roi, segmentId=segment_id)
    assert np.array_equal(np.rint(task.prompts.to_voxel(hardened_volume(moved_ct)).points_ijk),
                          [*POSITIVE_VOXELS, NEGATIVE_VOXEL])
    task.job.wait()
    assert logic.finishSegmentation(task) == segment_id
    assert logic.sessions.volume_encodings == encodings + 1
    assert logic.sessions.model_loads == 1  # one model for the whole module's tests
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "spleen"
    refined = mask_in(segmentation, segment_id, moved_ct)
    assert np.array_equal(refined, reference("spleen", POSITIVE_VOXELS))
    assert not np.array_equal(refined, first)

    # Undo puts back the first result, then removes the segment it created; the user's segment is untouched.
    assert logic.undoLastSegmentation(scene)
    assert np.array_equal(mask_in(segmentation, segment_id, moved_ct), first)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "liver"
    assert logic.undoLastSegmentation(scene)
    assert list(segmentation.GetSegmentation().GetSegmentIDs()) == ["mine"]


def test_scene_undo_restores_the_segment(ct, logic):
    scene = ct.GetScene()
    segmentation = segmentation_with_other_segment(ct)
    before = sb.segmentation_state(segmentation, ct)
    scene.SetUndoOn()
    try:
        logic.segment(ct, segmentation, text="spleen", segmentId="mine")  # refine (replace) the user's segment
        assert sb.segmentation_state(segmentation, ct) != before
        scene.Undo()
        assert sb.segmentation_state(segmentation, ct) == before
    finally:
        scene.SetUndoOff()
        scene.ClearUndoStack()


def test_a_new_segmentation_node_is_created_only_on_success(ct, logic):
    scene = ct.GetScene()
    with pytest.raises(UnknownTermError):
        logic.segment(ct, None, text="liverr spleeen kidneyy")
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    segment_id = logic.segment(ct, None, text="left kidney")
    node = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    assert node.GetName() == f"{ct.GetName()} MedSegX"
    assert node.GetSegmentation().GetSegment(segment_id).GetName() == "left kidney"


# ---- bad input: a clear error, and the segmentation node unchanged ---------------------------------------------
@pytest.fixture
def unchanged(ct):
    """A segmentation with a user's segment; asserts after the test that nothing in it changed."""
    segmentation = segmentation_with_other_segment(ct)
    before = sb.segmentation_state(segmentation, ct)
    yield segmentation
    assert sb.segmentation_state(segmentation, ct) == before
    assert ct.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_no_volume(logic, unchanged):
    with pytest.raises(InputError, match="no input volume"):
        logic.segment(None, unchanged, text="liver")


def test_no_prompt(ct, logic, unchanged):
    empty = ct.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "no clicks yet")
    with pytest.raises(PromptError, match="no prompt for volume 'totalseg_ct_small'"):
        logic.segment(ct, unchanged, text="  ", pointsNode=empty)


def test_clicks_are_checked_by_the_engine_before_any_work(ct, logic, unchanged):
    """A click outside the volume, or only exclude clicks: the engine's PromptError (Prompts.to_voxel) from
    startSegmentation itself, so nothing is queued; the message names the volume and what to do."""
    scene = ct.GetScene()
    far = sb.add_points(scene, "include", [sb.world_of_voxel(ct, (300, 5, 5))])
    with pytest.raises(PromptError, match=r"positive point \(.*\) \(RAS mm\) is outside the volume "
                                          r"'totalseg_ct_small' \(RAS bounds .*\); click inside the image") as error:
        logic.startSegmentation(ct, unchanged, text="liver", pointsNode=far)
    assert "\n" not in str(error.value)
    exclude_only = sb.add_points(scene, "exclude", [sb.world_of_voxel(ct, NEGATIVE_VOXEL)])
    with pytest.raises(PromptError, match=r"nothing to segment \(only negative points\): give a structure name"):
        logic.startSegmentation(ct, unchanged, negativePointsNode=exclude_only)


def test_a_modality_the_file_records_is_read_leniently_and_a_typed_one_strictly(ct, logic, reference_predictor):
    """A DICOM volume records its modality (PT here, which the hierarchy has no row for): the engine routes it as
    "unknown" rather than refusing what the user never typed; a modality the user types must be one the hierarchy
    knows (the one rule, data.modality.routing_modality)."""
    scene = ct.GetScene()
    pet = slicer.modules.volumes.logic().CloneVolume(scene, ct, "pet-like copy")
    pet.SetAttribute("DICOM.Modality", "PT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "pt result")
    try:
        segment_id = logic.segment(pet, segmentation, text="liver")
        expected = engine_mask(reference_predictor, pet, Prompts(text="liver"))
        assert np.array_equal(mask_in(segmentation, segment_id, pet), expected)
        before = sb.segmentation_state(segmentation, pet)
        with pytest.raises(PromptError, match="unknown modality 'PTT'"):
            logic.segment(pet, segmentation, text="spleen", modality="PTT")
        assert sb.segmentation_state(segmentation, pet) == before
    finally:
        scene.RemoveNode(segmentation)
        scene.RemoveNode(pet)


def test_unknown_text(ct, logic, unchanged):
    with pytest.raises(UnknownTermError, match="unknown structure 'livr tumr xyz'") as error:
        logic.segment(ct, unchanged, text="livr tumr xyz")
    assert "\n" not in str(error.value)


def test_missing_weights(ct, unchanged, tmp_path):
    logic = MedSegXSlicerLogic(weightsPath=tmp_path / "not there", device="cpu")
    try:
        with pytest.raises(WeightsError, match=r"no MedSegX weights at .*not there: click 'Import official"):
            logic.segment(ct, unchanged, text="liver")
    finally:
        logic.cleanup()


def test_default_weights_follow_the_engine_choice(imported_weights, tmp_path, monkeypatch):
    """No weights chosen: $MEDSEGX_WEIGHTS first, then official weights under $MEDSEGX_HOME, else the bundled
    starter model, each with the one-line explanation the module shows."""
    from medsegx_core.weights.default import starter_weights_dir

    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "empty home"))
    logic = MedSegXSlicerLogic(device="cpu")
    try:
        path, explanation = logic.describeWeights()
        assert path == starter_weights_dir() and "bundled starter model" in explanation
        assert (path / "model.safetensors").is_file()

        official = tmp_path / "empty home" / "weights" / "segvol"
        official.parent.mkdir(parents=True)
        shutil.copytree(imported_weights, official)
        path, explanation = logic.describeWeights()
        assert path == official and "official weights" in explanation

        monkeypatch.setenv("MEDSEGX_WEIGHTS", str(imported_weights))
        assert logic.weightsPath == imported_weights
        monkeypatch.setenv("MEDSEGX_WEIGHTS", str(tmp_path / "typo"))
        with pytest.raises(WeightsError, match="MEDSEGX_WEIGHTS=.*typo: no such file or folder"):
            logic.describeWeights()
    finally:
        logic.cleanup()


def test_corrupt_weights_fail_in_the_worker_without_writing(ct, unchanged, tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    logic = MedSegXSlicerLogic(weightsPath=broken, device="cpu")
    try:
        with pytest.raises(WeightsError):
            logic.segment(ct, unchanged, text="liver")
    finally:
        logic.cleanup()


def test_cancel_mid_run(ct, imported_weights, unchanged):
    logic = MedSegXSlicerLogic(weightsPath=imported_weights, device="cpu")  # fresh: model load + encoding take a while
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(fraction)
        if fraction > 0.0:
            token.cancel()  # the user presses Cancel once the engine has started

    try:
        with pytest.raises(Cancelled):
            logic.segment(ct, unchanged, text="liver", progress=progress, cancel=token)
        assert seen and max(seen) < 1.0
        assert logic.worker.thread.is_alive()  # the persistent worker survives and serves the next request
        assert logic.segment(ct, unchanged, text="liver", segmentName="after cancel") is not None
        unchanged.GetSegmentation().RemoveSegment(unchanged.GetSegmentation().GetSegmentIdBySegmentName(
            "after cancel"))
    finally:
        logic.cleanup()
