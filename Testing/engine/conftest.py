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
