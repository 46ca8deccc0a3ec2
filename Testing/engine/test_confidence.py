"""Presence confidence (inference/confidence.py): a score from the model's own zoom-out logits that says whether
the prompted structure is in the volume at all, reported with every result and warned about when low."""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.data.readers import read_volume
from medsegx_core.inference.confidence import PRESENCE_WARNING_BELOW, absence_warning, presence_confidence
from medsegx_core.predictor import Predictor
from medsegx_core.prompts import Prompts
from medsegx_core.weights.default import starter_weights_dir
from medsegx_core.weights.store import load_model


@pytest.fixture(scope="module")
def ct_predictor(reference_ct):
    predictor = Predictor(load_model(starter_weights_dir()), device="cpu")
    predictor.set_volume(read_volume(reference_ct))
    return predictor


def test_confidence_is_the_mean_probability_inside_the_mask():
    logits = np.array([[[4.0, 0.0, -4.0, 2.0]]], dtype=np.float32)
    mask = logits > 0
    expected = np.mean(1.0 / (1.0 + np.exp(-logits[mask])))
    assert presence_confidence(logits, mask) == pytest.approx(expected)
    assert presence_confidence(logits, np.zeros_like(mask)) == 0.0     # nothing segmented: nothing is there


def test_warning_names_the_structure_only_below_the_threshold():
    low = absence_warning("left kidney", PRESENCE_WARNING_BELOW - 0.01)
    assert "'left kidney' may not be in this volume" in low and "--min-confidence" in low
    assert absence_warning("left kidney", PRESENCE_WARNING_BELOW) is None
    assert "prompted structure" in absence_warning(None, 0.0)


def test_every_result_carries_the_confidence_of_its_zoom_out_pass(ct_predictor):
    prompts = Prompts(text="liver")
    result = ct_predictor.segment(prompts)
    coarse = ct_predictor.zoom_out(ct_predictor.map_prompts(prompts))
    assert result.confidence == pytest.approx(presence_confidence(coarse.logits, coarse.foreground))
    assert PRESENCE_WARNING_BELOW <= result.confidence <= 1.0     # the liver of the CT is there
    assert not any("may not be in this volume" in note for note in result.notes)
