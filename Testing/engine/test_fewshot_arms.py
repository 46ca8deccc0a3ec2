"""The few-shot benchmark's arms (training/finetune.py TRAINABLE_SETS) on a real CHAOS MR patient with a tiny
model: each arm changes exactly its own weights, the text tower never trains, and only expert arms make packs."""
from __future__ import annotations

import pytest
import torch

from medsegx_core.errors import InputError
from medsegx_core.training.finetune import FinetuneSettings, base_sha256, finetune, prepare_model, write_pack
from medsegx_core.training.starter_data import CHAOS_ADAPTATION_PATIENTS, CHAOS_CASES, load_case
from test_finetune import tiny_model      # the fine-tuning tests' tiny model (seed 0)


@pytest.fixture(scope="module")
def chaos_case(data_dir):
    first = next(spec for spec in CHAOS_CASES if spec.patient == f"chaos-{CHAOS_ADAPTATION_PATIENTS[0]}")
    return load_case(data_dir, first).labelled


@pytest.mark.parametrize("arm, expected", [("experts", {"conmoae"}), ("decoder", {"mask_decoder"}),
                                           # the loop projects frozen sentence embeddings at every step, so "all"
                                           # trains the text projection too (never the tower itself)
                                           ("all", {"conmoae", "mask_decoder", "image_encoder", "prompt_encoder",
                                                    "text_encoder"})])
def test_each_arm_trains_its_own_weights_only(chaos_case, arm, expected):
    model = tiny_model()
    settings = FinetuneSettings(steps=3, batch_size=2, lr=1e-2, trainable=arm, val_fraction=0.0, val_every=3)
    prepare_model(model, settings)          # the experts attached before the snapshot, as finetune would
    before = {name: value.clone() for name, value in model.state_dict().items()}
    run = finetune(model, [chaos_case], settings)
    assert len(run.history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in run.history)
    after = model.state_dict()
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    assert {name.split(".")[0] for name in changed} == expected
    assert not any(name.startswith("text_encoder.sentence_model") for name in changed), "the text tower is frozen"
    assert {name for name in changed if name.startswith("text_encoder.")} <= {"text_encoder.dim_align.weight",
                                                                             "text_encoder.dim_align.bias"}


def test_only_expert_arms_are_saved_as_packs(chaos_case, tmp_path):
    model = tiny_model()
    settings = FinetuneSettings(steps=1, batch_size=2, trainable="decoder", val_fraction=0.0, val_every=1)
    run = finetune(model, [chaos_case], settings)
    with pytest.raises(InputError, match="not saved as a pack"):
        write_pack(tmp_path / "pack.safetensors", model, settings, base_sha256(model), [chaos_case], run)
    assert not (tmp_path / "pack.safetensors").exists()
    with pytest.raises(InputError, match="unknown trainable set"):
        finetune(tiny_model(), [chaos_case], FinetuneSettings(steps=1, trainable="encoder"))


def test_expert_packs_are_found_by_file_or_bundled_name(tmp_path):
    from medsegx_core.errors import WeightsError
    from medsegx_core.weights.expert_pack import bundled_packs, find_expert_pack, read_pack_metadata

    pack = tmp_path / "mine.safetensors"
    pack.write_bytes(b"")
    assert find_expert_pack(str(pack)) == pack
    with pytest.raises(WeightsError, match="no bundled pack of that name"):
        find_expert_pack("no_such_pack")
    for name, path in bundled_packs().items():
        assert find_expert_pack(name) == path
    for base in ("SegVol", "LiteMedSAM"):      # a name two bases share: each model finds its own
        for name, path in bundled_packs(base).items():
            assert find_expert_pack(name, base) == path and read_pack_metadata(path).get("base_model", "SegVol") == base
    assert "abdominal_mr" in bundled_packs("SegVol")


def test_every_bundled_pack_loads_on_the_starter_model():
    """A bundled SegVol pack was trained on the shipped starter weights (its recorded base hash matches them)."""
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.expert_pack import bundled_packs, load_expert_pack
    from medsegx_core.weights.store import load_model

    for name, path in bundled_packs("SegVol").items():
        model = load_model(starter_weights_dir())
        before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("conmoae.")}
        load_expert_pack(model, path)
        after = model.state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before.items()), f"{name} changed no expert"


def test_a_pack_applies_to_volumes_of_its_own_modality_only(data_dir):
    """The experts are shared by every domain, so the abdominal MR pack would change CT results (for the worse, model
    card): on a CT the model's own experts are put back (the mask is the base model's, and a note says the pack
    was left out); on an MR volume the pack applies, and a later CT on the same predictor is the base's again."""
    import numpy as np

    from medsegx_core.data.readers import read_volume
    from medsegx_core.predictor import Predictor
    from medsegx_core.prompts import Prompts
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.expert_pack import find_expert_pack, load_expert_pack
    from medsegx_core.weights.store import load_model

    ct = read_volume(data_dir / "ct" / "totalseg_ct_small.nii.gz")
    mr = read_volume(data_dir / "mri" / "totalseg_mr.nii.gz")
    packed = load_model(starter_weights_dir())
    load_expert_pack(packed, find_expert_pack("abdominal_mr", "SegVol"))
    with_pack = Predictor(packed, device="cpu", precision="fp32")
    base = Predictor(load_model(starter_weights_dir()), device="cpu", precision="fp32")

    def liver(predictor, volume, modality):
        predictor.set_volume(volume, modality=modality)
        return predictor.segment(Prompts(text="liver"))

    left_out = "expert pack 'abdominal_mr' is for MRI volumes: this CT volume is segmented without it"
    on_ct, base_ct = liver(with_pack, ct, "CT"), liver(base, ct, "CT")
    assert any(left_out in note for note in on_ct.notes) and np.array_equal(on_ct.mask, base_ct.mask)
    on_mr, base_mr = liver(with_pack, mr, "MR"), liver(base, mr, "MR")
    assert not any("expert pack" in note for note in on_mr.notes) and not np.array_equal(on_mr.mask, base_mr.mask)
    assert np.array_equal(liver(with_pack, ct, "CT").mask, base_ct.mask)


def test_the_bundled_pack_adapts_to_a_chaos_patient_it_never_saw(data_dir):
    """CHAOS patient 20 is one of the five evaluation patients (the pack trained on 01 02 03 05 08): with the pack
    a box finds its liver and spleen far better than the base model does and better than the filled box."""
    from medsegx_core.predictor import Predictor
    from medsegx_core.training.starter_eval import EVALUATION_VOLUMES, FILLED_BOX, evaluate
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.expert_pack import find_expert_pack, load_expert_pack
    from medsegx_core.weights.store import load_model

    spec = next(spec for spec in EVALUATION_VOLUMES if spec.key == "chaos-20 T2-SPIR")
    packed = load_model(starter_weights_dir())
    load_expert_pack(packed, find_expert_pack("abdominal_mr", "SegVol"))
    dice = {}
    for label, model in (("base", load_model(starter_weights_dir())), ("pack", packed)):
        for row in evaluate(Predictor(model, device="cpu", precision="fp32"), data_dir, volumes=[spec],
                            kinds=["box"], structures=["liver", "spleen"]):
            dice[(FILLED_BOX if row.kind == FILLED_BOX else label, row.structure)] = row.dice
    for organ in ("liver", "spleen"):
        assert dice[("pack", organ)] > dice[("base", organ)] + 0.15, dice
        assert dice[("pack", organ)] > dice[(FILLED_BOX, organ)] + 0.1, dice
