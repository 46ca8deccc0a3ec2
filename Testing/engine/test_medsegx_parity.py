"""MedSegX numerical parity: our 2D MedSegX (SAM ViT + our model-agnostic ConMoAE + keep-resolution decoder),
loaded from each of the fixture's checkpoint layouts, reproduces the official forward pass and evaluation of
every case within the tolerances of ../shared/fixtures/medsegx_parity/README.md (section 8).

The context of each case comes from our hierarchy's resolution of its MedSegDB folder name, not from the
fixture's stored indices (those are only compared against)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from medsegx_core.errors import InputError, WeightsError
from medsegx_core.modeling.medsegx2d import box_from_label, context_from_task_folder, evaluate_slice, medsegdb_slice
from medsegx_core.weights.medsegx2d import fit_to_config, infer_config, load_medsegx, read_medsegx_state

LAYOUTS = {"split": ("sam_base.pth", "medsegx_trained.pth"), "full_model.pth": ("full_model.pth", None),
           "safetensors": ("model.safetensors", None)}
CASES = ["liver", "kidney", "spleen"]
SPARE_TASK_ROW = 111   # the 112-row task table's last row, never selected by the official code
# README section 8, max absolute difference
TOLERANCES = {
    "box_256": 1e-4, "img_256": 1e-3, "img_normalized": 1e-5,
    "patch_embed_out": 1e-4, "block_out": 1e-4, "image_embedding": 1e-4, "sparse_embeddings": 1e-4,
    "dense_embeddings": 1e-4, "image_pe": 1e-4, "decoder_tokens_out": 1e-4, "decoder_image_out": 1e-4,
    "expert_activation": 1e-5, "hierarchy_attention": 1e-5, "gate_logits": 1e-5, "image_summary": 1e-5,
    "context_embeddings": 1e-5, "iou_pred": 1e-5, "iou_all4": 1e-5,
    "logits_256": 5e-4, "logits_label_res": 1e-3, "dice": 1e-3,
}
NEAR_THRESHOLD = 1e-3   # mask pixels whose reference logit is this close to 0 may flip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The model is tiny: a second intra-op thread only adds synchronisation, which on a loaded 2-core runner
    # made each forward 30-50x slower (0.1 s -> 5 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def public(fixtures_dir):
    return fixtures_dir / "medsegx_parity" / "public"


@pytest.fixture(scope="module")
def architecture(public):
    return json.loads((public / "config.json").read_text())["architecture"]


@pytest.fixture(scope="module")
def models(public, architecture):
    """Each checkpoint layout loaded once (architecture inferred from the shapes; the decoder head count is the
    one thing no shape records)."""
    heads = architecture["mask_decoder"]["num_heads"]
    return {name: load_medsegx(public / weights, public / trained if trained else None, decoder_heads=heads)
            for name, (weights, trained) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def references(public):
    return {case: dict(np.load(public / f"case_{case}.npz")) for case in CASES}


@pytest.fixture(scope="module")
def evaluate(models, references):
    """(layout, case) -> (our evaluation, reference arrays), computed once each."""
    done: dict = {}

    def run(layout: str, case: str):
        if (layout, case) not in done:
            ref = references[case]
            context = context_from_task_folder(str(ref["task_folder"]))
            done[layout, case] = evaluate_slice(models[layout], ref["npy_img"], ref["npy_gt"], context, trace=True)
        return done[layout, case], references[case]
    return run


def max_abs(ours, reference: np.ndarray) -> float:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == reference.shape, f"shape {ours.shape} vs reference {reference.shape}"
    return float(np.abs(ours.astype(np.float64) - reference.astype(np.float64)).max())


def assert_masks_match(ours: np.ndarray, reference: np.ndarray, reference_logits: np.ndarray) -> None:
    differing = ours != reference
    assert not (differing & (np.abs(reference_logits) >= NEAR_THRESHOLD)).any(), \
        f"{int(differing.sum())} mask pixels differ away from the threshold"


def outputs_of(evaluation) -> dict:
    """Our arrays under the fixture's names."""
    return {"box_256": evaluation.box_input, "img_256": evaluation.image_input, "logits_256": evaluation.logits,
            "iou_pred": evaluation.iou_pred, "logits_label_res": evaluation.logits_label_res,
            "dice": evaluation.dice, **evaluation.trace}


