"""The Models panel through the Logic: the official weights downloaded from a local Hugging-Face-like server on
127.0.0.1 (never the internet) into $MEDSEGX_HOME with byte progress, converted and selected; Cancel in the middle
of the transfer and a checksum mismatch leave nothing in the cache; the listing (source, size, licence, devices),
the offline instructions and the remembered choice."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from local_hub import LocalHub  # Testing/local_hub.py
from scene_builders import imported_weights  # noqa: F401 (fixture; also puts MedSegXSlicerLib on sys.path)
from MedSegXSlicerLib import MedSegXSlicerLogic, models
from medsegx_core.errors import Cancelled, WeightsError
from medsegx_core.progress import CancelToken
from medsegx_core.weights.default import starter_weights_dir
from medsegx_core.weights.hub import check_free_space

@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "medsegx home"
    monkeypatch.setenv("MEDSEGX_HOME", str(home))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


@pytest.fixture
def published(fixtures_dir):
    parity = fixtures_dir / "segvol_parity"
    files = {"pytorch_model.bin": parity / "public" / "hf_style.bin"}
    files.update({p.name: p for p in (parity / "tokenizer").iterdir()})
    return files


@pytest.fixture
def logic():
    logic = MedSegXSlicerLogic(device="cpu")
    yield logic
    logic.cleanup()


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_download_shows_licence_first_then_progress_converts_and_selects(home, published, logic, monkeypatch):
    with LocalHub(published) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        offer = logic.downloadOffer()
        assert "Licence: Apache-2.0" in offer and "BAAI/SegVol" in offer and str(home / "weights" / "segvol") in offer
        assert hub.requests == []  # the offer is shown before anything is fetched
        assert logic.describeWeights()[0] == starter_weights_dir()

        seen = []
        folder = logic.downloadWeights(progress=lambda fraction, message: seen.append((fraction, message)))
        assert len(hub.requests) < 40

    assert folder == home / "weights" / "segvol" and (folder / "model.safetensors").is_file()
    byte_messages = [m for _, m in seen if "MB at" in m]
    size = published["pytorch_model.bin"].stat().st_size / 1e6
    assert f"pytorch_model.bin: {size:.1f} of {size:.1f} MB at " in byte_messages[0]
    assert all(m.endswith(" MB/s") for m in byte_messages)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    path, explanation = logic.describeWeights()
    assert path == folder and "official weights" in explanation and logic.modelLabel() == "official SegVol"

    listed = {entry.kind: entry for entry in logic.availableModels()}
    official = listed["official"]
    assert official.installed and official.path == folder and official.licence == "Apache-2.0"
    assert official.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert "BAAI/SegVol" in official.source and "cpu" in official.devices
    # the hub cache holds exactly the served files, verified, beside the converted folder
    blobs = [p for p in (home / "hub").rglob("*") if p.is_file() and "blobs" in p.parts]
    assert sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in blobs) == \
        sorted(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in published.values())


def test_cancel_mid_download_leaves_nothing_in_the_cache(home, published, logic, monkeypatch):
    big = bytes(range(256)) * (24 * 4096)   # 24 MiB: the client reads 10 MiB chunks
    token = CancelToken()
    with LocalHub(dict(published, **{"pytorch_model.bin": big}), gate_after=11 << 20) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)

        seen = []

        def press_cancel(fraction, message):
            if "MB at" in message:        # bytes are arriving: the user presses Cancel
                seen.append(message)
                token.cancel()
                hub.gate.set()

        with pytest.raises(Cancelled):
            logic.downloadWeights(progress=press_cancel, cancel=token)
    assert seen and seen[0].startswith("pytorch_model.bin: 10.5 of 25.2 MB at ")  # cancelled mid-file
    assert files_under(home) == []
    assert logic.describeWeights()[0] == starter_weights_dir()  # the weights in use did not change


def test_checksum_mismatch_is_refused_and_removed(home, published, logic, monkeypatch):
    with LocalHub(published, etags={"pytorch_model.bin": hashlib.sha256(b"other bytes").hexdigest()}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(WeightsError, match="pytorch_model.bin failed its checksum.*the file was removed"):
            logic.downloadWeights()
    assert files_under(home) == []
    assert not (home / "weights" / "segvol").exists()


def test_free_disk_check_refuses_before_writing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(WeightsError, match=r"needs \d+ MB but only \d+ MB are free.*MEDSEGX_HOME"):
        check_free_space(tmp_path / "not yet there", free + (1 << 40), "downloading BAAI/SegVol")
    check_free_space(tmp_path, 1, "a tiny download")


def test_listing_offline_instructions_and_remembered_choice(home, imported_weights, logic):
    listed = logic.availableModels()
    starter = next(e for e in listed if e.kind == "starter")
    assert starter.path == starter_weights_dir() and starter.size_bytes > 1e5 and "MODEL_CARD" in starter.source
    assert starter.licence and starter.devices[-1] == "cpu"
    assert not next(e for e in listed if e.kind == "official").installed
    from medsegx_core.weights.expert_pack import bundled_pack_list
    shipped = [f"{p.name} (bundled{'' if p.base_model == 'SegVol' else ', ' + p.base_model})"
               for p in bundled_pack_list()]    # a LiteMedSAM pack of the same name is told apart
    assert [e.name for e in listed if e.kind == "expert pack"] == ["starter experts (bundled)"] + shipped
    assert "abdominal_mr (bundled)" in shipped
    # the pack menu offers all but the starter's own (its first item, "the weights' own experts")
    assert [e.name for e in listed if e.choosable_pack] == shipped
    assert "experts trained on" in next(e for e in listed if e.kind == "expert pack").source

    shutil.copytree(imported_weights, home / "weights" / "tiny")
    imported = [e for e in logic.availableModels() if e.kind == "imported"]
    assert [e.name for e in imported] == ["tiny"] and "imported from" in imported[0].source
    assert "tiny" in imported[0].describe() and "MB" in imported[0].describe()

    instructions = logic.offlineInstructions()
    assert "pytorch_model.bin" in instructions and "Import checkpoint" in instructions
    assert str(home / "weights" / "segvol") in instructions

    class QSettingsLike(dict):  # Slicer passes slicer.app.settings() (a QSettings); Qt is not available here
        def setValue(self, key, value):
            self[key] = value

        def value(self, key, default=None):
            return self.get(key, default)

    settings = QSettingsLike()
    logic.selectWeights(home / "weights" / "tiny")
    logic.expertPack = "none"
    logic.device = "cpu"
    logic.saveChoice(settings)
    again = MedSegXSlicerLogic()
    try:
        path, _ = again.restoreChoice(settings)
        assert path == home / "weights" / "tiny" and again.expertPack == models.NO_EXPERTS
        assert again.device == "cpu" and again.modelLabel() == "weights 'tiny' without experts"
        shutil.rmtree(home / "weights" / "tiny")   # a remembered folder that is gone falls back to the default
        assert again.restoreChoice(settings)[0] == starter_weights_dir()
    finally:
        again.cleanup()
