"""The bundled starter model: shipped weights and their hash, real segmentations of the real CT, reproducible
training, the default-weights choice, the overlay figure and the evaluation prompts."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsegx_core.data.figure import save_overlay_figure
from medsegx_core.data.readers import read_labelmap, read_volume
from medsegx_core.data.segments import Segment
from medsegx_core.errors import InputError, OutputError, WeightsError
from medsegx_core.predictor import Predictor
from medsegx_core.data.metrics import dice
from medsegx_core.training.starter_eval import (EVALUATION_VOLUMES, FILLED_BOX, design, evaluate,
                                                evaluation_prompts, filled_box, interior_voxel_ijk)
from medsegx_core.training.train_starter import StarterSize, train_starter
from medsegx_core.weights.default import default_weights, starter_weights_dir
from medsegx_core.weights.store import load_model, save_model, sha256_of, verify_folder

LIVER = 5                       # TotalSegmentator "total" id
MAX_SHIPPED_BYTES = 40 * 2**20
# Measured with the shipped weights (bf16 on CPU, Testing/benchmarks/eval_starter.py, MODEL_CARD.md): on
# ct/totalseg_ct (the training patient) the liver from text 0.84 and from its box 0.85; on the held-out abdominal
# MR patient the liver from its box 0.41; on 20 slices of the training CT given as a volume of their own the liver
# from its box 0.60. The thresholds sit a little below, so a regression shows; the targets (0.70 text,
# 0.85 box on unseen data) are reported, not asserted.
LIVER_TEXT_DICE = 0.78
LIVER_BOX_DICE = 0.78
MR_LIVER_BOX_DICE = 0.35
SLAB_LIVER_BOX_DICE = 0.50


@pytest.fixture(scope="module")
def starter_model():
    return load_model(starter_weights_dir(), verify=True)


@pytest.fixture(scope="module")
def ct(data_dir, reference_ct):
    volume = read_volume(reference_ct)
    labels = read_labelmap(data_dir / "ct" / "totalseg_ct_labels.nii.gz", volume).array
    return volume, labels


@pytest.fixture(scope="module")
def ct_predictor(starter_model, ct):
    predictor = Predictor(starter_model, device="cpu")
    predictor.set_volume(ct[0])
    return predictor


# ---- the shipped weights --------------------------------------------------------------------------------------
def test_shipped_weights_match_their_recorded_hash():
    folder = starter_weights_dir()
    verify_folder(folder)  # raises on any mismatch
    recorded = dict(line.split()[::-1] for line in (folder / "SHA256SUMS").read_text().splitlines())
    assert recorded["model.safetensors"] == sha256_of(folder / "model.safetensors")
    assert set(recorded) >= {"model.safetensors", "config.json"}
    assert (folder / "model.safetensors").stat().st_size <= MAX_SHIPPED_BYTES


def test_shipped_weights_load_as_the_starter_architecture(starter_model):
    record = json.loads((starter_weights_dir() / "config.json").read_text())
    assert starter_model.config.name == "starter"
    assert starter_model.config.text_encoder.kind == "minilm"
    assert tuple(starter_model.config.image_size) == (32, 128, 128)
    assert record["source"]["trained_by"] == "medsegx_core.training.train_starter"
    source = record["source"]                                   # stage 7 of MODEL_CARD.md
    assert "--seed 7" in source["command"] and source["init"] and source["domain_randomisation"]
    assert source["excluded_patients"] == ["ct-patient-2", "mr-patient-1"]
    assert starter_model.config.prompt_encoder.coordinates == "aligned"
    assert starter_model.config.prompt_encoder.dense_prompts and not starter_model.config.zoom_in
    assert starter_model.conmoae.attached                       # its expert pack, hash-checked with the rest
    # Every saved tensor was adopted: loading the state back reproduces the file exactly.
    from safetensors.torch import load_file
    saved = load_file(str(starter_weights_dir() / "model.safetensors"))
    state = starter_model.state_dict()
    assert all(torch.equal(state[k].to(v.dtype), v) for k, v in saved.items())


def test_a_changed_weights_file_is_refused(tmp_path):
    import shutil
    copy = tmp_path / "starter"
    shutil.copytree(starter_weights_dir(), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_model(copy, verify=True)


# ---- real segmentations -----------------------------------------------------------------------------------------
def test_starter_segments_the_liver_of_the_real_ct_from_text(ct_predictor, ct):
    volume, labels = ct
    truth = labels == LIVER
    result = ct_predictor.segment(evaluation_prompts(volume, truth, "liver", "text"))
    assert result.mask.shape == labels.shape and result.name == "liver"
    assert dice(result.mask, truth) >= LIVER_TEXT_DICE
    # It is the liver, not the whole abdomen: most of the mask lies in the liver.
    assert (result.mask.astype(bool) & truth).sum() > 0.5 * result.mask.sum()


def test_starter_segments_the_liver_of_the_real_ct_from_a_box(ct_predictor, ct):
    volume, labels = ct
    truth = labels == LIVER
    result = ct_predictor.segment(evaluation_prompts(volume, truth, "liver", "box"))
    assert dice(result.mask, truth) >= LIVER_BOX_DICE
    assert result.windows == 0          # the starter's configuration: coarse pass only


def _evaluation_row(starter_model, data_dir, volume_key):
    spec = next(spec for spec in EVALUATION_VOLUMES if spec.key == volume_key)
    source = json.loads((starter_weights_dir() / "config.json").read_text())["source"]
    rows = evaluate(Predictor(starter_model, device="cpu"), data_dir, volumes=[spec], kinds=["box"],
                    structures=["liver"], source=source)
    assert [row.kind for row in rows] == [FILLED_BOX, "box"] and rows[1].structure == "liver"
    return rows[1]


def test_starter_finds_the_liver_of_the_unseen_abdominal_mr_from_a_box(starter_model, data_dir):
    """A patient and a modality of abdomen it never trained on (domain randomisation made this non-zero)."""
    row = _evaluation_row(starter_model, data_dir, "mr-patient-1 abdomen")
    assert row.design == "held-out patient" and row.dice >= MR_LIVER_BOX_DICE


def test_starter_finds_the_liver_of_a_slab_of_slices_given_as_a_volume_of_its_own(starter_model, data_dir):
    """Partial scan coverage: the slab is cut from the volume with its own geometry (labels cut alike)."""
    row = _evaluation_row(starter_model, data_dir, "ct-patient-1 20-slice slab")
    assert row.design == "trained, partial coverage" and row.dice >= SLAB_LIVER_BOX_DICE


# ---- training ---------------------------------------------------------------------------------------------------
TINY = StarterSize(image_size=(16, 64, 64), patch_size=(4, 16, 16), width=32, layers=1, heads=2, decoder_mlp=32)


def _tiny_run(data_dir, seed):
    return train_starter(data_dir, seed=seed, steps=2, batch_size=2, size=TINY, cases=["mr_abdomen"])


def test_training_is_reproducible_from_the_seed(data_dir):
    first, second = _tiny_run(data_dir, 0), _tiny_run(data_dir, 0)
    a, b = first.model.state_dict(), second.model.state_dict()
    trained = [k for k, p in first.model.named_parameters() if p.requires_grad]
    assert len(first.losses) == 2 and first.losses[0] != first.losses[1]   # it did train
    assert first.losses == second.losses
    assert trained and all(torch.equal(a[k], b[k]) for k in trained)
    assert not any(k.startswith("text_encoder.sentence_model") for k in trained)   # the MiniLM tower is frozen
    assert "liver" in first.vocabulary and first.cases == ["mr_abdomen"]


def test_training_refuses_unknown_cases_and_held_out_names(data_dir):
    with pytest.raises(InputError, match="unknown training case"):
        train_starter(data_dir, steps=1, size=TINY, cases=["no_such_case"])
    with pytest.raises(InputError, match="held-out structure"):
        train_starter(data_dir, steps=1, size=TINY, cases=["mr_abdomen"], hold_out_structures=["livr"])


# ---- which weights by default -----------------------------------------------------------------------------------
def test_default_weights_fall_back_to_the_starter_and_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    chosen = default_weights()
    assert chosen.is_starter and chosen.path == starter_weights_dir()
    assert "starter model" in chosen.explanation and "no official weights" in chosen.explanation
    assert "\n" not in chosen.explanation


def test_default_weights_prefer_installed_official_weights(tmp_path, monkeypatch, starter_model):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    save_model(starter_model, tmp_path / "weights" / "segvol")   # stands where 'weights import' puts SegVol
    chosen = default_weights()
    assert chosen.kind == "official" and chosen.path == tmp_path / "weights" / "segvol"
    assert "official" in chosen.explanation


def test_default_weights_environment_variable_wins_and_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path))
    monkeypatch.setenv("MEDSEGX_WEIGHTS", str(starter_weights_dir()))
    assert default_weights().kind == "environment"
    monkeypatch.setenv("MEDSEGX_WEIGHTS", str(tmp_path / "missing"))
    with pytest.raises(WeightsError, match="MEDSEGX_WEIGHTS"):
        default_weights()


# ---- the figure ---------------------------------------------------------------------------------------------------
def test_overlay_figure_shows_the_segment_in_its_colour(tmp_path, ct):
    from matplotlib import image as mpimg

    volume, labels = ct
    colour = (1.0, 0.0, 1.0)   # magenta appears nowhere in a grey CT
    out = save_overlay_figure(tmp_path / "liver.png", volume, [Segment("liver", mask=labels == LIVER, color=colour)])
    empty = save_overlay_figure(tmp_path / "none.png", volume, [Segment("liver", mask=labels == 999, color=colour)])

    def magenta(path):
        pixels = mpimg.imread(path)[..., :3]
        return pixels.shape, int(((pixels[..., 0] > 0.6) & (pixels[..., 1] < 0.45) & (pixels[..., 2] > 0.6)).sum())

    (height, width, _), with_liver = magenta(out)
    _, legend_only = magenta(empty)
    assert width > 2 * height           # three planes side by side
    assert legend_only < 1000           # the legend patch
    assert with_liver > legend_only + 5000   # the liver drawn in three planes


def test_overlay_figure_never_replaces_a_file_and_wants_png(tmp_path, ct):
    volume, labels = ct
    target = tmp_path / "seg.png"
    target.write_bytes(b"user data")
    with pytest.raises(OutputError, match="already exists"):
        save_overlay_figure(target, volume, [Segment("liver", mask=labels == LIVER)])
    assert target.read_bytes() == b"user data"
    with pytest.raises(InputError, match="PNG"):
        save_overlay_figure(tmp_path / "seg.jpg", volume, [Segment("liver", mask=labels == LIVER)])


# ---- evaluation prompts -------------------------------------------------------------------------------------------
def test_evaluation_prompts_are_what_a_user_would_give(ct):
    volume, labels = ct
    truth = labels == LIVER
    point = interior_voxel_ijk(truth, volume.spacing).astype(int)
    assert truth[point[2], point[1], point[0]]
    box = evaluation_prompts(volume, truth, "liver", "box").to_voxel(volume).box_ijk
    where = np.argwhere(truth)[:, ::-1]
    np.testing.assert_array_equal(box, np.stack([where.min(0), where.max(0)]))
    assert evaluation_prompts(volume, truth, "liver", "text").text == "liver"


def test_filled_box_baseline_is_the_prompt_box_filled_in(ct):
    volume, labels = ct
    truth = labels == LIVER
    box = evaluation_prompts(volume, truth, "liver", "box").to_voxel(volume).box_ijk.astype(int)
    filled = filled_box(truth)
    assert filled.sum() == np.prod(box[1] - box[0] + 1)
    assert filled[tuple(slice(lo, hi + 1) for lo, hi in zip(box[0][::-1], box[1][::-1]))].all()
    assert (filled & truth).sum() == truth.sum()      # the tight box holds the whole structure


def test_design_is_read_from_the_weights_training_record():
    source = {"cases": ["ct_abdomen", "mr_brain"], "held_out_structures": ["gallbladder"]}
    by_key = {spec.key: spec for spec in EVALUATION_VOLUMES}
    assert design(by_key["ct-patient-1 abdomen"], "liver", source) == "trained"
    assert design(by_key["ct-patient-1 abdomen"], "gallbladder", source) == "held-out structure"
    assert design(by_key["ct-patient-1 20-slice slab"], "liver", source) == "trained, partial coverage"
    assert design(by_key["ct-patient-3 thorax-abdomen"], "liver", source) == "held-out patient"
    assert design(by_key["chaos-10 T2-SPIR"], "liver", source) == "held-out patient"
    assert design(by_key["chaos-10 T2-SPIR"], "liver", None).startswith("unknown")
