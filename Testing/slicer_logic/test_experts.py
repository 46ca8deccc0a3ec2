""""Learn from my segments" through the Logic on a real CT (slicer-core scene) with a tiny real model: segment names
resolve through the hierarchy (or a mapping), the engine's fine-tuning runs on the worker thread with progress and
validation Dice when asked (by default every segment trains: none is held out), the pack lands in
$MEDSEGX_HOME/experts, loads, is selected and changes the model; Cancel leaves no pack; a pack trained on other base weights is refused. When boxes run LiteMedSAM (the default), the pack is
LiteMedSAM's: trained slice by slice, it rides on LiteMedSAM for the next box while SegVol runs without it."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import scene_builders as sb
from scene_builders import ct  # noqa: F401 (fixture)
from MedSegXSlicerLib import MedSegXSlicerLogic, box_mode, models, mrml_conversion, segment_writer
from MedSegXSlicerLib.segvol_mode import load_model
from medsegx_core.data.hierarchy import context_indices
from medsegx_core.errors import Cancelled, InputError, WeightsError
from medsegx_core.progress import CancelToken
from tiny_litemedsam import tiny_folder, tiny_model   # Testing/tiny_litemedsam.py

LABELS = {"liver": 5, "splenic thing": 1}   # TotalSegmentator ids in the small CT's labels; the second is mapped
FAST = dict(steps=4, batch_size=2, val_every=2, lr=0.05)


def tiny_weights(folder, seed: int):
    from medsegx_core.modeling.build import build_model
    from medsegx_core.modeling.config import preset
    from medsegx_core.weights.store import save_model

    config = preset("tiny-minilm")
    config.name, config.image_size = "test-16x64x64", (16, 64, 64)
    torch.manual_seed(seed)
    return save_model(build_model(config), folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return tiny_weights(root / "base", 0), tiny_weights(root / "other", 1)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def logic(bases):
    logic = MedSegXSlicerLogic(weightsPath=bases[0], device="cpu")
    yield logic
    logic.cleanup()


@pytest.fixture
def user_segments(ct, data_dir):
    """The user's segmentation of the CT: the real liver and spleen labels, the spleen under a name of their own."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct" / "totalseg_ct_small_labels.nii.gz")))
    node = ct.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "my segments")
    node.CreateDefaultDisplayNodes()
    for name, label in LABELS.items():
        segment_writer.write_segment(node, (labels == label).astype(np.uint8), mrml_conversion.world_ijk_to_ras(ct),
                                     segment_id=None, name=name, color=(0.5, 0.5, 0.5), reference_volume_node=ct)
    return node


def embedding(spec, image):
    model = load_model(spec)
    with torch.no_grad():
        return model.encode_image(image)


