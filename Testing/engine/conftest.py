"""Engine-test fixtures shared by several modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model(fixtures_dir):
    """The SegVol parity fixture's tiny model (official widths' layout, random weights), fresh per test module:
    a reduced-precision Predictor may store its weights in bf16, so modules do not share one instance."""
    from medsegx_core.weights.store import load_model

    segvol = fixtures_dir / "segvol_parity"
    return load_model(segvol / "public" / "model.safetensors", tokenizer=segvol / "tokenizer")


@pytest.fixture(scope="module")
def bundle(data_dir, tmp_path_factory):
    """The abdominal MR case prepared as ``train_starter --prepare`` does (one case keeps it quick): (path, cases)."""
    from medsegx_core.modeling.build import build_model
    from medsegx_core.training.starter_bundle import save_bundle
    from medsegx_core.training.starter_data import case_specs, load_cases, structure_vocabulary
    from medsegx_core.training.train_starter import sentence_embeddings, starter_config

    cases = load_cases(data_dir, case_specs(["mr_abdomen"]))
    vocabulary = structure_vocabulary(cases)
    pooled = sentence_embeddings(build_model(starter_config()), vocabulary).numpy()
    path = tmp_path_factory.mktemp("bundle") / "set.npz"
    save_bundle(path, cases, vocabulary, pooled)
    return path, cases
