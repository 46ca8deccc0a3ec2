"""Few-shot fine-tuning (the "fine-tune adapter experts" recipe of the one training loop) on real CT crops with a
tiny model: only the experts change, expert packs round-trip and refuse another base, resume continues exactly,
the CLI reads labelmaps and .seg.nrrd, takes its options from a recipe, and 2 processes under torchrun follow the
1-process loss curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medsegx_core.errors import InputError, UnknownTermError, WeightsError
from medsegx_core.training.dataset import load_case
from medsegx_core.weights.expert_pack import load_expert_pack, read_pack_metadata
from medsegx_core.training.batch import PromptedSegmentation, SentenceTable, collate
from medsegx_core.training.finetune import FinetuneSettings, base_sha256, finetune, write_pack
from medsegx_core.training.prompt_simulation import PromptSettings, simulate
from medsegx_core.training.sampling import Sampler
from medsegx_core.weights.store import save_model

REPO = Path(__file__).resolve().parents[2]
STRUCTURES = ["liver", "spleen", "left kidney"]


def tiny_model(seed: int = 0):
    from medsegx_core.modeling.build import build_model
    from medsegx_core.modeling.config import preset
    config = preset("tiny-minilm")
    config.name, config.image_size = "test-16x64x64", (16, 64, 64)
    torch.manual_seed(seed)
    return build_model(config)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    from medsegx_core.weights.store import save_model
    return save_model(tiny_model(), tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def names_file(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("names") / "total.json"
    path.write_text(json.dumps(json.loads((data_dir / "totalsegmentator_class_map.json").read_text())["total"]))
    return path


@pytest.fixture(scope="module")
def ct_case(data_dir, names_file):
    return load_case(data_dir / "ct" / "totalseg_ct_small.nii.gz", data_dir / "ct" / "totalseg_ct_small_labels.nii.gz",
                     str(names_file), only=STRUCTURES)


def load_base(folder):
    from medsegx_core.weights.store import load_model
    return load_model(folder)


# ------------------------------------------------------------------------------------------ data and prompts
def test_case_is_read_resolved_and_preprocessed(ct_case):
    assert sorted(s.name for s in ct_case.structures) == sorted(STRUCTURES)
    assert ct_case.modality.name == "CT"                           # guessed from the HU values
    assert ct_case.image.dtype == np.float32 and 0 <= ct_case.image.min() and ct_case.image.max() <= 1
    assert ct_case.labels.shape == ct_case.image.shape
    liver = next(s for s in ct_case.structures if s.name == "liver")
    assert liver.term.context.task == 59 and liver.term.context.modality == 2
    assert ct_case.voxels[liver.label] > 1000


@pytest.mark.parametrize("kind", ["text", "box", "points", "text+box", "text+points"])
@pytest.mark.parametrize("view", ["zoom-out", "zoom-in"])
def test_simulated_prompts_agree_with_the_mask(ct_case, kind, view):
    liver = next(s for s in ct_case.structures if s.name == "liver")
    rng = np.random.default_rng(1)
    settings = PromptSettings(box_jitter=3, positive_points=3, negative_points=2)
    sample = simulate(ct_case.image, ct_case.mask(liver), "liver", kind, view, (16, 64, 64), rng, settings)
    assert sample.image.shape == sample.mask.shape == (16, 64, 64) and sample.mask.any()
    where = np.argwhere(sample.mask > 0)
    if "box" in kind:
        lo, hi = sample.box[:3], sample.box[3:]
        assert np.all(lo <= where.min(0)) and np.all(hi >= where.max(0))          # contains the structure
        assert np.all(where.min(0) - lo <= 3) and np.all(hi - where.max(0) <= 3)  # jitter bounded
    if "points" in kind:
        values = sample.mask[tuple(sample.points.astype(int).T)]
        assert np.array_equal(values, sample.point_labels.astype(np.float32))     # inside = 1, outside = 0
        assert list(sample.point_labels) == [1, 1, 1, 0, 0]
    if view == "zoom-in":   # native resolution: the window is an unresized piece of the crop
        assert sample.image.max() <= ct_case.image.max()


def test_batches_are_a_function_of_seed_and_step(ct_case):
    sampler = Sampler([ct_case], (16, 64, 64), 0)
    a, c = sampler.batch(5, range(2)), sampler.batch(6, range(2))
    b = Sampler([ct_case], (16, 64, 64), 0).batch(5, range(2))
    assert all(np.array_equal(x.image, y.image) and x.kind == y.kind for x, y in zip(a, b))
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
    assert np.array_equal(sampler.batch(5, [1])[0].image, a[1].image)     # a process's slice of the same batch


@pytest.fixture(scope="module")
def trained(base_folder, ct_case):
    model = load_base(base_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_hash = base_sha256(model)
    settings = FinetuneSettings(steps=8, batch_size=2, lr=3e-3, val_every=4, val_fraction=0.34, seed=3)
    result = finetune(model, [ct_case], settings)
    return model, before, base_hash, settings, result


def test_finetuning_changes_only_the_experts(trained):
    model, before, base_hash, _, result = trained
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []                                               # every base tensor is bit-identical
    assert base_sha256(model) == base_hash
    experts = {k: v for k, v in after.items() if k.startswith("conmoae.")}
    assert any(v.abs().max() > 0 for k, v in experts.items() if "adapter_up" in k)   # the zero init moved
    assert [r["step"] for r in result.history] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in result.history)
    assert len(result.val_items) == 1 and len(result.train_items) == 2
    validated = [r["val_dice"] for r in result.history if "val_dice" in r]
    assert len(validated) == 2 and result.best_val_dice == max(validated)
    assert 0 <= result.initial_val_dice <= 1


def test_expert_pack_round_trip_and_wrong_base(trained, base_folder, ct_case, tmp_path):
    model, _, base_hash, settings, result = trained
    pack = write_pack(tmp_path / "liver.safetensors", model, settings, base_hash, [ct_case], result)
    metadata = read_pack_metadata(pack)
    assert metadata["base_sha256"] == base_hash and metadata["trained_prefixes"] == ["conmoae."]
    from safetensors.torch import load_file
    stored = load_file(str(pack))
    assert stored and all(k.startswith("conmoae.") for k in stored)     # only the trained tensors
    assert sum(v.numel() for v in stored.values()) < 0.1 * sum(p.numel() for p in model.parameters())

    fresh = load_base(base_folder)
    load_expert_pack(fresh, pack)
    batch = collate(Sampler([ct_case], (16, 64, 64), 0).batch(0, range(4)))
    outputs = []
    with torch.no_grad():
        for m in (model, fresh):
            texts = SentenceTable.for_model(m, [s.name for s in batch.samples])
            outputs.append(PromptedSegmentation(m.eval(), texts)(batch.images, batch.samples))
    assert torch.equal(outputs[0], outputs[1])

    other = tiny_model(seed=1)
    with pytest.raises(WeightsError, match="trained on other base weights"):
        load_expert_pack(other, pack)
    assert not hasattr(other, "conmoae")                                # nothing attached on refusal
    with pytest.raises(WeightsError, match="not a MedSegX expert pack"):
        load_expert_pack(fresh, base_folder / "model.safetensors")
    with pytest.raises(Exception, match="already exists"):
        write_pack(pack, model, settings, base_hash, [ct_case], result)   # never silently replaced


def test_segment_cli_runs_with_an_expert_pack(trained, base_folder, ct_case, data_dir, tmp_path, capsys):
    """`medsegx segment --experts PACK` gives what the Predictor gives with the pack loaded; another base is a
    one-line error and writes nothing."""
    from medsegx_core.cli import main
    from medsegx_core.data.readers import read_volume
    from medsegx_core.predictor import Predictor
    from medsegx_core.prompts import Prompts

    model, _, base_hash, settings, result = trained
    pack = write_pack(tmp_path / "liver.safetensors", model, settings, base_hash, [ct_case], result)
    ct = data_dir / "ct" / "totalseg_ct_small.nii.gz"
    output = tmp_path / "liver.nii.gz"
    common = ["segment", str(ct), "--text", "liver", "--weights", str(base_folder), "--experts", str(pack),
              "--device", "cpu", "--precision", "fp32"]
    assert main(common + ["-o", str(output)]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(output)))

    with_pack = load_base(base_folder)
    load_expert_pack(with_pack, pack)
    predictor = Predictor(with_pack, device="cpu", precision="fp32")
    predictor.set_volume(read_volume(ct))
    expected = predictor.segment(Prompts(text="liver")).mask
    assert np.array_equal(written > 0, expected > 0)

    other = tmp_path / "other base"
    save_model(tiny_model(seed=1), other)
    capsys.readouterr()
    refused = tmp_path / "refused.nii.gz"
    assert main(common[:5] + [str(other)] + common[6:] + ["-o", str(refused)]) == 1
    assert "trained on other base weights" in capsys.readouterr().err and not refused.exists()


def test_resume_after_cancel_continues_exactly(base_folder, ct_case, tmp_path):
    """4 steps straight = 2 steps, cancelled, then resumed from the training state (trainable tensors and AdamW's
    moments): the same loss curve and the same experts."""
    from medsegx_core.errors import Cancelled
    from medsegx_core.progress import CancelToken

    # no validation, so the returned state is the last one (not a best-of that float noise could flip)
    settings = FinetuneSettings(steps=4, batch_size=2, val_every=1, val_fraction=0, seed=5, lr=3e-3)
    straight = load_base(base_folder)
    full = finetune(straight, [ct_case], settings)
    state = tmp_path / "run.train-state.safetensors"
    token = CancelToken()

    def cancel_after_two(fraction, message):
        if message.startswith("step 2/"):
            token.cancel()

    with pytest.raises(Cancelled):
        finetune(load_base(base_folder), [ct_case], settings, state_path=state, progress=cancel_after_two,
                 cancel=token)
    assert state.is_file() and not list(tmp_path.glob(".*partial"))       # the step-2 state, whole
    resumed = load_base(base_folder)
    second = finetune(resumed, [ct_case], settings, state_path=state, resume=True)
    assert [r["step"] for r in second.history] == [1, 2, 3, 4]
    np.testing.assert_allclose(second.losses, full.losses, rtol=1e-6)
    moved = 0.0
    final = resumed.state_dict()
    for key, value in straight.state_dict().items():
        if key.startswith("conmoae."):
            torch.testing.assert_close(final[key], value, atol=1e-7, rtol=1e-6)
            moved = max(moved, float(value.abs().max())) if "adapter_up" in key else moved
    assert moved > 1e-3                                                  # four steps of training did happen
    # another run's settings cannot continue this state
    with pytest.raises(WeightsError, match="other settings.*lr"):
        finetune(load_base(base_folder), [ct_case], FinetuneSettings(**{**settings.__dict__, "lr": 1e-3}),
                 state_path=state, resume=True)


# ----------------------------------------------------------------------------------------------------- CLI
def run_cli(args, env_extra=None, torchrun=0):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env_extra or {}))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
              "-m", "medsegx_core"] if torchrun else [sys.executable, "-m", "medsegx_core"]
    return subprocess.run(prefix + args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def test_cli_one_process_and_torchrun_two_processes_follow_the_same_loss_curve(base_folder, data_dir, names_file,
                                                                                 tmp_path):
    common = ["finetune", "--base", str(base_folder), "--image", str(data_dir / "ct" / "totalseg_ct_small.nii.gz"),
              "--label", str(data_dir / "ct" / "totalseg_ct_small_labels.nii.gz"), "--names", str(names_file),
              "--structures", "liver,spleen", "--steps", "4", "--batch-size", "2", "--lr", "3e-3",
              "--dropout", "0", "--val-fraction", "0", "--seed", "2", "--quiet", "--device", "cpu"]
    single = run_cli(common + ["-o", str(tmp_path / "one.safetensors"), "--history", str(tmp_path / "one.json")])
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_cli(common + ["-o", str(tmp_path / "two.safetensors"), "--history", str(tmp_path / "two.json")],
                     torchrun=2)
    assert double.returncode == 0, double.stderr[-2000:]
    one = [r["loss"] for r in json.loads((tmp_path / "one.json").read_text())["history"]]
    two = [r["loss"] for r in json.loads((tmp_path / "two.json").read_text())["history"]]
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)
    assert "on 2 process(es)" in double.stdout and "on 1 process(es)" in single.stdout
    assert one[-1] != one[0]                                          # the curve is a curve: training happened


def test_cli_reads_seg_nrrd_and_refuses_unknown_names(base_folder, data_dir, names_file, tmp_path):
    from medsegx_core.cli import main
    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.data.segments import Segment
    from medsegx_core.data.writers import write_seg_nrrd

    image_path = data_dir / "ct" / "totalseg_ct_small.nii.gz"
    image = read_volume(image_path)
    labels = read_labelmap(data_dir / "ct" / "totalseg_ct_small_labels.nii.gz", image).array
    seg = write_seg_nrrd(tmp_path / "spleen.seg.nrrd", image,
                         [Segment("spleen", mask=labels == 1), Segment("splenic lesion@spleen", mask=labels == 3)])
    out = tmp_path / "pack.safetensors"
    args = ["finetune", "--base", str(base_folder), "--image", str(image_path), "--label", str(seg), "--steps", "2",
            "--val-fraction", "0.5", "--val-every", "1", "--quiet", "--device", "cpu", "-o", str(out)]
    assert main(args) == 0
    structures = read_pack_metadata(out)["structures"]
    assert {s["name"] for s in structures} == {"spleen", "splenic lesion"}
    new_leaf = next(s for s in structures if s["name"] == "splenic lesion")
    assert new_leaf["path"][-2:] == ["spleen", "splenic lesion"]
    assert (tmp_path / "pack.train-state.safetensors").is_file()
    assert main(args) == 1                                             # exists: refused, not replaced

    bad_names = tmp_path / "bad.json"
    bad_names.write_text(json.dumps({"1": "banana", "5": "liver"}))
    with pytest.raises(UnknownTermError, match="banana"):
        load_case(image_path, data_dir / "ct" / "totalseg_ct_small_labels.nii.gz", str(bad_names))
    with pytest.raises(InputError, match="needs structure names"):
        load_case(image_path, data_dir / "ct" / "totalseg_ct_small_labels.nii.gz", None)