# ---- loading ---------------------------------------------------------------------------------------------------
def test_split_pair_loads_like_the_official_code(public):
    """The official two-step load, rebuilt: copied tensors bit-exact, resized ones within the README bounds."""
    layout, state = read_medsegx_state(public / "sam_base.pth", public / "medsegx_trained.pth")
    assert layout == "split"
    config = infer_config(state, image_size=256)
    assert config.token_grid == 16 and state["image_encoder.pos_embed"].shape[1] == 64     # SAM's 1024 input
    fitted = fit_to_config(state, config)
    merged = torch.load(public / "full_model.pth", map_location="cpu", weights_only=True)
    assert set(fitted) == set(merged)
    resized = {"image_encoder.pos_embed": 1e-6}
    resized.update({f"image_encoder.blocks.{b}.attn.rel_pos_{a}": 2e-6 for b in config.global_attn_indexes
                    for a in "hw"})
    for key, tensor in merged.items():
        assert fitted[key].shape == tensor.shape, key
        difference = float((fitted[key] - tensor).abs().max())
        assert difference <= resized.get(key, 0.0), f"{key}: {difference}"


def test_every_layout_gives_the_same_model(models):
    reference = models["safetensors"].state_dict()
    for name, model in models.items():
        assert model.checkpoint_layout == ("split" if name == "split" else "merged")
        state = model.state_dict()
        assert set(state) == set(reference)
        different = [k for k in state if not torch.equal(state[k], reference[k])]
        assert not different, f"{name}: {different[:5]}"


def test_inferred_architecture_is_the_fixture_one(models, architecture):
    config = models["safetensors"].config
    encoder, decoder, experts = architecture["image_encoder"], architecture["mask_decoder"], architecture["conmoae"]
    assert (config.image_size, config.patch_size) == (architecture["image_size"], architecture["patch_size"])
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (
        encoder["embed_dim"], encoder["depth"], encoder["num_heads"], encoder["mlp_dim"])
    assert list(config.global_attn_indexes) == encoder["global_attn_indexes"]
    assert config.window_size == encoder["window_size"] and config.out_chans == encoder["out_chans"]
    assert (config.decoder_depth, config.decoder_mlp_dim, config.iou_head_hidden_dim) == (
        decoder["depth"], decoder["mlp_dim"], decoder["iou_head_hidden_dim"])
    assert (config.conmoae.n_experts, config.conmoae.bottleneck, config.conmoae.context_dim) == (
        experts["expert_num"], experts["bottleneck_dim"], experts["embedding_dim"])
    assert config.conmoae.blocks == experts["blocks_with_adapter"]
    assert config.conmoae.scale == experts["scale"]


def test_medsegx_context_tables_land_in_our_first_rows(models, public):
    """MedSegDB keeps its indices in our hierarchy: MedSegX's tables fill our tables row for row; our extra rows
    (other structures, the "unknown" rows) stay untrained (zero)."""
    merged = torch.load(public / "full_model.pth", map_location="cpu", weights_only=True)
    tables = models["safetensors"].conmoae.context_tables.tables
    official = {"root": "organ_embed.0", "level1": "organ_embed.1", "level2": "organ_embed.2",
                "level3": "organ_embed.3", "task": "organ_embed.4", "modality": "modal_embed"}
    for ours, theirs in official.items():
        rows = merged[f"image_encoder.{theirs}.weight"]
        table = tables[ours].weight
        assert table.shape[0] > rows.shape[0], ours        # our tree is larger and ends with "unknown"
        assert torch.equal(table[: rows.shape[0]], rows), ours
        assert not table[rows.shape[0]:].any(), ours


