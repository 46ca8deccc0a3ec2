"""MedSegX slice mode in Slicer on real MRML (slicer-core): the fixture's official split pair imported into
$MEDSEGX_HOME shows in the Models panel; an ROI one slice thick on the real CT segments that slice, or with
propagation a 3D segment on the volume's grid equal to the engine's; a real CT slice as a picture (grey and colour)
loaded by Slicer is segmented as a picture; a 3D ROI, an RGB volume and SegVol weights are refused.
The fixture's model is tiny and random: plumbing and geometry are checked, not anatomy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

import scene_builders as sb
from scene_builders import ct  # noqa: F401 (a fixture)
from medsegx_core.data.readers import read_volume
from medsegx_core.errors import InputError, PromptError, WeightsError
from medsegx_core.prompts import BoxPrompt, Prompts
from medsegx_core.slice_predictor import SlicePredictor
from medsegx_core.weights.medsegx2d import import_medsegx, load_medsegx_weights
from MedSegXSlicerLib import models
from MedSegXSlicerLib.slice_mode import SliceModeLogic, installed_medsegx2d_models

FIRST, LAST = (40, 25), (100, 80)     # in-plane voxels of the box


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny model: see Testing/conftest.py


@pytest.fixture()
def home(tmp_path, monkeypatch, fixtures_dir):
    """$MEDSEGX_HOME holding the fixture's split pair imported as 'medsegx'."""
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    public = fixtures_dir / "medsegx_parity" / "public"
    heads = json.loads((public / "config.json").read_text())["architecture"]["mask_decoder"]["num_heads"]
    import_medsegx(public / "sam_base.pth", tmp_path / "home" / "weights" / "medsegx",
                   trained=public / "medsegx_trained.pth", decoder_heads=heads)
    return tmp_path / "home"


def segment_mask(segmentation_node, segment_id, volume_node) -> np.ndarray:
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)


def test_models_panel_offers_the_installed_medsegx_model(home):
    entries = [e for e in models.available_models() if e.kind == "MedSegX 2D"]
    assert [e.name for e in entries] == ["medsegx"] and entries[0].installed
    assert installed_medsegx2d_models() == [home / "weights" / "medsegx"]
    assert all(e.path != home / "weights" / "medsegx" for e in models.available_models() if e.kind == "imported")


def test_one_slice_roi_and_propagation_match_the_engine(home, ct, data_dir):
    scene = ct.GetScene()
    logic = SliceModeLogic()          # the installed model
    roi = sb.add_roi_on_voxels(scene, ct, (*FIRST, 12), (*LAST, 12))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    one = logic.segment(ct, roi, segmentation, text="liver")
    propagated = logic.segment(ct, roi, segmentation, text="liver", propagate=True, segmentName="liver 3D")
    engine = SlicePredictor(load_medsegx_weights(home / "weights" / "medsegx"), device="cpu")
    engine.set_volume(read_volume(data_dir / sb.CT_SMALL))
    box = BoxPrompt((*FIRST, 12), (*LAST, 12), space="ijk")
    expected_one = engine.segment(Prompts(text="liver", box=box)).mask
    expected_3d = engine.segment(Prompts(text="liver", box=box), propagate=True).mask
    mask_one = segment_mask(segmentation, one, ct)
    mask_3d = segment_mask(segmentation, propagated, ct)
    assert mask_3d.shape == slicer.util.arrayFromVolume(ct).shape         # the volume's own grid
    np.testing.assert_array_equal(mask_one, expected_one)
    np.testing.assert_array_equal(mask_3d, expected_3d)
    assert np.flatnonzero(mask_one.any(axis=(1, 2))).tolist() == [12]
    assert mask_3d.any(axis=(1, 2)).sum() > 1
    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in (one, propagated)]
    assert names == ["liver", "liver 3D"]


