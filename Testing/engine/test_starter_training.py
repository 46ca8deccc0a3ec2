"""Starter training infrastructure (the "train the base model" recipe of the one loop): the prepared training set,
sampling in worker processes (the same samples as in the main process), and ConMoAE experts trained with the
backbone and shipped as the weights folder's expert pack."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medsegx_core.errors import InputError, WeightsError
from medsegx_core.predictor import Predictor
from medsegx_core.training.starter_bundle import load_bundle
from medsegx_core.training.starter_data import structure_vocabulary
from medsegx_core.training.train_starter import StarterSize, save_starter, starter_config, train_starter
from medsegx_core.weights.store import EXPERTS_FILE, WEIGHTS_FILE, load_model

TINY = StarterSize(image_size=(16, 64, 64), patch_size=(4, 16, 16), width=32, layers=1, heads=2, decoder_mlp=32,
                   coordinates="aligned")


def _run(source, **kwargs):
    options = dict(seed=0, steps=2, batch_size=2, size=TINY, cases=["mr_abdomen"])
    options.update(kwargs)
    if source.suffix == ".npz":
        return train_starter(None, bundle=source, **options)
    return train_starter(source, **options)


def test_the_prepared_set_holds_exactly_the_loaded_cases(bundle):
    path, cases = bundle
    loaded, vocabulary, pooled = load_bundle(path)
    assert [c.key for c in loaded] == ["mr_abdomen"] and vocabulary == structure_vocabulary(cases)
    np.testing.assert_array_equal(loaded[0].labelled.image, cases[0].labelled.image)
    np.testing.assert_array_equal(loaded[0].labelled.labels, cases[0].labelled.labels)
    assert [(s.label, s.term.context.rows()) for s in loaded[0].structures] == \
        [(s.label, s.term.context.rows()) for s in cases[0].structures]
    assert pooled.shape == (len(vocabulary), 384)
    assert load_bundle(path, exclude_keys=["mr_abdomen"])[0] == []


def test_training_from_the_prepared_set_equals_training_from_the_data_folder(bundle, data_dir):
    """Same seed, same samples, same frozen sentence embeddings: the bundle (no volume reading, no text tower)
    trains exactly as the data folder does."""
    from_folder, from_bundle = _run(data_dir), _run(bundle[0])
    assert from_folder.losses == from_bundle.losses
    a, b = from_folder.model.state_dict(), from_bundle.model.state_dict()
    trained = [k for k, p in from_bundle.model.named_parameters() if p.requires_grad]
    assert trained and all(torch.equal(a[k], b[k]) for k in trained)
    assert from_bundle.model.config.text_encoder.kind == "minilm"     # saved as what it is used as


def test_a_bad_prepared_set_is_refused(tmp_path, bundle):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(bundle[0].read_bytes()[:5000])
    with pytest.raises(InputError, match="prepare it again"):
        load_bundle(broken)
    with pytest.raises(InputError, match="lacks case"):
        train_starter(None, bundle=bundle[0], steps=1, size=TINY, cases=["ct_abdomen"])


def test_worker_sampling_is_reproducible_and_experts_ship_in_the_weights_folder(bundle, tmp_path):
    first = _run(bundle[0], workers=1, with_experts=True)
    second = _run(bundle[0], workers=2, with_experts=True)
    in_process = _run(bundle[0], with_experts=True)
    assert first.losses == second.losses == in_process.losses     # samples do not depend on the workers
    experts = {k: v for k, v in first.model.state_dict().items() if k.startswith("conmoae.")}
    assert experts and any(v.abs().sum() > 0 for k, v in experts.items() if "context_tables" in k)  # trained

    folder = save_starter(first, tmp_path / "starter", {"note": "test"})
    assert (folder / EXPERTS_FILE).is_file()
    assert EXPERTS_FILE in (folder / "SHA256SUMS").read_text()
    assert not any(k.startswith("conmoae.") for k in load_file(str(folder / WEIGHTS_FILE)))   # base only
    loaded = load_model(folder, verify=True)
    assert loaded.conmoae.attached
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in experts.items())
    assert Predictor(loaded, device="cpu").has_experts


def test_an_expert_pack_beside_other_base_weights_is_refused(bundle, tmp_path):
    folder = save_starter(_run(bundle[0], with_experts=True), tmp_path / "starter", {})
    weights = load_file(str(folder / WEIGHTS_FILE))
    name = next(k for k in weights if k.startswith("mask_decoder."))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="other base weights"):
        load_model(folder)


def test_a_stage_stopped_early_is_reproduced_by_stop_after(bundle):
    full = _run(bundle[0], steps=3)
    stopped = _run(bundle[0], steps=3, stop_after=2)
    assert stopped.steps_done == 2 and stopped.losses == full.losses[:2]


def test_a_later_stage_refuses_weights_of_other_sizes(bundle, tmp_path):
    earlier = save_starter(_run(bundle[0], steps=1), tmp_path / "earlier", {})
    wider = StarterSize(**{**TINY.__dict__, "width": 64})
    with pytest.raises(InputError, match="do not fit this model"):
        _run(bundle[0], steps=1, size=wider, init=earlier)
    # the same sizes plus experts and dense marks may continue it
    marked = StarterSize(**{**TINY.__dict__, "dense_prompts": True})
    assert _run(bundle[0], steps=1, size=marked, init=earlier, with_experts=True).steps_done == 1


def test_the_command_line_trains_with_domain_randomisation_and_records_it(bundle, tmp_path, capsys):
    import json

    from medsegx_core.training.train_starter import main

    common = ["--bundle", str(bundle[0]), "--cases", "mr_abdomen", "--steps", "2", "--batch-size", "2",
              "--image-size", "16", "64", "64", "--width", "32", "--layers", "1", "--threads", "1",
              "--coordinates", "aligned"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "randomised"), "--domain-randomisation", "--coarse-only",
                          "--zoom-in-share", "0.25"]) == 0
    configs = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("plain", "randomised")}
    plain, randomised = configs["plain"]["source"], configs["randomised"]["source"]
    assert randomised["domain_randomisation"] is True and plain["domain_randomisation"] is False
    assert randomised["with_experts"] is False and randomised["recipe"] is None
    assert "--domain-randomisation" in randomised["command"]
    assert randomised["zoom_in_share"] == 0.25 and plain["zoom_in_share"] == 0.5
    assert configs["randomised"]["model"]["zoom_in"] is False and configs["plain"]["model"]["zoom_in"] is True
    assert load_model(tmp_path / "randomised").config.zoom_in is False
    # same seed, other samples: the flag reaches the sampler
    assert randomised["final_loss_mean_last_50"] != plain["final_loss_mean_last_50"]
    # bad options end with a one-line error, not a traceback, and write nothing
    assert main(common + ["--out", str(tmp_path / "wrong"), "--init", str(tmp_path / "missing")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "missing" in errors[0] and not (tmp_path / "wrong").exists()
    # --experts (a bool here once, an expert pack in 'medsegx segment') is now --with-experts: a usage error
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "old"), "--experts"])
    assert "--experts is now --with-experts" in capsys.readouterr().err and not (tmp_path / "old").exists()
