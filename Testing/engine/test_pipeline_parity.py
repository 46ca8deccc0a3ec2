"""The whole zoom-out-zoom-in pipeline in `official` mode reproduces the SegVol fixture (README 5, 6, 7).

Everything comes from the fixture folder (``$MEDSEGX_SEGVOL_FIXTURE``, default ../shared/fixtures/segvol_parity):
the volume (``pipeline_preprocess.npz:raw_volume``), the checkpoint and tokenizer, the cases and their prompts
(``fixtures.json -> summary.pipeline``: category, text/box/point use; the box is the category's
``summary.<category>_box``), and every expected array, shape and float32 sum. Each step of ``Predictor.segment`` is
compared with what the fixture stores for it, within the README's tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest

from fixture_paths import SEGVOL_FIXTURE, fixture_record
from medsegx_core.data.volume import Volume
from medsegx_core.predictor import Predictor
from medsegx_core.prompts import BoxPrompt, Prompts
from medsegx_core.weights.store import load_model


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        cases = sorted(fixture_record(SEGVOL_FIXTURE).get("summary", {}).get("pipeline", {}))
        metafunc.parametrize("case_name", cases, scope="module")


@pytest.fixture(scope="module")
def record(segvol_fixture):
    return fixture_record(segvol_fixture)


@pytest.fixture(scope="module")
def preprocessed(segvol_fixture):
    return np.load(segvol_fixture / "public" / "pipeline_preprocess.npz")


@pytest.fixture(scope="module")
def predictor(segvol_fixture, preprocessed):
    model = load_model(segvol_fixture / "public" / "model.safetensors", tokenizer=segvol_fixture / "tokenizer")
    predictor = Predictor(model, device="cpu", precision="fp32", preprocessing="official")
    # The official pipeline never looks at the geometry (README 5.1): a plain grid of the stored voxels.
    predictor.set_volume(Volume(preprocessed["raw_volume"], (1.0, 1.0, 1.0), np.zeros(3), np.eye(3)))
    return predictor


def case_prompts(summary: dict, name: str) -> Prompts:
    """The prompts the official demo derived for a pipeline case (README 5.2)."""
    case = summary["pipeline"][name]
    assert not case["use_point"], "the official pipeline draws points at random: the recipe stores none"
    box = None
    if case["use_box"]:
        zyx = summary[f"{case['category']}_box"]["original_zyx_inclusive"]
        box = BoxPrompt(tuple(zyx[2::-1]), tuple(zyx[5:2:-1]), space="ijk")     # (Z, Y, X) -> (i, j, k)
    return Prompts(text=case["category"] if case["use_text"] else None, box=box)


@pytest.fixture(scope="module")
def case(case_name, predictor, record, segvol_fixture):
    """Our result and each step's products for one case, with the fixture's arrays."""
    prompts = case_prompts(record["summary"], case_name)
    result = predictor.segment(prompts, return_logits=True)
    crop = predictor.map_prompts(prompts)            # the steps again: answered from segment()'s caches
    coarse = predictor.zoom_out(crop)
    plan = predictor.plan_zoom_in(coarse, crop)
    windows = [predictor.decode_window(plan, index, crop, coarse) for index in range(len(plan))] if plan else []
    stored = f"pipeline_{case_name}.npz"
    reference = np.load(segvol_fixture / "public" / stored)
    return dict(name=case_name, result=result, coarse=coarse, plan=plan, windows=windows, reference=reference,
                stats=record["arrays"][stored], summary=record["summary"]["pipeline"][case_name])


def assert_float16_copy_close(ours: np.ndarray, stored: np.ndarray, float32_sum: float) -> None:
    """README 7: |diff| <= 1e-3 |ref| + 1e-4 against the float16 copy; the float64 sum of our float32 values
    within 1e-5 relative of the float32 original's (fixtures.json)."""
    reference = stored.astype(np.float32)
    excess = np.abs(ours - reference) - (1e-3 * np.abs(reference) + 1e-4)
    assert excess.max() <= 0, f"max excess over tolerance {excess.max():.3g}"
    assert ours.astype(np.float64).sum() == pytest.approx(float32_sum, rel=1e-5)


def assert_masks_equal_away_from_threshold(mask: np.ndarray, stored_mask: np.ndarray, stored_logits) -> None:
    differ = mask.astype(bool) != stored_mask.astype(bool)
    assert not np.any(differ & (np.abs(stored_logits.astype(np.float32)) >= 1e-3)), \
        f"{int(differ.sum())} mask voxels differ where the stored logit is not near 0"


