"""Model-level parity with the official SegVol: the fixture checkpoint, loaded from each published layout,
reproduces every stored model-level array within the fixture README's tolerances (section 7), in float32.

Cases, their texts and prompts, token ids and float32 sums come from the fixture folder
(``$MEDSEGX_SEGVOL_FIXTURE``): ``model_case_*.npz`` and ``fixtures.json -> summary.model_cases / tokens``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixture_paths import SEGVOL_FIXTURE, fixture_record
from medsegx_core.data.metrics import dice
from medsegx_core.weights.store import load_model

LAYOUTS = ["hf_style.bin", "github_style.pth", "model.safetensors"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", sorted(fixture_record(SEGVOL_FIXTURE).get("summary", {}).get("model_cases", {})))


@pytest.fixture(scope="module")
def parity_dir(segvol_fixture):
    return segvol_fixture


@pytest.fixture(scope="module")
def summary(parity_dir):
    return fixture_record(parity_dir)["summary"]


@pytest.fixture(scope="module")
def float32_stats(parity_dir):
    arrays = fixture_record(parity_dir)["arrays"]
    return {name.split(".")[0]: entries for name, entries in arrays.items()}


def case_with(summary: dict, parity_dir, *keys: str):
    """The arrays of the first model case (by name) that stores all of ``keys``, with its text."""
    for name in sorted(summary["model_cases"]):
        arrays = np.load(parity_dir / "public" / f"model_case_{name}.npz")
        if all(key in arrays for key in keys):
            return arrays, summary["model_cases"][name]["text"]
    raise AssertionError(f"no model case of the fixture stores {keys}")


@pytest.fixture(scope="module", params=LAYOUTS)
def loaded(request, parity_dir):
    """(model, image embedding, fixture text-case arrays) for one checkpoint layout."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(parity_dir / "public" / request.param, tokenizer=parity_dir / "tokenizer")
    image = torch.from_numpy(np.load(parity_dir / "public" / "model_input.npz")["image"])
    with torch.no_grad():
        embedding = model.encode_image(image)
    return model, embedding


def max_abs(ours: torch.Tensor, reference: np.ndarray) -> float:
    return float(np.abs(ours.detach().numpy().astype(np.float64) - reference.astype(np.float64)).max())


def test_loaded_config_is_the_fixture_architecture(loaded, parity_dir):
    model, _ = loaded
    config = json.loads((parity_dir / "public" / "config.json").read_text())
    assert model.config.name == "tiny"
    assert model.config.embed_dim == config["image_encoder"]["hidden_size"]
    assert model.config.image_encoder.num_layers == config["image_encoder"]["num_layers"]
    assert model.config.text_encoder.clip["hidden_size"] == config["text_encoder"]["clip_text_config"]["hidden_size"]


def test_image_embedding_and_dense_pe(loaded, parity_dir):
    model, embedding = loaded
    reference = np.load(parity_dir / "public" / "model_case_text.npz")
    assert tuple(embedding.shape) == reference["image_embedding"].shape
    assert max_abs(embedding, reference["image_embedding"]) <= 1e-5
    assert max_abs(model.prompt_encoder.get_dense_pe(), reference["dense_pe"]) <= 1e-4


def test_text_tower(loaded, parity_dir, summary):
    model, _ = loaded
    for name, stored in summary["tokens"].items():                 # every structure name of the fixture
        tokens = model.text_encoder.tokenize([name])
        assert tokens["input_ids"][0].tolist() == stored["input_ids"]
    texts = {case["text"] for case in summary["model_cases"].values() if case["text"]}
    for name in sorted(texts):
        reference = np.load(parity_dir / "public" / f"model_case_{_text_case(summary, name)}.npz")
        tokens = model.text_encoder.tokenize([name])
        np.testing.assert_array_equal(tokens["input_ids"].numpy(), reference["input_ids"])
        with torch.no_grad():
            pooled = model.text_encoder.pooled(tokens["input_ids"], tokens["attention_mask"])
            text_embedding = model.encode_text([name])
        assert max_abs(pooled, reference["clip_pooled"]) <= 1e-5
        assert max_abs(text_embedding, reference["text_embedding"]) <= 1e-5


def _text_case(summary: dict, text: str) -> str:
    """A model case with this text and nothing else when there is one, else any with it."""
    named = sorted(name for name, case in summary["model_cases"].items() if case["text"] == text)
    return next((name for name in named if name == "text"), named[0])


def test_decoder_case(loaded, parity_dir, float32_stats, summary, case):
    model, embedding = loaded
    reference = np.load(parity_dir / "public" / f"model_case_{case}.npz")
    boxes = torch.from_numpy(reference["boxes"]) if "boxes" in reference else None
    points = ((torch.from_numpy(reference["point_coords"]), torch.from_numpy(reference["point_labels"]))
              if "point_coords" in reference else None)
    text = summary["model_cases"][case]["text"]
    with torch.no_grad():
        text_embedding = model.encode_text([text]) if text else None
        details = model.decode_with_details(embedding, text_embedding, points, boxes)
        logits = model.decode(embedding, text_embedding, points, boxes)

    assert details.sparse_embeddings.shape == reference["sparse_embeddings"].shape
    assert max_abs(details.sparse_embeddings, reference["sparse_embeddings"]) <= 1e-4
    assert max_abs(details.logits_lowres, reference["logits_lowres"]) <= 1e-4
    assert max_abs(details.iou_pred, reference["iou_pred"]) <= 1e-4

    # Final logits are stored as a float16 copy: compare with the float16-aware rule and the float32 sum.
    ours = logits.numpy().astype(np.float64)
    stored = reference["logits"].astype(np.float64)
    assert ours.shape == stored.shape == (1, 1) + tuple(model.config.image_size)
    assert np.all(np.abs(ours - stored) <= 1e-3 * np.abs(stored) + 1e-4)
    stored_sum = float32_stats[f"model_case_{case}"]["logits"]["stats_of_float32_source"]["sum"]
    assert abs(ours.sum() - stored_sum) <= 1e-5 * abs(stored_sum)


