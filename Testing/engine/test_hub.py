"""``medsegx weights download segvol`` against a local Hugging-Face-like HTTP server (never the internet)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from local_hub import LocalHub  # Testing/local_hub.py (Testing/ is on sys.path: conftest)
from medsegx_core.cli import main
from medsegx_core.errors import WeightsError
from medsegx_core.weights.hub import download
from medsegx_core.weights.store import load_model


@pytest.fixture()
def published_files(fixtures_dir):
    parity = fixtures_dir / "segvol_parity"
    files = {"pytorch_model.bin": parity / "public" / "hf_style.bin"}
    files.update({p.name: p for p in (parity / "tokenizer").iterdir()})
    return files


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return monkeypatch


def test_download_then_offline_reuse(env, tmp_path, published_files, capsys):
    with LocalHub(published_files) as hub:
        env.setenv("HF_ENDPOINT", hub.url)
        assert main(["weights", "download", "segvol"]) == 0
        folder = Path(capsys.readouterr().out.strip())
        assert folder.is_relative_to(tmp_path / "home" / "hub")
        assert (folder / "pytorch_model.bin").read_bytes() == published_files["pytorch_model.bin"].read_bytes()
        assert any(path.endswith("/BAAI/SegVol/resolve/main/pytorch_model.bin") for _, path in hub.requests)

        served = len(hub.requests)
        env.setenv("HF_HUB_OFFLINE", "1")
        assert download("segvol") == folder
        assert len(hub.requests) == served          # offline: not a single request

    # The downloaded folder is usable as --weights: tokenizer files were fetched beside the checkpoint.
    model = load_model(folder)
    with torch.no_grad():
        assert model.encode_text(["liver"]).shape == (1, 64)
    assert main(["weights", "list"]) == 0
    assert "downloaded" in capsys.readouterr().out


def test_offline_without_cache_is_a_clear_error(env):
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="not in the cache.*HF_HUB_OFFLINE"):
        download("segvol")


def test_repository_without_the_checkpoint(env, published_files):
    del published_files["pytorch_model.bin"]
    with LocalHub(published_files) as hub:
        env.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(WeightsError, match="has no pytorch_model.bin"):
            download("segvol")


@pytest.mark.slow  # huggingface_hub retries a refused connection five times with back-off (~24 s)
def test_unreachable_endpoint(env):
    with LocalHub({}) as hub:
        url = hub.url
    env.setenv("HF_ENDPOINT", url)   # the server is closed now
    with pytest.raises(WeightsError, match="cannot reach|failed"):
        download("segvol")
