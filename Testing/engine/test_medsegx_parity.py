"""MedSegX numerical parity: our 2D MedSegX (SAM ViT + our model-agnostic ConMoAE + keep-resolution decoder),
loaded from each of the fixture's checkpoint layouts, reproduces the official forward pass and evaluation of
every case within the tolerances of ../shared/fixtures/medsegx_parity/README.md (section 8).

The context of each case comes from our hierarchy's resolution of its MedSegDB folder name, not from the
fixture's stored indices (those are only compared against). Cases, the slice convention's intensity window and
the spare-row case's context come from the fixture folder (``$MEDSEGX_MEDSEGX_FIXTURE``): ``fixtures.json`` and
the ``case_*.npz`` files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fixture_paths import MEDSEGX_FIXTURE, fixture_record
from medsegx_core.data.hierarchy import ContextIndices
from medsegx_core.errors import InputError, WeightsError
from medsegx_evaluation import box_from_label, context_from_task_folder, evaluate_slice, medsegdb_slice
from medsegx_core.weights.medsegx2d import fit_to_config, infer_config, load_medsegx, read_medsegx_state

LAYOUTS = {"split": ("sam_base.pth", "medsegx_trained.pth"), "full_model.pth": ("full_model.pth", None),
           "safetensors": ("model.safetensors", None)}
SPARE_SUFFIX = "_spare_task_row"   # README 6.3: a case's inputs routed through the task table's unused last row
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny model: see Testing/conftest.py


def evaluation_cases(record: dict) -> list:
    """The official evaluation cases: those recorded with their MedSegDB task folder (the spare-row case
    reuses another case's inputs and has none)."""
    return sorted(name for name, case in record.get("cases", {}).items() if "task_folder" in case)


def pytest_generate_tests(metafunc):
    public = MEDSEGX_FIXTURE / "public"
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", evaluation_cases(fixture_record(MEDSEGX_FIXTURE)))
    if "spare_case" in metafunc.fixturenames:
        spare = sorted(p.stem[len("case_"):] for p in public.glob(f"case_*{SPARE_SUFFIX}.npz"))
        metafunc.parametrize("spare_case", spare)


@pytest.fixture(scope="module")
def window(medsegx_record):
    """The HU window of the fixture's slice convention (README 5 step 1, fixtures.json)."""
    convention = next(v for k, v in medsegx_record.items() if k.startswith("slice_preprocessing"))
    low, high = re.search(r"clip HU to \[(-?[\d.]+), (-?[\d.]+)\]", convention).groups()
    return float(low), float(high)


@pytest.fixture(scope="module")
def architecture(medsegx_public):
    return json.loads((medsegx_public / "config.json").read_text())["architecture"]


@pytest.fixture(scope="module")
def models(medsegx_public, architecture):
    """Each checkpoint layout loaded once (architecture inferred from the shapes; the decoder head count is the
    one thing no shape records)."""
    heads = architecture["mask_decoder"]["num_heads"]
    return {name: load_medsegx(medsegx_public / weights, medsegx_public / trained if trained else None,
                               decoder_heads=heads)
            for name, (weights, trained) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def references(medsegx_public, medsegx_record):
    return {case: dict(np.load(medsegx_public / f"case_{case}.npz")) for case in evaluation_cases(medsegx_record)}


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
def test_split_pair_loads_like_the_official_code(medsegx_public):
    """The official two-step load, rebuilt: copied tensors bit-exact, resized ones within the README bounds."""
    layout, state = read_medsegx_state(medsegx_public / "sam_base.pth", medsegx_public / "medsegx_trained.pth")
    assert layout == "split"
    config = infer_config(state, image_size=256)
    assert config.token_grid == 16 and state["image_encoder.pos_embed"].shape[1] == 64     # SAM's 1024 input
    fitted = fit_to_config(state, config)
    merged = torch.load(medsegx_public / "full_model.pth", map_location="cpu", weights_only=True)
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
    decoder_config = config.mask_decoder
    assert (decoder_config.transformer_depth, decoder_config.transformer_mlp_dim, decoder_config.transformer_heads,
            decoder_config.iou_head_hidden_dim) == (
        decoder["depth"], decoder["mlp_dim"], decoder["num_heads"], decoder["iou_head_hidden_dim"])
    assert (config.conmoae.n_experts, config.conmoae.bottleneck, config.conmoae.context_dim) == (
        experts["expert_num"], experts["bottleneck_dim"], experts["embedding_dim"])
    assert config.conmoae.blocks == experts["blocks_with_adapter"]
    assert config.conmoae.scale == experts["scale"]


def test_medsegx_context_tables_land_in_our_first_rows(models, medsegx_public):
    """MedSegDB keeps its indices in our hierarchy: MedSegX's tables fill our tables row for row; our extra rows
    (other structures, the "unknown" rows) stay untrained (zero)."""
    merged = torch.load(medsegx_public / "full_model.pth", map_location="cpu", weights_only=True)
    tables = models["safetensors"].conmoae.context_tables.tables
    official = {"root": "organ_embed.0", "level1": "organ_embed.1", "level2": "organ_embed.2",
                "level3": "organ_embed.3", "task": "organ_embed.4", "modality": "modal_embed"}
    for ours, theirs in official.items():
        rows = merged[f"image_encoder.{theirs}.weight"]
        table = tables[ours].weight
        assert table.shape[0] > rows.shape[0], ours        # our tree is larger and ends with "unknown"
        assert torch.equal(table[: rows.shape[0]], rows), ours
        assert not table[rows.shape[0]:].any(), ours


def test_incomplete_or_swapped_weights_are_refused(medsegx_public):
    with pytest.raises(WeightsError, match="trained-only"):
        load_medsegx(medsegx_public / "medsegx_trained.pth")
    with pytest.raises(WeightsError, match="no MedSegX experts"):
        load_medsegx(medsegx_public / "sam_base.pth")
    with pytest.raises(WeightsError, match="not that pair"):
        load_medsegx(medsegx_public / "medsegx_trained.pth", medsegx_public / "sam_base.pth")


# ---- data steps ------------------------------------------------------------------------------------------------
def test_context_box_and_slice_convention(case, references, window):
    ref = references[case]
    context = context_from_task_folder(str(ref["task_folder"]))
    assert context.rows() == tuple(ref["embedding_rows"][0])
    assert [context.level1, context.level2, context.level3, context.task] == list(ref["organ_indices"][0])
    assert context.modality == int(ref["modal_index"][0])
    box = box_from_label(ref["npy_gt"])
    assert box.dtype == np.float32 and np.array_equal(box, ref["box_native"][0])
    image, label = medsegdb_slice(ref["raw_slice"], ref["label_slice"], window)
    assert np.array_equal(image, ref["npy_img"]) and np.array_equal(label, ref["npy_gt"])


def test_bad_slices_are_refused(models, references):
    ref = next(iter(references.values()))
    context = context_from_task_folder(str(ref["task_folder"]))
    with pytest.raises(InputError, match="square"):
        evaluate_slice(models["safetensors"], ref["npy_img"][:100], ref["npy_gt"][:100], context)
    with pytest.raises(InputError, match="label is empty"):
        evaluate_slice(models["safetensors"], ref["npy_img"], np.zeros_like(ref["npy_gt"]), context)


# ---- forward pass and evaluation -------------------------------------------------------------------------------
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
def test_spare_task_row(layout, spare_case, models, references, medsegx_public):
    """A case's sample routed through the task table's spare row (README 6.3): the context the npz records
    (its case's ancestors, the spare task row), on the inputs of the case it is named after."""
    spare = dict(np.load(medsegx_public / f"case_{spare_case}.npz"))
    base = references[spare_case[: -len(SPARE_SUFFIX)]]
    level1, level2, level3, task = (int(v) for v in spare["organ_indices"][0])
    context = ContextIndices(level1, level2, level3, task, modality=int(spare["modal_index"][0]))
    ours = context_from_task_folder(str(base["task_folder"]))
    assert (ours.level1, ours.level2, ours.level3, ours.modality) == (level1, level2, level3, context.modality)
    assert task != ours.task                       # another row than the case's own task
    evaluation = evaluate_slice(models[layout], base["npy_img"], base["npy_gt"], context, trace=True)
    ours = outputs_of(evaluation)
    compared = [name for name in TOLERANCES if name in spare]
    assert {"expert_activation", "gate_logits", "logits_256", "logits_label_res", "dice"} <= set(compared)
    failures = {name: max_abs(ours[name], spare[name]) for name in compared
                if not max_abs(ours[name], spare[name]) <= TOLERANCES[name]}
    assert not failures, failures
    assert_masks_match(evaluation.masks_label_res, spare["masks_label_res"][0], spare["logits_label_res"][0])
    assert evaluation.best_index == int(spare["oracle_best_index"])


def test_the_comparison_sees_the_context(models, references):
    """Guard against a vacuous pass: one case's image with another case's context is far outside the tolerance."""
    (_, case), (_, other) = sorted(references.items())[:2]
    wrong = evaluate_slice(models["safetensors"], case["npy_img"], case["npy_gt"],
                           context_from_task_folder(str(other["task_folder"])))
    assert max_abs(wrong.logits, case["logits_256"]) > 100 * TOLERANCES["logits_256"]
    gates = models["safetensors"].image_encoder.expert_activation()      # of that last forward
    assert max_abs(gates, case["expert_activation"]) > 100 * TOLERANCES["expert_activation"]
