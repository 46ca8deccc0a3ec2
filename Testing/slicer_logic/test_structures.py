"""Several structures in one request through the Logic on a real CT (slicer-core scene, tiny parity model):
one segment per structure, named, coloured and tagged, from one reading and encoding of the volume; Cancel keeps
exactly the structures finished before it; the module's presets expand through the engine's list rule; misuse is
refused before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scene_builders as sb
from scene_builders import ct, imported_weights  # noqa: F401 (fixtures)
from test_logic import engine_mask, mask_in, reference_predictor, segmentation_with_other_segment  # noqa: F401
from MedSegXSlicerLib import MedSegXSlicerLogic, structures
from medsegx_core.data.hierarchy import resolve_structures, resolve_term
from medsegx_core.data.terminology import lookup
from medsegx_core.errors import Cancelled, InputError, UnknownTermError
from medsegx_core.modeling.image_encoder import ImageEncoderViT3D
from medsegx_core.modeling.text_encoder import _FrozenTextTower
from medsegx_core.prompts import Prompts

THREE = "liver, spleen; Left Kidney"


@pytest.fixture
def logic(imported_weights):
    logic = MedSegXSlicerLogic(weightsPath=imported_weights, device="cpu")
    yield logic
    logic.cleanup()


class ForwardCounter:
    """Counts forward calls of one module class anywhere (torch's global forward hook); ``on_call`` runs after."""

    def __init__(self, module_class, on_call=None):
        self.module_class, self.on_call, self.calls = module_class, on_call, []

    def __enter__(self):
        def hook(module, inputs, output):
            if isinstance(module, self.module_class):
                self.calls.append(inputs)
                if self.on_call is not None:
                    self.on_call(len(self.calls), inputs)
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_three_structures_three_segments_from_one_encoding(ct, logic, reference_predictor):
    segmentation = segmentation_with_other_segment(ct)
    mine_before = sb.segmentation_state(segmentation, ct)["mine"]
    messages = []
    with ForwardCounter(ImageEncoderViT3D) as encoder:
        task = logic.startSegmentation(ct, segmentation, text=THREE)
        task.job.wait(on_progress=lambda fraction, message: messages.append(message))
        ids = logic.finishSegmentation(task)

    assert [r.name for r in task.requests] == ["liver", "spleen", "left kidney"]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert logic.sessions.volume_encodings == 1
    # one zoom-out encoding of the volume (no experts: it serves every structure) + the zoom-in windows
    windows = sum(item.result.windows_encoded for item in task.finished)
    assert len(encoder.calls) == 1 + windows
    for segment_id, name in zip(ids, ["liver", "spleen", "left kidney"]):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        terminology, color = lookup(name)
        assert segment.GetName() == name and np.allclose(segment.GetColor(), color)
        assert dict(sb.segment_tags(segment))["TerminologyEntry"] == terminology.to_slicer_string()
        assert np.array_equal(mask_in(segmentation, segment_id, ct),
                              engine_mask(reference_predictor, ct, Prompts(text=name)))
    assert sb.segmentation_state(segmentation, ct)["mine"] == mine_before
    assert any(m.startswith("spleen (2/3)") for m in messages) and any(m.startswith("left kidney (3/3)")
                                                                      for m in messages)
    assert "'liver', 'spleen' and 'left kidney'" in task.status and "on cpu" in task.status

    # one undo takes the whole list back; the user's segment stays
    assert logic.undoLastSegmentation(ct.GetScene())
    assert list(segmentation.GetSegmentation().GetSegmentIDs()) == ["mine"]


def test_cancel_after_the_first_structure_keeps_exactly_it(ct, logic):
    segmentation = segmentation_with_other_segment(ct)
    before = sb.segmentation_state(segmentation, ct)
    from medsegx_core.progress import CancelToken
    token = CancelToken()

    def press_cancel_when_spleen_starts(count, inputs):  # the user presses Cancel while 'spleen' runs
        if any("spleen" in text for text in inputs[0]):
            token.cancel()

    with ForwardCounter(_FrozenTextTower, press_cancel_when_spleen_starts):
        with pytest.raises(Cancelled, match=r"after 1 of 3 structures: kept 'liver'.*'spleen' and 'left kidney' "
                                            r"not segmented"):
            logic.segment(ct, segmentation, text=THREE, cancel=token)
    after = sb.segmentation_state(segmentation, ct)
    assert set(after) - set(before) and len(after) == len(before) + 1
    (new_id,) = set(after) - set(before)
    assert after[new_id][0] == "liver" and after["mine"] == before["mine"]
    assert logic.worker.thread.is_alive()
    assert logic.undoLastSegmentation(ct.GetScene())
    assert sb.segmentation_state(segmentation, ct) == before


def test_cancel_before_any_structure_finished_changes_nothing(ct, logic):
    from medsegx_core.progress import CancelToken
    segmentation = segmentation_with_other_segment(ct)
    before = sb.segmentation_state(segmentation, ct)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled, match="nothing was written"):
        logic.segment(ct, segmentation, text=THREE, cancel=token)
    assert sb.segmentation_state(segmentation, ct) == before


def test_list_misuse_is_refused_before_any_work(ct, logic):
    scene = ct.GetScene()
    segmentation = segmentation_with_other_segment(ct)
    before = sb.segmentation_state(segmentation, ct)
    clicks = sb.add_points(scene, "include", [sb.world_of_voxel(ct, (45, 55, 15))])
    with pytest.raises(InputError, match="clicks and a box describe one structure"):
        logic.segment(ct, segmentation, text="liver, spleen", pointsNode=clicks)
    with pytest.raises(InputError, match="refining a segment takes one structure"):
        logic.segment(ct, segmentation, text="liver, spleen", segmentId="mine")
    with pytest.raises(UnknownTermError, match="unknown structure 'splen kidnee xyz'"):
        logic.segment(ct, None, text="liver, splen kidnee xyz")
    assert sb.segmentation_state(segmentation, ct) == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert logic.worker.thread is None  # nothing was queued


def test_presets_expand_through_the_engines_list_rule():
    """The module's presets, given to the engine's list rule (hierarchy.resolve_structures, tested in
    Testing/engine/test_hierarchy.py), stand for their structures; each resolves exactly, under its region."""
    presets = structures.PRESET_STRUCTURES
    assert [t.name for t in resolve_structures(["spleen", "abdominal organs"], presets)][:3] == \
        ["spleen", "liver", "left kidney"]
    assert [t.name for t in resolve_structures("Thoracic Organs; liver", presets)][-1] == "liver"
    for preset in structures.PRESETS.values():
        assert [t.name for t in resolve_structures(preset.name, presets)] == list(preset.structures)
        for name in preset.structures:
            term = resolve_term(name)
            assert term.match == "exact" and preset.region in term.path, (preset.name, name, term.path)
    assert MedSegXSlicerLogic.structurePresets()["abdominal organs"][:2] == ["liver", "spleen"]
