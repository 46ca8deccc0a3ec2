"""The one training loop (training/loop.py) run from tiny recipe files, on CPU in seconds: the base-model recipe
(``train_starter``) and the adapter-expert recipe (``medsegx finetune``) both lower the loss on a fixed set of
real samples and save what loads again, recording the recipe; a run stopped halfway and resumed from its training
state (AdamW's moments included) ends with the weights of the straight run; cancel stops between steps and leaves a
whole training state; the learning-rate schedule is warm-up then cosine."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medsegx_core.errors import Cancelled
from medsegx_core.progress import CancelToken
from medsegx_core.training.batch import PromptedSegmentation, SentenceTable, collate
from medsegx_core.training.dataset import load_case
from medsegx_core.training.loop import learning_rate
from medsegx_core.training.losses import dice_bce_loss, lowres_target
from medsegx_core.training.sampling import Sampler
from medsegx_core.training.starter_data import case_specs, load_cases
from medsegx_core.training.train_starter import TRAINER as STARTER
from medsegx_core.training.train_starter import main as train_starter_main
from medsegx_core.weights.store import WEIGHTS_FILE, load_model, save_model

SHAPE = (16, 64, 64)
# The base-model recipe at a size that trains in a second: one MR case, a one-block model with experts and dense
# prompt marks, as the shipped recipes train it.
TINY_BASE = {"cases": ["mr_abdomen"], "seed": 0, "steps": 16, "batch-size": 2, "lr": 0.003, "warmup": 2,
             "image-size": list(SHAPE), "width": 32, "layers": 1, "with-experts": True, "coordinates": "aligned",
             "dense-prompts": True, "domain-randomisation": True}
# The adapter-expert recipe: MedSegX's trainable set (experts + decoder) on a frozen tiny base.
TINY_EXPERTS = {"trainable": "experts+decoder", "seed": 0, "steps": 16, "batch-size": 2, "lr": 0.01,
                "val-fraction": 0, "val-every": 8}


def write_recipe(path, name, trainer, options):
    path.write_text(json.dumps({"recipe": name, "version": 1, "trainer": trainer, "options": options}))
    return path


def fixed_loss(model, case, seed=99, count=16) -> float:
    """The loop's loss on fixed samples of ``case`` (a sampler seed of its own, not the training one)."""
    batch = collate(Sampler([case], SHAPE, seed).batch(0, range(count)))
    texts = SentenceTable.for_model(model, [s.name for s in case.structures])
    with torch.no_grad():
        logits = PromptedSegmentation(model.eval(), texts)(batch.images, batch.samples)
        return float(dice_bce_loss()(logits, lowres_target(batch.targets, logits)))


@pytest.fixture(scope="module")
def mr_case(data_dir):
    return load_cases(data_dir, case_specs(["mr_abdomen"]))[0].labelled


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipes") / "tiny_base.json", "tiny-base", STARTER, TINY_BASE)


@pytest.fixture(scope="module")
def straight(base_recipe, data_dir, tmp_path_factory):
    """The tiny base recipe trained straight through, from the command line."""
    out = tmp_path_factory.mktemp("straight") / "weights"
    assert train_starter_main(["--recipe", str(base_recipe), "--data", str(data_dir), "--out", str(out),
                               "--threads", "1", "--checkpoint-every", "4"]) == 0
    return out


def test_the_base_recipe_lowers_the_loss_and_saves_loadable_weights(straight, base_recipe, data_dir, mr_case):
    from medsegx_core.training.train_starter import StarterSize, train_starter

    trained = load_model(straight, verify=True)
    assert trained.conmoae.attached and trained.config.prompt_encoder.dense_prompts
    source = json.loads((straight / "config.json").read_text())["source"]
    assert source["recipe"]["sha256"] == hashlib.sha256(base_recipe.read_bytes()).hexdigest()
    assert source["recipe"]["name"] == "tiny-base" and source["steps_done"] == 16 and source["with_experts"]
    assert (straight.parent / "weights.train-state.safetensors").is_file()
    # the same recipe stopped before its first step: the model it started from
    size = StarterSize(image_size=SHAPE, width=32, layers=1, heads=1, coordinates="aligned", dense_prompts=True)
    initial = train_starter(data_dir, seed=0, steps=16, stop_after=0, size=size, cases=["mr_abdomen"],
                            with_experts=True).model
    before, after = fixed_loss(initial, mr_case), fixed_loss(trained, mr_case)
    assert after < before - 0.1, (before, after)


def test_a_stopped_run_resumed_from_its_state_ends_as_the_straight_run(straight, base_recipe, data_dir, tmp_path,
                                                                        capsys):
    out = tmp_path / "weights"
    common = ["--recipe", str(base_recipe), "--data", str(data_dir), "--out", str(out), "--threads", "1",
              "--checkpoint-every", "4"]
    assert train_starter_main(common + ["--stop-after", "8"]) == 0
    halfway = json.loads((out / "config.json").read_text())["source"]
    assert halfway["steps_done"] == 8
    assert train_starter_main(common + ["--resume"]) == 0
    resumed, expected = load_file(str(out / WEIGHTS_FILE)), load_file(str(straight / WEIGHTS_FILE))
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    experts = (load_file(str(out / "experts.safetensors")), load_file(str(straight / "experts.safetensors")))
    assert all(torch.allclose(experts[0][k], v, rtol=1e-6, atol=1e-7) for k, v in experts[1].items())
    records = [json.loads((folder / "config.json").read_text())["source"] for folder in (out, straight)]
    assert records[0]["steps_done"] == 16
    np.testing.assert_allclose(records[0]["final_loss_mean_last_50"], records[1]["final_loss_mean_last_50"],
                               rtol=1e-5)
    # a resume with other learning options is refused, naming them
    other = write_recipe(tmp_path / "other.json", "tiny-base", STARTER, {**TINY_BASE, "lr": 0.001})
    assert train_starter_main(["--recipe", str(other)] + common[2:] + ["--resume"]) == 2
    assert "other settings (loop.lr)" in capsys.readouterr().err