def test_incomplete_or_swapped_weights_are_refused(public):
    with pytest.raises(WeightsError, match="trained-only"):
        load_medsegx(public / "medsegx_trained.pth")
    with pytest.raises(WeightsError, match="no MedSegX experts"):
        load_medsegx(public / "sam_base.pth")
    with pytest.raises(WeightsError, match="not that pair"):
        load_medsegx(public / "medsegx_trained.pth", public / "sam_base.pth")


# ---- data steps ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_context_box_and_slice_convention(case, references):
    ref = references[case]
    context = context_from_task_folder(str(ref["task_folder"]))
    assert context.rows() == tuple(ref["embedding_rows"][0])
    assert [context.level1, context.level2, context.level3, context.task] == list(ref["organ_indices"][0])
    assert context.modality == int(ref["modal_index"][0])
    box = box_from_label(ref["npy_gt"])
    assert box.dtype == np.float32 and np.array_equal(box, ref["box_native"][0])
    image, label = medsegdb_slice(ref["raw_slice"], ref["label_slice"])
    assert np.array_equal(image, ref["npy_img"]) and np.array_equal(label, ref["npy_gt"])


def test_bad_slices_are_refused(models, references):
    ref = references["liver"]
    context = context_from_task_folder("CT_Liver")
    with pytest.raises(InputError, match="square"):
        evaluate_slice(models["safetensors"], ref["npy_img"][:100], ref["npy_gt"][:100], context)
    with pytest.raises(InputError, match="label is empty"):
        evaluate_slice(models["safetensors"], ref["npy_img"], np.zeros_like(ref["npy_gt"]), context)


# ---- forward pass and evaluation -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_case_reproduces_the_official_numbers(layout, case, evaluate):
    evaluation, ref = evaluate(layout, case)
    ours = outputs_of(evaluation)
    failures = {}
    for name, tolerance in TOLERANCES.items():
        difference = max_abs(ours[name], ref[name])
        if not difference <= tolerance:
            failures[name] = (difference, tolerance)
    assert not failures, f"over tolerance (difference, tolerance): {failures}"
    assert_masks_match(evaluation.masks_label_res, ref["masks_label_res"][0], ref["logits_label_res"][0])
    assert evaluation.best_index == int(ref["oracle_best_index"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spare_task_row(layout, models, references, public):
    """The liver sample routed through task row 111 (the official table's spare row, liver ancestors)."""
    spare = dict(np.load(public / "case_liver_spare_task_row.npz"))
    liver = references["liver"]
    context = dataclasses.replace(context_from_task_folder("CT_Liver"), task=SPARE_TASK_ROW)
    assert [context.level1, context.level2, context.level3, context.task] == list(spare["organ_indices"][0])
    evaluation = evaluate_slice(models[layout], liver["npy_img"], liver["npy_gt"], context, trace=True)
    ours = outputs_of(evaluation)
    compared = [name for name in TOLERANCES if name in spare]
    assert {"expert_activation", "gate_logits", "logits_256", "logits_label_res", "dice"} <= set(compared)
    failures = {name: max_abs(ours[name], spare[name]) for name in compared
                if not max_abs(ours[name], spare[name]) <= TOLERANCES[name]}
    assert not failures, failures
    assert_masks_match(evaluation.masks_label_res, spare["masks_label_res"][0], spare["logits_label_res"][0])
    assert evaluation.best_index == int(spare["oracle_best_index"])


def test_the_comparison_sees_the_context(models, references):
    """Guard against a vacuous pass: the liver image with the kidney's context is far outside the tolerance."""
    liver = references["liver"]
    wrong = evaluate_slice(models["safetensors"], liver["npy_img"], liver["npy_gt"],
                           context_from_task_folder("CT_LeftKidney"))
    assert max_abs(wrong.logits, liver["logits_256"]) > 100 * TOLERANCES["logits_256"]
    gates = models["safetensors"].image_encoder.expert_activation()      # of that last forward
    assert max_abs(gates, liver["expert_activation"]) > 100 * TOLERANCES["expert_activation"]