def test_train_experts_from_segments_makes_a_pack_that_loads_and_changes_the_model(ct, user_segments, logic,
                                                                                   bases, home):
    assert list(logic.unresolvedSegmentNames(user_segments)) == ["splenic thing"]   # 'liver' resolves
    assert logic.unresolvedSegmentNames(user_segments, {"splenic thing": "spleen"}) == {}
    with pytest.raises(InputError, match="map each to a known structure.*: 'splenic thing' \\(did you mean"):
        logic.startTrainingExperts(ct, user_segments, "mine", **FAST)
    assert not (home / "experts").exists()

    messages = []
    outcome = logic.trainExperts(ct, user_segments, "held out", mapping={"splenic thing": "spleen"},
                                 progress=lambda fraction, message: messages.append(message), val_fraction=0.5,
                                 **FAST)
    assert any("step 2/4" in m and "val Dice" in m for m in messages) and outcome.best_val_dice is not None
    assert models.read_pack_metadata(outcome.pack)["extra"]["settings"]["val_fraction"] == 0.5

    messages.clear()     # the default: both segments train, none is held out for validation
    outcome = logic.trainExperts(ct, user_segments, "my abdomen", mapping={"splenic thing": "spleen"},
                                 progress=lambda fraction, message: messages.append(message), **FAST)
    pack = home / "experts" / "my_abdomen.safetensors"   # a safe file name
    assert outcome.pack == pack and pack.is_file() and outcome.structures == ["liver", "spleen"]
    assert any("step 2/4" in m for m in messages) and not any("val Dice" in m for m in messages)
    assert outcome.best_val_dice is None
    metadata = models.read_pack_metadata(pack)
    assert metadata["extra"]["settings"]["val_fraction"] == 0
    assert sorted(s["name"] for s in metadata["structures"]) == ["liver", "spleen"]
    assert logic.expertPack == str(pack) and logic.modelLabel() == "weights 'base' + experts 'my_abdomen'"
    assert "my_abdomen" in [e.name for e in logic.availableModels() if e.kind == "expert pack"]

    image = torch.rand(1, 1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    without = embedding((str(bases[0]), models.NO_EXPERTS), image)
    assert not torch.allclose(embedding((str(bases[0]), str(pack)), image), without, atol=1e-6)
    assert torch.equal(embedding(str(bases[0]), image), without)   # the base model carries no experts

    segment_id = logic.segment(ct, None, text="liver")              # the module segments with the pack
    assert logic.sessions.current.predictor.has_experts
    assert ct.GetScene().GetFirstNodeByName(f"{ct.GetName()} MedSegX").GetSegmentation().GetSegment(segment_id)

    other = MedSegXSlicerLogic(weightsPath=bases[1], device="cpu")
    try:
        with pytest.raises(WeightsError, match="trained on other base weights"):
            other.selectExpertPack(pack)
        assert other.expertPack is None                               # the previous choice stays
        assert other.selectExpertPack("none") == "weights 'other' without experts"
    finally:
        other.cleanup()


def test_cancel_leaves_no_pack(ct, user_segments, logic, home):
    token = CancelToken()

    def press_cancel(fraction, message):
        if message.startswith("step"):
            token.cancel()

    with pytest.raises(Cancelled):
        logic.trainExperts(ct, user_segments, "cancelled", mapping={"splenic thing": "spleen"},
                           progress=press_cancel, cancel=token, **dict(FAST, steps=50))
    assert token.cancelled
    assert not (home / "experts").exists() or not any((home / "experts").iterdir())
    assert logic.expertPack is None
    assert logic.worker.thread.is_alive()


def test_with_litemedsam_for_boxes_the_pack_is_litemedsams_and_the_next_box_runs_it(ct, user_segments, bases, home,
                                                                                    data_dir):
    """No weights chosen, a (tiny) LiteMedSAM installed: "Learn from my segments" fine-tunes experts in LiteMedSAM's
    TinyViT on the CT's slices; the pack is selected, the next box runs LiteMedSAM with it (CT: its modality), and
    the SegVol side neither gets nor names it."""
    lite = tiny_folder(tiny_model(), home / "weights" / "tiny_litemedsam")
    logic = MedSegXSlicerLogic(device="cpu")
    try:
        assert logic.choice.box_weights() == lite
        messages = []
        outcome = logic.trainExperts(ct, user_segments, "my lite", mapping={"splenic thing": "spleen"},
                                     progress=lambda fraction, message: messages.append(message),
                                     **dict(FAST, batch_size=1))
        metadata = models.read_pack_metadata(outcome.pack)
        assert metadata["base_model"] == box_mode.MODEL_NAME and outcome.structures == ["liver", "spleen"]
        assert metadata["extra"]["recipe"]["name"] == "finetune-litemedsam-experts"      # the kind's own recipe
        assert set(metadata["extra"]["recipe"]["overrides"]) == {"batch_size", "lr", "steps", "val_every",
                                                                 "val_fraction"}
        assert any("step 2/4" in m for m in messages)
        assert logic.expertPack == str(outcome.pack)
        assert logic.choice.box_model_label() == "LiteMedSAM + experts 'my_lite'"
        assert "LiteMedSAM + experts 'my_lite'" in logic.choice.describe_box_model()
        assert "experts" not in logic.modelLabel()                     # SegVol runs without a LiteMedSAM pack
        assert logic.choice.segvol_spec(bases[0]) == str(bases[0])

        # the pack changes LiteMedSAM's logits in the context it learnt, and only loads on its own base
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        box = torch.tensor([[8.0, 8.0, 50.0, 50.0]])
        with_pack, without = box_mode.load_model((str(lite), str(outcome.pack))), box_mode.load_model(str(lite))
        with torch.no_grad(), with_pack.conmoae.context(context_indices("liver", "CT")):
            adapted = with_pack(image, box)
        with torch.no_grad():
            assert not torch.allclose(adapted[0], without(image, box)[0], atol=1e-6)
        with pytest.raises(WeightsError, match="other base weights"):
            box_mode.load_model((str(tiny_folder(tiny_model(seed=1), home / "other_lite")), str(outcome.pack)))

        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct" / "totalseg_ct_small_labels.nii.gz")))
        k, j, i = np.nonzero(labels == LABELS["liver"])
        middle = int(np.median(k))
        roi = sb.add_roi_on_voxels(ct.GetScene(), ct, (i.min(), j.min(), middle - 1),
                                   (i.max(), j.max(), middle + 1))
        segmentation = ct.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
        logic.segment(ct, segmentation, roiNode=roi, segmentName="liver")
        model = logic.segmentation.litemedsam_sessions.current.predictor.model
        assert model.pack_domain.covers(logic.segmentation.litemedsam_sessions.current.predictor.modality)
        up = next(key for key in with_pack.state_dict() if "adapter_up" in key)
        assert torch.equal(model.state_dict()[up], with_pack.state_dict()[up])       # the pack's, in place
        assert "LiteMedSAM + experts 'my_lite'" in logic.lastStatus

        # a LiteMedSAM pack does not go on chosen SegVol weights: refused, the choice kept
        segvol = MedSegXSlicerLogic(weightsPath=bases[0], device="cpu")
        try:
            with pytest.raises(WeightsError, match="fine-tuned on LiteMedSAM, but the weights in use"):
                segvol.selectExpertPack(outcome.pack)
            assert segvol.expertPack is None
        finally:
            segvol.cleanup()
    finally:
        logic.cleanup()
