"""The whole zoom-out-zoom-in pipeline in `official` mode reproduces the SegVol fixture (README 5, 6, 7).

The real reference CT is read from ../shared/data, the fixture checkpoint is loaded, and every intermediate the
fixture stores is compared with the Predictor's trace within the README's tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.data.readers import read_volume
from medsegx_core.predictor import Predictor
from medsegx_core.prompts import BoxPrompt, Prompts
from medsegx_core.weights.store import load_model

# The liver box of the fixture (crop = original indices here) as an ITK (i, j, k) voxel box.
LIVER_BOX_IJK = BoxPrompt((37, 25, 69), (104, 86, 111), space="ijk")
CASES = {
    "liver_text_box": Prompts(text="liver", box=LIVER_BOX_IJK),
    "spleen_text": Prompts(text="spleen"),
}


@pytest.fixture(scope="module")
def predictor(fixtures_dir, data_dir):
    segvol = fixtures_dir / "segvol_parity"
    model = load_model(segvol / "public" / "model.safetensors", tokenizer=segvol / "tokenizer")
    predictor = Predictor(model, device="cpu", precision="fp32", preprocessing="official")
    predictor.set_volume(read_volume(data_dir / "ct" / "totalseg_ct.nii.gz"))
    return predictor


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, predictor, fixtures_dir):
    trace = {}
    result = predictor.segment(CASES[request.param], trace=trace)
    reference = np.load(fixtures_dir / "segvol_parity" / "public" / f"pipeline_{request.param}.npz")
    return request.param, result, trace, reference


def assert_float16_copy_close(ours: np.ndarray, stored: np.ndarray) -> None:
    """README 7: |diff| <= 1e-3 |ref| + 1e-4 against the float16 copy."""
    reference = stored.astype(np.float32)
    excess = np.abs(ours - reference) - (1e-3 * np.abs(reference) + 1e-4)
    assert excess.max() <= 0, f"max excess over tolerance {excess.max():.3g}"


def assert_masks_equal_away_from_threshold(mask: np.ndarray, stored_mask: np.ndarray, stored_logits) -> None:
    differ = mask.astype(bool) != stored_mask.astype(bool)
    assert not np.any(differ & (np.abs(stored_logits.astype(np.float32)) >= 1e-3)), \
        f"{int(differ.sum())} mask voxels differ where the stored logit is not near 0"


def test_zoom_out_call(case):
    name, _, trace, reference = case
    if name == "liver_text_box":
        np.testing.assert_array_equal(trace["zoomout_box"], reference["zoomout_box"][0])
    else:
        assert trace["zoomout_box"] is None
    np.testing.assert_allclose(trace["zoomout_logits_lowres"], reference["zoomout_logits_lowres"],
                               rtol=0, atol=1e-4)


def test_zoom_out_logits_back_on_the_crop(case):
    _, _, trace, reference = case
    ours, stored = trace["zoomout_logits_back"], reference["zoomout_logits_back"]
    assert ours.shape == stored.shape == (112, 97, 122)
    assert_float16_copy_close(ours, stored)


def test_region_of_interest_and_windows(case):
    _, result, trace, reference = case
    np.testing.assert_array_equal(trace["roi_dhw"], reference["roi_dhw"])
    plan = trace["plan"]
    crop_shape = [hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi)]
    np.testing.assert_array_equal(crop_shape, reference["roi_crop_shape"])
    np.testing.assert_array_equal(plan.starts_padded, reference["window_starts_padded_dhw"])
    np.testing.assert_array_equal(plan.pad_before, reference["window_pad_before_dhw"])
    np.testing.assert_array_equal(plan.pad_after, reference["window_pad_after_dhw"])
    assert result.windows == len(reference["window_starts_padded_dhw"])


def test_window_prompts(case):
    _, _, trace, reference = case
    assert len(trace["window_boxes"]) == len(reference["window_boxes"])
    for ours, stored in zip(trace["window_boxes"], reference["window_boxes"]):
        if np.isnan(stored).all():
            assert ours is None
        else:
            np.testing.assert_array_equal(ours, stored)
    assert all(len(points) == 0 for points, _ in trace["window_points"])


def test_window_logits(case):
    _, _, trace, reference = case
    ours = np.concatenate(trace["window_logits_lowres"], axis=0)
    np.testing.assert_allclose(ours, reference["window_logits_lowres"], rtol=0, atol=1e-4)


def test_final_logits_and_masks(case):
    _, result, trace, reference = case
    final, stored = trace["final_logits_cropped"], reference["final_logits_cropped"]
    assert_float16_copy_close(final, stored)
    stored_sum = {"liver_text_box": -1319408.5374692648, "spleen_text": -1877495.8557560267}[case[0]]
    assert final.astype(np.float64).sum() == pytest.approx(stored_sum, rel=1e-5)
    assert_masks_equal_away_from_threshold(trace["final_mask_cropped"], reference["final_mask_cropped"], stored)
    # On the input grid (the crop here starts at 0 and the three cropped-away rows are background).
    assert result.mask.shape == reference["final_mask_original"].shape and result.mask.dtype == np.uint8
    padded_logits = np.full(result.mask.shape, -1.0, np.float32)
    padded_logits[:, :97, :] = stored.astype(np.float32)
    assert_masks_equal_away_from_threshold(result.mask, reference["final_mask_original"], padded_logits)
    assert result.name == case[0].split("_")[0]


def test_rolling_blend_equals_the_plain_average():
    """RegionBlender hands over finished slabs row by row; the result equals averaging all windows at once."""
    from medsegx_core.inference.zoom import RegionBlender, WindowPlan

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

    def receive(start, stop, slab):
        assert np.isnan(result[start:stop]).all()      # each slice handed over exactly once
        result[start:stop] = slab

    blender = RegionBlender(plan, receive)
    for index, values in enumerate(logits):
        blender.add(index, values)
    blender.finish()
    np.testing.assert_allclose(result, total / count, rtol=1e-6, atol=1e-6)
