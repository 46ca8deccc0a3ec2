"""Batch mode: ``medsegx_batch.py`` run as a separate process on plain Python with slicer-core (the same script
runs inside ``Slicer --no-main-window --python-script``): output file, exit codes, nothing overwritten."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import slicerio

import scene_builders as sb
from scene_builders import imported_weights  # noqa: F401 (a fixture)
from medsegx_core.data.readers import read_volume
from tiny_litemedsam import randomise_experts, tiny_folder, tiny_model   # Testing/tiny_litemedsam.py

SCRIPT = sb.MODULE_DIR / "medsegx_batch.py"
POINT_IJK = (50, 60, 15)


def run_batch(*args, timeout=300, **environment):
    env = dict(os.environ, OMP_NUM_THREADS="1", **environment)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_segments_and_writes_a_seg_nrrd_the_engine_agrees_with(data_dir, imported_weights, tmp_path):
    from medsegx_core.predictor import Predictor
    from medsegx_core.prompts import PointPrompt, Prompts
    from medsegx_core.weights.store import load_model

    ct_path = data_dir / sb.CT_SMALL
    volume = read_volume(ct_path)
    point = volume.ijk_to_ras_points(np.array(POINT_IJK, float))
    output = tmp_path / "liver.seg.nrrd"
    done = run_batch("--input", ct_path, "--text", "liver", "--point", *point, "--output", output,
                     "--weights", imported_weights, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "wrote segment 'liver'" in done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["liver.seg.nrrd"]  # no temporary file left behind

    read = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in read["segments"]] == ["liver"]
    assert np.allclose(read["ijkToLPS"], volume.ijk_to_lps, atol=1e-4)
    predictor = Predictor(load_model(imported_weights), device="cpu")
    predictor.set_volume(volume)
    expected = predictor.segment(Prompts(text="liver", points=(PointPrompt(tuple(point)),))).mask
    written = slicerio.segment_mask(read, read["segments"][0]["id"]).transpose(2, 1, 0)
    assert np.array_equal(written.astype(bool), expected.astype(bool))


def test_user_errors_exit_1_with_one_line_and_write_nothing(data_dir, imported_weights, tmp_path):
    ct_path = data_dir / sb.CT_SMALL
    output = tmp_path / "out.seg.nrrd"
    cases = [
        (["--input", tmp_path / "missing.nii.gz", "--text", "liver"], "missing.nii.gz: no such file"),
        (["--input", ct_path, "--text", "livr tumr xyz"], "unknown structure 'livr tumr xyz'"),
        (["--input", ct_path, "--point", 9999, 0, 0], "is outside the volume"),
    ]
    for args, message in cases:
        done = run_batch(*args, "--weights", imported_weights, "--output", output)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("medsegx_batch: error: ") and message in lines[0], lines
        assert not output.exists()


def test_existing_output_is_kept_without_overwrite(data_dir, imported_weights, tmp_path):
    output = tmp_path / "kept.seg.nrrd"
    output.write_bytes(b"the user's earlier result")
    done = run_batch("--input", data_dir / sb.CT_SMALL, "--text", "liver", "--output", output,
                     "--weights", imported_weights, "--device", "cpu")
    assert done.returncode == 1 and "already exists" in done.stderr
    assert output.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.seg.nrrd"]


@pytest.mark.slow  # two engine starts in a subprocess: about 30 s on a busy 2-core machine
def test_interrupt_exits_130_and_writes_nothing(data_dir, imported_weights, tmp_path):
    output = tmp_path / "interrupted.seg.nrrd"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--input", str(data_dir / sb.CT_SMALL), "--text", "liver",
         "--output", str(output), "--weights", str(imported_weights), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        for line in process.stdout:  # the engine reports progress (on stdout) once it has started
            if line.startswith("["):
                process.send_signal(signal.SIGINT)
                break
        rest = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == 130, rest
    assert "interrupted; nothing was written" in rest
    assert not output.exists()


def test_the_batch_script_takes_the_options_of_medsegx_segment_with_the_same_meaning():
    """One declaration (medsegx_core/cli/_segment_options.py): the same words give the same values and the same
    prompt sets in both command lines; only the input and output options are each its own."""
    import importlib.util

    from medsegx_core.cli import build_parser as medsegx_parser
    from medsegx_core.cli._segment_options import prompt_sets_from_options

    spec = importlib.util.spec_from_file_location("medsegx_batch", SCRIPT)
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    shared = ["--text", "liver", "--point", "1", "2", "3", "--negative-point", "4", "5", "6", "--box", "0", "0",
              "0", "9", "9", "9", "--propagate", "--name", "mine", "--weights", "w", "--tokenizer", "t", "--experts",
              "none", "--device", "cpu", "--precision", "bf16", "--modality", "MR", "--series-uid", "1.2.3",
              "--overwrite"]
    parsed = {}
    for words in ([], shared):       # the defaults, and every shared option given
        from_batch = batch.build_parser().parse_args(["--input", "v.nii.gz", "--output", "o.seg.nrrd", *words])
        from_segment = medsegx_parser().parse_args(["segment", "v.nii.gz", "-o", "o.seg.nrrd", *words])
        own = {"input", "output"}
        assert set(vars(from_batch)) - own <= set(vars(from_segment))
        assert {k: v for k, v in vars(from_batch).items() if k not in own} == \
            {k: vars(from_segment)[k] for k in vars(from_batch) if k not in own}
        parsed = (from_batch, from_segment)
    sets = [prompt_sets_from_options(args) for args in parsed]
    assert sets[0] == sets[1] and sets[0][0].text == "liver" and len(sets[0][0].points) == 2


def test_a_litemedsam_pack_in_experts_goes_with_the_box_as_in_medsegx_segment(data_dir, tmp_path, monkeypatch):
    """``--experts`` naming a LiteMedSAM pack: the box runs LiteMedSAM with the pack, mask for mask what ``medsegx
    segment`` gives with the same pack; without the pack the mask differs (the pack was used)."""
    from medsegx_core.cli import main
    from medsegx_core.modeling.conmoae import ConMoAEConfig, attach_experts_to_model
    from medsegx_core.training.finetune import base_sha256
    from medsegx_core.weights.expert_pack import save_expert_pack

    home = tmp_path / "home"
    tiny_folder(tiny_model(), home / "weights" / "tiny_litemedsam")     # the LiteMedSAM boxes run
    model = tiny_model()
    attach_experts_to_model(model, ConMoAEConfig())
    randomise_experts(model, scale=0.5)
    pack = save_expert_pack(tmp_path / "lite.safetensors", model, ("conmoae.",), base_sha256(tiny_model()))
    ct_path = data_dir / sb.CT_SMALL
    volume = read_volume(ct_path)
    box = volume.ijk_to_ras_points(np.array([[20.0, 25.0, 12.0], [80.0, 75.0, 16.0]])).ravel()

    output = tmp_path / "batch.seg.nrrd"
    done = run_batch("--input", ct_path, "--box", *box, "--experts", pack, "--name", "thing", "--output", output,
                     "--device", "cpu", MEDSEGX_HOME=str(home))
    assert done.returncode == 0, done.stderr
    read = slicerio.read_segmentation(str(output))
    batch = slicerio.segment_mask(read, read["segments"][0]["id"]).transpose(2, 1, 0).astype(bool)
    monkeypatch.setenv("MEDSEGX_HOME", str(home))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    cli = {}
    for name, extra in (("pack", ["--experts", str(pack)]), ("base", [])):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["segment", str(ct_path), "--box", *map(str, box), *extra, "--device", "cpu", "-o",
                     str(out)]) == 0
        cli[name] = read_volume(out).array > 0
    assert batch.any() and np.array_equal(batch, cli["pack"])
    assert not np.array_equal(cli["pack"], cli["base"])
