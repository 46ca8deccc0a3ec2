"""The official-code benchmark's harness (Testing/benchmarks/bench_official.py) on the fetched SegVol sources:
its run-time patches apply, and the tiny official model (built by the patched official code, seed-0 random
weights, saved as safetensors) and ours loaded from that file give the same zoom-out logits.

The official code is never part of this repository: it is extracted from the fetched copy into tmp_path. The
tests skip when that copy (``SEGVOL_OFFICIAL_SRC``, default ../.mirror/BAAI-DCAI+SegVol/repo beside the
checkout), git, or the parity fixture is absent.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from fixture_paths import REPO_ROOT, SEGVOL_FIXTURE

sys.path.insert(0, str(REPO_ROOT / "Testing" / "benchmarks"))
import bench_official  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def official_src(tmp_path_factory):
    source = bench_official.DEFAULT_OFFICIAL_SRC
    if not source.exists() or shutil.which("git") is None:
        pytest.skip(f"the fetched SegVol code ({source}) or git is absent; set SEGVOL_OFFICIAL_SRC")
    if not bench_official.FIXTURE_CONFIG.is_file():
        pytest.skip(f"{bench_official.FIXTURE_CONFIG} is absent")
    folder = tmp_path_factory.mktemp("segvol")
    bench_official.extract_official(source, "HEAD", folder)
    patches = bench_official.patch_official(folder, bench_official.preset_widths("tiny"))
    return folder, patches


def test_patches_apply_to_the_fetched_sources(official_src):
    folder, patches = official_src
    assert len(patches) == 6      # the five compatibility patches and the tiny widths
    for relative in ("inference_demo.py", "network/model.py", "utils/monai_inferers_utils.py"):
        text = (folder / relative).read_text()
        assert ".cuda()" not in text
        compile(text, relative, "exec")
    assert not list(folder.rglob("__pycache__"))
    assert "proj_type=pos_embed" in (folder / "segment_anything_volumetric" / "build_sam.py").read_text()


@pytest.fixture
def official_modules(official_src):
    """The patched official modules imported here, and removed again (their names, e.g. ``utils``, are generic)."""
    pytest.importorskip("monai")
    pytest.importorskip("einops")
    folder, _ = official_src
    before, path = set(sys.modules), list(sys.path)
    try:
        yield bench_official.import_official(str(folder)), folder
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - before:
            if str(folder) in str(getattr(sys.modules[name], "__file__", "") or ""):
                del sys.modules[name]


def test_tiny_official_model_and_ours_give_the_same_zoom_out_logits(official_modules, tmp_path):
    import torch

    demo, folder = official_modules
    widths = bench_official.preset_widths("tiny")
    args = bench_official.official_args(str(bench_official.clip_folder(folder, widths, tmp_path)))
    weights = str(tmp_path / "seed0.safetensors")
    official, _, state = bench_official.make_weights(demo, args, weights)
    assert official.image_encoder.patch_embedding.position_embeddings.shape[-1] == widths["embed_dim"]
    image = torch.from_numpy(np.load(SEGVOL_FIXTURE / "public" / "model_input.npz")["image"])
    box = torch.tensor([[20.0, 66.0, 78.0, 31.0, 229.0, 219.0]])
    check = bench_official.zoom_out_check(official, weights, str(SEGVOL_FIXTURE / "tokenizer"), image, "liver", box)
    assert check["zoom_out_max_abs_logit"] > 0
    assert check["zoom_out_max_abs_diff"] <= 1e-4