def test_a_picture_loaded_in_slicer_is_segmented_as_a_picture(home, slicer_app, data_dir, tmp_path):
    """What Slicer makes of a loaded picture: a one-slice scalar volume (grey) or a one-slice RGB vector volume
    (colour). The picture is real: slice 12 of the real CT windowed to 8 bits; it is written as one-slice NRRD
    because slicer-core (Slicer without its application) has no PNG reader."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / sb.CT_SMALL)))[12]
    grey = np.round((np.clip(hu, -160, 240) + 160) / 400 * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey[None]), str(tmp_path / "grey.nrrd"))
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(colour[None], isVector=True), str(tmp_path / "colour.nrrd"))
    logic = SliceModeLogic(home / "weights" / "medsegx")
    for name in ("grey.nrrd", "colour.nrrd"):
        node = slicer.util.loadVolume(str(tmp_path / name))
        assert node.IsA("vtkMRMLVectorVolumeNode") == (name == "colour.nrrd")
        roi = sb.add_roi_on_voxels(slicer_app.scene, node, (*FIRST, 0), (*LAST, 0))
        segment_id = logic.segment(node, roi, None, text="liver", modality="CT")
        assert logic.lastResult.slices[0].slice_index == 0
        assert logic.predictor_intensity().startswith("colour" if name == "colour.nrrd" else "8-bit")
        segmentation = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[-1]
        mask = segment_mask(segmentation, segment_id, node)
        np.testing.assert_array_equal(mask, logic.lastResult.mask)
        assert mask.any()


def test_refusals(home, ct, slicer_app, fixtures_dir, tmp_path):
    scene = ct.GetScene()
    logic = SliceModeLogic()
    thick = sb.add_roi_on_voxels(scene, ct, (*FIRST, 5), (*LAST, 9))
    with pytest.raises(PromptError, match="a 3D box"):
        logic.segment(ct, thick, None, text="liver")
    assert logic.segment(ct, thick, None, text="liver", sliceIndex=7)             # reaches slice 7: fine
    with pytest.raises(InputError, match="needs a box"):
        logic.segment(ct, None, None, text="liver")
    rgb = np.zeros((4, 20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 120
    rgb[1, 3:9, 4:12] = 20
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nrrd"))
    node = slicer.util.loadVolume(str(tmp_path / "rgb.nrrd"))
    roi = sb.add_roi_on_voxels(scene, node, (2, 2, 1), (20, 15, 1))
    with pytest.raises(InputError, match="an RGB volume of 4 slices"):
        logic.segment(node, roi, None)
    with pytest.raises(WeightsError, match="not a volumetric SegVol|not MedSegX|no MedSegX"):
        SliceModeLogic(fixtures_dir / "segvol_parity" / "public" / "model.safetensors").segment(ct, thick, None)


def test_the_module_logic_delegates_to_slice_mode(home, ct):
    from MedSegXSlicerLib import MedSegXSlicerLogic

    logic = MedSegXSlicerLogic(weightsPath=home / "weights" / "medsegx", device="cpu")
    try:
        roi = sb.add_roi_on_voxels(ct.GetScene(), ct, (*FIRST, 20), (*LAST, 20))
        segment_id = logic.segmentSlice(ct, roi, text="spleen")
        segmentation = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[-1]
        mask = segment_mask(segmentation, segment_id, ct)
        assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [20]
        assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "spleen"
    finally:
        logic.cleanup()


def test_the_widget_path_runs_slice_mode_on_the_worker_thread(home, ct):
    """startSegmentation(sliceMode=True) returns at once with the engine job on the Logic's worker thread (so
    Slicer keeps responding while a propagation runs); finishSegmentation writes what segmentSlice writes."""
    import threading

    from MedSegXSlicerLib import MedSegXSlicerLogic

    logic = MedSegXSlicerLogic(weightsPath=home / "weights" / "medsegx", device="cpu")
    try:
        roi = sb.add_roi_on_voxels(ct.GetScene(), ct, (*FIRST, 20), (*LAST, 20))
        engine_threads = []
        task = logic.startSegmentation(ct, None, text="spleen", roiNode=roi, sliceMode=True, propagate=True)
        logic.worker.submit(lambda progress, cancel: engine_threads.append(threading.get_ident())).wait()
        messages = []
        task.job.wait(on_progress=lambda fraction, message: messages.append(message))
        assert engine_threads and engine_threads[0] != threading.get_ident()
        assert any("slice" in m for m in messages)
        segment_id = logic.finishSegmentation(task)
        threaded = segment_mask(task.segmentation_node, segment_id, ct)
        direct = segment_mask(task.segmentation_node, logic.segmentSlice(ct, roi, task.segmentation_node,
                                                                         text="spleen", propagate=True), ct)
        assert threaded.any() and np.array_equal(threaded, direct)
        assert "written" in task.status
    finally:
        logic.cleanup()
