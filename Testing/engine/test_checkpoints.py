"""Reading published checkpoints: layouts, legacy names, safety (no unpickling), mismatch reports, our store."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medsegx_core.errors import OutputError, WeightsError
from medsegx_core.modeling.build import build_model
from medsegx_core.modeling.config import SegVolConfig, preset
from medsegx_core.weights.checkpoints import infer_config, read_checkpoint
from medsegx_core.weights.store import load_model, save_model, verify_folder


@dataclasses.dataclass
class TrainingState:
    """A custom class: pickling it makes a checkpoint that only arbitrary unpickling could read."""
    epoch: int


@pytest.fixture(scope="module")
def parity(fixtures_dir):
    return fixtures_dir / "segvol_parity"


@pytest.fixture(scope="module")
def fixture_state(parity):
    return read_checkpoint(parity / "public" / "model.safetensors").state


@pytest.fixture(scope="module")
def fixture_image(parity):
    return torch.from_numpy(np.load(parity / "public" / "model_input.npz")["image"])


def test_three_layouts_are_detected_and_give_the_same_tensors(parity, fixture_state):
    layouts = {}
    for name in ("hf_style.bin", "github_style.pth", "model.safetensors"):
        checkpoint = read_checkpoint(parity / "public" / name)
        layouts[name] = checkpoint.layout
        assert checkpoint.state.keys() == fixture_state.keys()
        assert all(torch.equal(checkpoint.state[k], fixture_state[k]) for k in fixture_state)
    assert layouts == {"hf_style.bin": "hf", "github_style.pth": "github", "model.safetensors": "plain"}
    # transformers-4.18 names were mapped and the position_ids buffer dropped.
    assert not any(".text_model." in k or k.endswith("position_ids") for k in fixture_state)
    assert "text_encoder.clip_text_model.final_layer_norm.weight" in fixture_state


def test_pickled_custom_class_is_refused(tmp_path, fixture_state):
    path = tmp_path / "SegVol_v1.pth"
    torch.save({"model": {"module." + k: v for k, v in fixture_state.items()}, "state": TrainingState(3)}, path)
    with pytest.raises(WeightsError, match=r"arbitrary code.*TrainingState"):
        read_checkpoint(path)
    with pytest.raises(WeightsError, match="refusing to load"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_text("this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(path)
    with pytest.raises(WeightsError, match="no such file"):
        load_model(tmp_path / "absent.bin")


def test_mismatched_keys_and_shapes_are_listed(tmp_path, fixture_state):
    state = dict(fixture_state)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra_head.weight"] = torch.zeros(3)
    state["prompt_encoder.not_a_point_embed.weight"] = torch.zeros(1, 32)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as raised:
        load_model(path, config=preset("tiny"))
    message = str(raised.value)
    assert "mask_decoder.iou_token.weight" in message and "missing" in message
    assert "mask_decoder.extra_head.weight" in message and "unexpected" in message
    assert "prompt_encoder.not_a_point_embed.weight (1, 32) vs (1, 64)" in message
    assert "\n" not in message


def test_weights_of_another_size_are_refused(parity):
    with pytest.raises(WeightsError, match=r"do not match the model 'segvol'.*other shapes"):
        load_model(parity / "public" / "model.safetensors", config=preset("segvol"))


def test_monai1_cross_attention_norms_are_tolerated(tmp_path, parity, fixture_state, fixture_image):
    state = dict(fixture_state)
    state["image_encoder.blocks.0.norm_cross_attn.weight"] = torch.ones(64)
    state["image_encoder.blocks.0.norm_cross_attn.bias"] = torch.zeros(64)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path / "model.safetensors")
    reference = np.load(parity / "public" / "model_case_text.npz")["image_embedding"]
    with torch.no_grad():
        assert np.abs(model.encode_image(fixture_image).numpy() - reference).max() <= 1e-5


def test_encoder_only_pretrain_checkpoint(tmp_path, parity, fixture_state, fixture_image):
    encoder = {"model.encoder." + k[len("image_encoder."):]: v
               for k, v in fixture_state.items() if k.startswith("image_encoder.")}
    encoder["model.decoder.head.weight"] = torch.zeros(4, 4)   # the pre-training head is ignored
    path = tmp_path / "vit_pretrain.ckpt"
    torch.save({"state_dict": encoder, "epoch": 7}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint.layout == "encoder_pretrain"
    # read under our encoder names (the pre-training head left out), tensor for tensor
    expected = {k: v for k, v in fixture_state.items() if k.startswith("image_encoder.")}
    assert sorted(checkpoint.state) == sorted(expected)
    assert all(torch.equal(checkpoint.state[k], v) for k, v in expected.items())
    with pytest.raises(WeightsError, match="only a pre-trained image encoder"):
        load_model(path)


def test_config_is_inferred_from_shapes(fixture_state):
    assert infer_config(fixture_state, "fixture") == preset("tiny")
    with torch.device("meta"):
        official = build_model("segvol")
    assert sum(p.numel() for p in official.parameters()) == 180_890_064
    assert infer_config(official.state_dict(), "official") == preset("segvol")
    odd = dict(fixture_state)
    odd["image_encoder.patch_embedding.position_embeddings"] = torch.zeros(1, 2048, 48)
    with pytest.raises(WeightsError, match="--config"):
        infer_config(odd, "odd")


def test_config_json_round_trip_and_errors(tmp_path):
    config = preset("tiny")
    assert SegVolConfig.from_json(config.to_json()) == config
    (tmp_path / "bad.json").write_text('{"name": "x", "widths": 3}')
    with pytest.raises(WeightsError, match="unknown field.*widths"):
        SegVolConfig.from_json(tmp_path / "bad.json")


def test_store_round_trip_with_tokenizer_and_checksums(tmp_path, parity):
    model = load_model(parity / "public" / "hf_style.bin", tokenizer=parity / "tokenizer")
    folder = save_model(model, tmp_path / "tiny-weights", source={"layout": "hf"})
    assert {"model.safetensors", "config.json", "SHA256SUMS", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no staging folder left behind

    again = load_model(folder, verify=True)
    assert again.config == model.config
    original, reloaded = model.state_dict(), again.state_dict()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(again.encode_text(["spleen"]), model.encode_text(["spleen"]))

    with pytest.raises(OutputError, match="already exists"):
        save_model(model, folder)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        verify_folder(folder)


def test_published_folder_with_tokenizer_beside(tmp_path, parity):
    shutil.copyfile(parity / "public" / "hf_style.bin", tmp_path / "pytorch_model.bin")
    for item in (parity / "tokenizer").iterdir():
        shutil.copyfile(item, tmp_path / item.name)   # includes a CLIP config.json, which is not ours
    model = load_model(tmp_path)
    tokens = model.text_encoder.tokenize(["spleen"])
    assert tokens["input_ids"][0].tolist() == [49406, 320, 11639, 704, 7690, 999, 22399, 539, 320, 588, 15940,
                                               269, 49407]


def test_text_without_tokenizer_is_a_clear_error(parity):
    model = load_model(parity / "public" / "model.safetensors")
    with pytest.raises(WeightsError, match="tokenizer"):
        model.encode_text(["liver"])


def test_minilm_text_tower_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("tiny-minilm")
    with torch.no_grad():
        embedding = model.encode_text(["liver", "left kidney"])
    assert embedding.shape == (2, 64)
    assert not torch.allclose(embedding[0], embedding[1])
    assert not any(p.requires_grad for p in model.text_encoder.sentence_model.parameters())
    folder = save_model(model, tmp_path / "starter")
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as stored:
        keys = list(stored.keys())
    assert "text_encoder.dim_align.weight" in keys and not any("sentence_model" in k for k in keys)
    again = load_model(folder)
    with torch.no_grad():
        assert torch.allclose(again.encode_text(["liver", "left kidney"]), embedding, atol=1e-6)
