"""ConMoAE: identity when untrained, gate arithmetic equal to the official code, per-sample routing, unknown
context, gradient isolation, and attachment to two different backbones (our 3D ViT and MONAI's ViT)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT
from torch import nn

from medsegx_core.data.hierarchy import context_indices, load_hierarchy, resolve_task_folder
from medsegx_core.errors import WeightsError
from medsegx_core.modeling.conmoae import ConMoAE, ConMoAEConfig, attach_experts, attach_experts_to_model
from medsegx_core.weights.medsegx2d import medsegx_state_to_conmoae

CASES = ("liver", "kidney", "spleen")


def tiny_3d_encoder():
    from medsegx_core.modeling.config import ImageEncoderConfig, SegVolConfig
    from medsegx_core.modeling.image_encoder import ImageEncoderViT3D
    config = SegVolConfig(name="test", image_size=(8, 32, 32), patch_size=(4, 16, 16),
                          image_encoder=ImageEncoderConfig(hidden_size=32, mlp_dim=64, num_layers=3, num_heads=4))
    return ImageEncoderViT3D(config).eval()


def monai_vit():
    return ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=24, mlp_dim=48,
               num_layers=2, num_heads=3, spatial_dims=3, classification=False).eval()


def backbone_output(model, image):
    out = model(image)
    return out[0] if isinstance(out, tuple) else out   # MONAI's ViT returns (tokens, hidden states)


def randomise_experts(experts: ConMoAE, seed: int = 0) -> None:
    """Give the zero-initialised parts values, as training would, so that routing has an effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in experts.named_parameters():
            if "adapter_up" in name or "context_tables" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


@pytest.fixture(params=["segvol_vit3d", "monai_vit"])
def backbone(request):
    torch.manual_seed(0)
    if request.param == "segvol_vit3d":
        return tiny_3d_encoder(), torch.rand(2, 1, 8, 32, 32)
    return monai_vit(), torch.rand(2, 1, 16, 16, 16)


# ---------------------------------------------------------------------------------------------- behaviour
def test_untrained_experts_leave_the_backbone_unchanged(backbone):
    model, image = backbone
    with torch.no_grad():
        base = backbone_output(model, image)
        experts = attach_experts_to_model(model, ConMoAEConfig())
        with experts.context(context_indices("liver", "CT")):
            with_experts = backbone_output(model, image)
    assert torch.equal(base, with_experts)
    assert len(experts.last_gates) == len(model.blocks)   # the experts did run, in every block


def test_trained_experts_change_the_output_and_detach_restores_it(backbone):
    model, image = backbone
    with torch.no_grad():
        base = backbone_output(model, image)
        experts = attach_experts(model.blocks, ConMoAEConfig(dropout=0.0))
        randomise_experts(experts)
        changed = backbone_output(model, image)
        experts.detach()
        restored = backbone_output(model, image)
    assert (changed - base).abs().max() > 1e-3
    assert torch.equal(restored, base)


def test_gates_sum_to_one_and_routing_is_per_sample(backbone):
    model, image = backbone
    experts = attach_experts(model.blocks, ConMoAEConfig(dropout=0.0))
    randomise_experts(experts)
    liver, brain = context_indices("liver", "CT"), context_indices("left hippocampus", "MRI")
    with torch.no_grad():
        with experts.context([liver, brain]):
            together = backbone_output(model, image)
            gates = dict(experts.last_gates)
        separate = []
        for sample, ctx in enumerate((liver, brain)):
            with experts.context(ctx):
                separate.append(backbone_output(model, image[sample:sample + 1]))
    for block_gates in gates.values():
        assert block_gates.shape == (2, 4)
        torch.testing.assert_close(block_gates.sum(-1), torch.ones(2))
        assert (block_gates[0] - block_gates[1]).abs().max() > 1e-4   # different context, different gates
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)


def test_unknown_context_runs_and_differs_from_a_known_one(backbone):
    model, image = backbone
    experts = attach_experts(model.blocks, ConMoAEConfig(dropout=0.0))
    randomise_experts(experts)
    hierarchy = load_hierarchy()
    with torch.no_grad():
        implicit = backbone_output(model, image)                     # no context given: unknown rows
        with experts.context(hierarchy.unknown_context()):
            explicit = backbone_output(model, image)
        with experts.context(context_indices("kidney", None)):      # known organ, unknown task and modality
            partial = backbone_output(model, image)
    assert torch.isfinite(explicit).all()
    assert torch.equal(implicit, explicit)
    assert (partial - explicit).abs().max() > 1e-4