def test_zoom_out_call(case):
    reference, coarse = case["reference"], case["coarse"]
    if "zoomout_box" in reference.files:
        np.testing.assert_array_equal(coarse.model_box, reference["zoomout_box"][0])
        np.testing.assert_array_equal(coarse.model_box, case["summary"]["zoomout_prompt"]["box"])
    else:
        assert coarse.model_box is None and case["summary"]["zoomout_prompt"]["box"] is None
    np.testing.assert_allclose(coarse.logits_lowres.numpy(), reference["zoomout_logits_lowres"], rtol=0, atol=1e-4)


def test_zoom_out_logits_back_on_the_crop(case, predictor):
    ours = predictor.maps.back_to_crop(case["coarse"].logits)
    stored = case["reference"]["zoomout_logits_back"]
    assert ours.shape == stored.shape == predictor.prepared.cropped_shape
    assert_float16_copy_close(ours, stored, case["stats"]["zoomout_logits_back"]["stats_of_float32_source"]["sum"])


def test_region_of_interest_and_windows(case):
    reference, plan = case["reference"], case["plan"]
    np.testing.assert_array_equal(plan.roi_dhw, reference["roi_dhw"])
    crop_shape = [hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi)]
    np.testing.assert_array_equal(crop_shape, reference["roi_crop_shape"])
    np.testing.assert_array_equal(plan.starts_padded, reference["window_starts_padded_dhw"])
    np.testing.assert_array_equal(plan.pad_before, reference["window_pad_before_dhw"])
    np.testing.assert_array_equal(plan.pad_after, reference["window_pad_after_dhw"])
    assert case["result"].windows == len(reference["window_starts_padded_dhw"]) == case["summary"]["n_windows"]


def test_window_prompts(case):
    windows, reference = case["windows"], case["reference"]
    assert len(windows) == len(reference["window_boxes"])
    for window, stored in zip(windows, reference["window_boxes"]):
        if np.isnan(stored).all():
            assert window.prompts.box is None
        else:
            np.testing.assert_array_equal(window.prompts.box, stored)
    assert all(len(window.prompts.points) == 0 for window in windows)     # the recipe has no points


def test_window_logits(case):
    ours = np.concatenate([window.logits_lowres.numpy() for window in case["windows"]], axis=0)
    np.testing.assert_allclose(ours, case["reference"]["window_logits_lowres"], rtol=0, atol=1e-4)


def test_final_logits_and_masks(case, predictor, preprocessed):
    result, reference = case["result"], case["reference"]
    crop = predictor.prepared.crop_slices          # the official profile works on the stored grid
    stored = reference["final_logits_cropped"]
    assert_float16_copy_close(result.logits[crop], stored,
                              case["stats"]["final_logits_cropped"]["stats_of_float32_source"]["sum"])
    assert_masks_equal_away_from_threshold(result.mask[crop], reference["final_mask_cropped"], stored)
    # On the input grid: the fixture pastes the crop into zeros; outside the crop there are no logits.
    lo, hi = preprocessed["crop_lo_zyx"], preprocessed["crop_hi_zyx_inclusive"] + 1
    assert predictor.prepared.crop_slices == tuple(slice(a, b) for a, b in zip(lo, hi))
    assert result.mask.shape == reference["final_mask_original"].shape and result.mask.dtype == np.uint8
    padded_logits = np.full(result.mask.shape, -1.0, np.float32)
    padded_logits[crop] = stored.astype(np.float32)
    assert_masks_equal_away_from_threshold(result.mask, reference["final_mask_original"], padded_logits)
    assert result.name == case["summary"]["category"]


def test_rolling_blend_equals_the_plain_average():
    """RegionBlender hands over finished slabs row by row; the result equals averaging all windows at once."""
    from medsegx_core.inference.zoom_in import RegionBlender, WindowPlan

    window = (4, 6, 6)
    plan = WindowPlan.official((1, 0, 2), (13, 9, 16), (20, 10, 17), window)   # several rows on every axis
    assert len({o[0] for o in plan.origins}) >= 3 and len({o[1] for o in plan.origins}) >= 2
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=window).astype(np.float32) for _ in plan.origins]
    shape = tuple(hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi))
    total, count = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for index, values in enumerate(logits):
        crop, local = plan.readable(index)
        target = tuple(slice(c.start - lo, c.stop - lo) for c, lo in zip(crop, plan.region_lo))
        total[target] += values[local]
        count[target] += 1
    result = np.full(shape, np.nan, np.float32)

    def receive(start, stop, slab, covered):
        assert np.isnan(result[start:stop]).all() and covered is None   # each slice once, every voxel covered
        result[start:stop] = slab

    blender = RegionBlender(plan, receive)
    for index, values in enumerate(logits):
        blender.add(index, values)
    blender.finish()
    np.testing.assert_allclose(result, total / count, rtol=1e-6, atol=1e-6)