def test_cancel_stops_between_steps_and_leaves_a_whole_training_state(data_dir, tmp_path):
    from medsegx_core.training.loop import CHECKPOINT_FORMAT
    from medsegx_core.training.train_starter import StarterSize, train_starter

    token, state, seen = CancelToken(), tmp_path / "run.train-state.safetensors", []

    def press_cancel(fraction, message):
        seen.append(message)
        if message.startswith("step 3/"):
            token.cancel()

    with pytest.raises(Cancelled):
        train_starter(data_dir, seed=0, steps=50, size=StarterSize(image_size=SHAPE, width=32, layers=1, heads=1),
                      cases=["mr_abdomen"], checkpoint=state, checkpoint_every=1, progress=press_cancel,
                      cancel=token)
    assert [m.split(" loss")[0] for m in seen] == ["step 1/50", "step 2/50", "step 3/50"]
    from safetensors import safe_open
    with safe_open(str(state), framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata["format"] == CHECKPOINT_FORMAT and metadata["step"] == "3"
        assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in handle.keys())
    assert [p.name for p in tmp_path.iterdir()] == [state.name]          # no temporary file left


def test_the_expert_recipe_lowers_the_loss_and_its_pack_records_the_recipe(data_dir, tmp_path):
    from medsegx_core.cli import main
    from medsegx_core.modeling.build import build_model
    from medsegx_core.modeling.config import preset
    from medsegx_core.weights.expert_pack import load_expert_pack, read_pack_metadata

    config = preset("tiny-minilm")
    config.name, config.image_size = "test-16x64x64", SHAPE
    torch.manual_seed(0)
    base = save_model(build_model(config), tmp_path / "base")
    names = tmp_path / "names.json"
    names.write_text(json.dumps(json.loads((data_dir / "totalsegmentator_class_map.json").read_text())["total_mr"]))
    image, labels = data_dir / "mri" / "totalseg_mr.nii.gz", data_dir / "mri" / "totalseg_mr_labels.nii.gz"
    recipe = write_recipe(tmp_path / "tiny_experts.json", "tiny-experts", "medsegx finetune", TINY_EXPERTS)
    pack = tmp_path / "pack.safetensors"
    assert main(["finetune", "--base", str(base), "--image", str(image), "--label", str(labels), "--names",
                 str(names), "--structures", "liver,spleen", "--recipe", str(recipe), "-o", str(pack), "--quiet",
                 "--device", "cpu"]) == 0
    extra = read_pack_metadata(pack)["extra"]
    assert extra["recipe"]["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert extra["recipe"]["name"] == "tiny-experts" and "overrides" not in extra["recipe"]
    assert extra["settings"]["trainable"] == "experts+decoder" and extra["settings"]["n_experts"] == 4  # default's
    case = load_case(image, labels, str(names), only=["liver", "spleen"])
    adapted = load_model(base)
    load_expert_pack(adapted, pack)
    before, after = fixed_loss(load_model(base), case), fixed_loss(adapted, case)
    assert after < before - 0.1, (before, after)


def test_the_experts_step_at_their_own_rate_beside_the_decoder(mr_case):
    """AdamW's first step moves every parameter with a gradient by about its group's peak rate (warm-up 0): with
    ``experts_lr`` the ConMoAE parameters move by that, the decoder's by ``lr``."""
    from medsegx_core.training.finetune import FinetuneSettings, finetune, prepare_model
    from test_finetune import tiny_model      # the fine-tuning tests' tiny model (seed 0)

    model = tiny_model()
    settings = FinetuneSettings(steps=10, stop_after=1, batch_size=2, lr=1e-4, experts_lr=1e-2, warmup=0,
                                weight_decay=0.0, trainable="experts+decoder", val_fraction=0.0, val_every=10)
    prepare_model(model, settings)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    finetune(model, [mr_case], settings)
    steps = {"conmoae.": [], "mask_decoder.": []}
    for name, p in model.named_parameters():
        if name in before:
            moved = (p.detach() - before[name]).abs().flatten()
            steps[name.split(".")[0] + "."].append(moved[moved > 0])
    experts, decoder = (torch.cat(steps[key]).median().item() for key in ("conmoae.", "mask_decoder."))
    assert experts == pytest.approx(1e-2, rel=0.1) and decoder == pytest.approx(1e-4, rel=0.1), (experts, decoder)


def test_the_schedule_warms_up_then_decays_by_a_cosine():
    rates = [learning_rate(step, 100, 1.0, 10, 0.05) for step in range(100)]
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert learning_rate(55, 100, 1.0, 10, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)    # halfway down
    assert learning_rate(100, 100, 1.0, 10, 0.05) == pytest.approx(0.05)


def test_ctrl_c_cancels_at_the_next_check_and_a_second_interrupts():
    import os
    import signal

    from medsegx_core.progress import CancelToken, interrupt_cancels

    cancel = CancelToken()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupt_cancels(cancel):
            os.kill(os.getpid(), signal.SIGINT)      # first: only the token
            assert cancel.cancelled
            os.kill(os.getpid(), signal.SIGINT)      # second: at once
    assert signal.getsignal(signal.SIGINT) is before