def test_gradients_reach_only_the_trainable_parts(backbone):
    model, image = backbone
    experts = attach_experts_to_model(model, ConMoAEConfig(dropout=0.0))
    base_names = [n for n, _ in model.named_parameters() if not n.startswith("conmoae.")]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("conmoae."))
    model.train()
    optimiser = torch.optim.SGD(experts.parameters(), lr=0.5)
    ctx = context_indices("liver", "CT")
    for _ in range(3):   # zero inits: step 0 reaches the up-projections, step 1 gates and tables, step 2 all
        optimiser.zero_grad()
        with experts.context(ctx):
            loss = backbone_output(model, image).square().mean()
        loss.backward()
        optimiser.step()
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in base_names)
    rows = dict(zip(("root", "level1", "level2", "level3", "task", "modality"), ctx.rows()))
    for name, parameter in experts.named_parameters():
        assert parameter.grad is not None, name
        if "context_tables" in name:
            table = name.split(".")[2]
            used = parameter.grad[rows[table]]
            unused = torch.cat([parameter.grad[:rows[table]], parameter.grad[rows[table] + 1:]])
            assert used.abs().max() > 0, name
            assert unused.abs().max() == 0, name          # only the rows of this sample's context learn
        else:
            assert parameter.grad.abs().max() > 0, name


def test_configurable_experts_bottleneck_and_blocks():
    model = monai_vit()
    experts = attach_experts(model.blocks, ConMoAEConfig(n_experts=2, bottleneck=8, blocks=[1]))
    assert experts.block_indices == [1] and len(experts.experts) == 1
    block = experts.experts[0]
    assert len(block.adapter_down) == 2 and block.adapter_down[0].weight.shape == (8, 24)
    assert block.adapter_gate.out_features == 2
    with torch.no_grad():
        backbone_output(model, torch.rand(1, 1, 16, 16, 16))
    assert list(experts.last_gates) == [1]
    with pytest.raises(WeightsError, match="block 5 does not exist"):
        attach_experts(monai_vit().blocks, ConMoAEConfig(blocks=[5]))


def test_initialisation_follows_medsegx():
    experts = attach_experts(monai_vit().blocks, ConMoAEConfig())
    for name, parameter in experts.named_parameters():
        if "adapter_up" in name or "context_tables" in name or ("adapter_down" in name and name.endswith("bias")):
            assert parameter.abs().max() == 0, name
        if "adapter_down" in name and name.endswith("weight"):
            bound = 1 / np.sqrt(parameter.shape[1])              # kaiming-uniform(a=sqrt 5) bound
            assert 0.5 * bound < parameter.abs().max() <= bound, name
    sizes = load_hierarchy().table_sizes()
    for name, table in experts.context_tables.tables.items():
        assert table.num_embeddings == sizes[name]


def test_context_batch_mismatch_is_a_clear_error():
    model = monai_vit()
    experts = attach_experts(model.blocks)
    with experts.context([context_indices("liver", "CT")] * 3):
        with pytest.raises(WeightsError, match="3 samples but the batch has 2"):
            backbone_output(model, torch.rand(2, 1, 16, 16, 16))


# ----------------------------------------------------------------------------- parity with official MedSegX
@pytest.fixture(scope="module")
def official(fixtures_dir):
    from safetensors.torch import load_file
    folder = fixtures_dir / "medsegx_parity" / "public"
    state = load_file(str(folder / "model.safetensors"))
    experts = ConMoAE([64] * 4, [0, 1, 2, 3], ConMoAEConfig()).eval()
    experts.load_state_dict(medsegx_state_to_conmoae(state, experts))
    return experts, {case: np.load(folder / f"case_{case}.npz") for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_context_rows_match_the_official_folder_mapping(official, case):
    _, arrays = official
    resolved, modality = resolve_task_folder(str(arrays[case]["task_folder"]))
    assert list(resolved.context.rows()) == arrays[case]["embedding_rows"][0].tolist()
    assert modality.index == int(arrays[case]["modal_index"][0])


@pytest.mark.parametrize("case", CASES)
def test_gate_arithmetic_matches_the_official_code(official, case):
    experts, arrays = official
    z = arrays[case]
    with torch.no_grad():
        context = experts.context_tables(torch.from_numpy(z["embedding_rows"]))
        np.testing.assert_allclose(context.transpose(0, 1).numpy(), z["context_embeddings"], atol=1e-6)
        for block in range(4):
            routed = experts.experts[block].route(context, torch.from_numpy(z["image_summary"][block]))
            np.testing.assert_allclose(routed["hierarchy_attention"].numpy(), z["hierarchy_attention"][block],
                                       atol=1e-5)
            np.testing.assert_allclose(routed["gate_logits"].numpy(), z["gate_logits"][block], atol=1e-5)
            np.testing.assert_allclose(routed["gates"].numpy(), z["expert_activation"][block], atol=1e-5)


def test_official_weights_fill_the_medsegdb_rows_and_leave_unknown_rows_zero(official, fixtures_dir):
    experts, _ = official
    tables = experts.context_tables.tables
    assert tables["task"].weight[111].abs().max() > 0            # the spare MedSegDB row is loaded too
    for table in tables.values():
        assert table.weight[-1].abs().max() == 0                 # unknown rows: ours, untrained
    with pytest.raises(WeightsError, match="lack"):
        medsegx_state_to_conmoae({}, experts)


def test_experts_follow_the_models_mode():
    model = monai_vit().eval()
    experts = attach_experts_to_model(model, ConMoAEConfig(dropout=0.5))
    randomise_experts(experts)
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not experts.training
        assert torch.equal(backbone_output(model, image), backbone_output(model, image))   # no dropout in eval
