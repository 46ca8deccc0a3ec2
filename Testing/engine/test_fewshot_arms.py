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
    from medsegx_core.weights.expert_pack import bundled_packs, find_expert_pack

    pack = tmp_path / "mine.safetensors"
    pack.write_bytes(b"")
    assert find_expert_pack(str(pack)) == pack
    with pytest.raises(WeightsError, match="no bundled pack of that name"):
        find_expert_pack("no_such_pack")
    for name, path in bundled_packs().items():
        assert find_expert_pack(name) == path


def test_every_bundled_pack_loads_on_the_starter_model():
    """A bundled pack was trained on the shipped starter weights (its recorded base hash matches them)."""
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.expert_pack import bundled_packs, load_expert_pack
    from medsegx_core.weights.store import load_model

    for name, path in bundled_packs().items():
        model = load_model(starter_weights_dir())
        before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("conmoae.")}
        load_expert_pack(model, path)
        after = model.state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before.items()), f"{name} changed no expert"
