"""``medsegx weights download segvol`` against a local Hugging-Face-like HTTP server (never the internet)."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from medsegx_core.cli import main
from medsegx_core.errors import WeightsError
from medsegx_core.weights.hub import download
from medsegx_core.weights.store import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class LocalHub:
    """Serves ``/<repo>/resolve/<revision>/<file>`` (HEAD and GET) with the headers huggingface_hub reads."""

    def __init__(self, files: dict):
        self.files = files
        self.requests: list = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _answer(self, with_body: bool):
                hub.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                name = "/".join(parts[4:]) if len(parts) > 4 and parts[2] == "resolve" else None
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = Path(hub.files[name]).read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if with_body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


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