def test_text_only_has_one_sparse_token_and_points_get_padding(loaded, parity_dir, summary):
    """The official rules the README spells out: no padding point for text, one for points without a box."""
    model, embedding = loaded
    (with_points, _), (with_box, _) = case_with(summary, parity_dir, "point_coords"), case_with(summary, parity_dir,
                                                                                               "boxes")
    coords = torch.from_numpy(with_points["point_coords"][:, :1])          # the first click alone
    labels = torch.from_numpy(with_points["point_labels"][:, :1])
    text = next(case["text"] for case in summary["model_cases"].values() if case["text"])
    with torch.no_grad():
        text_only = model.decode_with_details(embedding, model.encode_text([text]))
        point_only = model.decode_with_details(embedding, points=(coords, labels))
        point_and_box = model.decode_with_details(embedding, points=(coords, labels),
                                                  boxes=torch.from_numpy(with_box["boxes"]))
    assert text_only.sparse_embeddings.shape[1] == 1
    assert point_only.sparse_embeddings.shape[1] == 2
    assert point_and_box.sparse_embeddings.shape[1] == 3
    assert torch.equal(point_only.sparse_embeddings[0, 1], model.prompt_encoder.not_a_point_embed.weight[0])


def test_bfloat16_autocast_keeps_prompt_encoding_exact_and_masks_close(parity_dir, summary):
    """Under CPU bf16 autocast (the fast path on AMX CPUs) the Fourier prompt encoding stays float32 (its sine
    arguments reach hundreds of radians) and the mask agrees with float32."""
    model = load_model(parity_dir / "public" / "model.safetensors", tokenizer=parity_dir / "tokenizer")
    image = torch.from_numpy(np.load(parity_dir / "public" / "model_input.npz")["image"])
    reference, text_prompt = case_with(summary, parity_dir, "point_coords", "text_embedding")
    points = (torch.from_numpy(reference["point_coords"]), torch.from_numpy(reference["point_labels"]))
    clicks = reference["point_coords"].shape[1]
    with torch.no_grad():
        text = model.encode_text([text_prompt])
        fp32_embedding = model.encode_image(image)
        fp32 = model.decode(fp32_embedding, text, points)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embedding = model.encode_image(image)
            details = model.decode_with_details(embedding, text, points)
            bf16 = model.decode(embedding, text, points)
    assert not torch.equal(embedding.float(), fp32_embedding)   # the encoder really ran in reduced precision
    assert max_abs(details.sparse_embeddings[:, :clicks], reference["sparse_embeddings"][:, :clicks]) <= 1e-4
    ours, theirs = bf16.float() > 0, fp32 > 0
    assert dice(ours.numpy(), theirs.numpy()) >= 0.99


def test_encoder_blocks_are_monai_blocks_whose_mlp_sees_norm2(parity_dir):
    config = json.loads((parity_dir / "public" / "config.json").read_text())
    """ConMoAE wraps ``block.mlp`` and relies on its input being ``block.norm2(x)``."""
    from monai.networks.blocks import TransformerBlock

    model = load_model(parity_dir / "public" / "model.safetensors")
    blocks = model.image_encoder.blocks
    assert len(blocks) == config["image_encoder"]["num_layers"] and all(isinstance(b, TransformerBlock) for b in blocks)
    seen = {}
    blocks[1].register_forward_pre_hook(lambda module, args: seen.update(block_in=args[0]))
    blocks[1].mlp.register_forward_pre_hook(lambda module, args: seen.update(mlp_in=args[0]))
    image = torch.from_numpy(np.load(parity_dir / "public" / "model_input.npz")["image"])
    with torch.no_grad():
        model.encode_image(image)
        block = blocks[1]
        after_attention = seen["block_in"] + block.attn(block.norm1(seen["block_in"]))
        assert torch.allclose(seen["mlp_in"], block.norm2(after_attention), atol=1e-6)


@pytest.mark.slow
def test_official_widths_run_one_window():
    """The 'segvol' preset (180.9M parameters) builds and runs a window end to end (about 10 s on 2 CPUs)."""
    from medsegx_core.modeling.build import build_model

    model = build_model("segvol")
    image = torch.rand(1, 1, 32, 256, 256)
    with torch.no_grad():
        embedding = model.encode_image(image)
        logits = model.decode(embedding, boxes=torch.tensor([[4.0, 40, 40, 20, 200, 200]]))
    assert embedding.shape == (1, 768, 8, 16, 16)
    assert logits.shape == (1, 1, 32, 256, 256) and torch.isfinite(logits).all()
