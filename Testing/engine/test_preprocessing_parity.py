"""The `official` preprocessing and the zoom index maps reproduce the SegVol fixture (README 5.1, 5.2, 7).

Inputs, expected statistics, shapes and boxes come from the fixture folder (``$MEDSEGX_SEGVOL_FIXTURE``):
``pipeline_preprocess.npz``, ``model_input.npz`` and ``fixtures.json -> summary``.
"""
from __future__ import annotations

import numpy as np
import pytest

from fixture_paths import fixture_record, is_default_fixture
from medsegx_core.data.readers import read_volume
from medsegx_core.errors import InputError
from medsegx_core.inference.preprocessing import preprocess
from medsegx_core.inference.zoom import ZoomMaps


@pytest.fixture(scope="module")
def reference(segvol_fixture):
    public = segvol_fixture / "public"
    return np.load(public / "pipeline_preprocess.npz"), np.load(public / "model_input.npz")


@pytest.fixture(scope="module")
def summary(segvol_fixture):
    return fixture_record(segvol_fixture)["summary"]


@pytest.fixture(scope="module")
def model_shape(summary):
    return tuple(summary["preprocess"]["zoom_out_shape"])


@pytest.fixture(scope="module")
def official(reference):
    raw = reference[0]["raw_volume"]
    return preprocess(raw, np.eye(3), "official")


def test_reference_ct_file_is_the_fixture_volume(reference_ct, segvol_fixture, reference):
    """The engine tests that use the reference CT with the fixture's model rely on this (public fixture only)."""
    if not is_default_fixture(segvol_fixture):
        pytest.skip("another fixture's volume is not the project's reference CT")
    np.testing.assert_array_equal(read_volume(reference_ct).array, reference[0]["raw_volume"])


def test_foreground_normalisation_statistics(official, summary):
    # fixtures.json -> summary.preprocess (also printed in the README, 5.1 step 2)
    expected, minmax = summary["preprocess"]["foreground_normalisation"], summary["preprocess"]["minmax"]
    stats = official.stats
    assert stats.threshold == pytest.approx(expected["fg_threshold_mean"], abs=1e-4)
    assert stats.foreground_count == expected["fg_count"]
    assert stats.lower == pytest.approx(expected["fg_lower_p00_05"], abs=1e-4)
    assert stats.upper == pytest.approx(expected["fg_upper_p99_95"], abs=1e-3)
    assert stats.mean == pytest.approx(expected["fg_mean"], abs=1e-4)
    assert stats.std == pytest.approx(expected["fg_std"], abs=1e-3)
    assert stats.minmax_min == pytest.approx(minmax["min_before"], abs=1e-5)
    assert stats.minmax_range == pytest.approx(minmax["range_before"], abs=1e-5)


def test_crop_bounds_and_normalised_crop(official, reference, summary):
    pre = reference[0]
    assert official.cropped_shape == tuple(summary["preprocess"]["cropped_shape_zyx"])
    assert official.crop_lo == tuple(pre["crop_lo_zyx"])
    assert tuple(h - 1 for h in official.crop_hi) == tuple(pre["crop_hi_zyx_inclusive"])
    np.testing.assert_allclose(official.cropped, pre["normalised_cropped"], rtol=0, atol=1e-6)
    assert official.cropped.dtype == np.float32


def test_index_maps_match_torch_resizes_of_the_fixture(official, reference, summary, model_shape):
    pre = reference[0]
    maps = ZoomMaps.build(official.cropped_shape, model_shape)
    for axis, name in enumerate("dhw"):
        np.testing.assert_array_equal(maps.out[axis], pre[f"zoom_index_{name}"])
        np.testing.assert_array_equal(maps.back[axis], pre[f"back_index_{name}"])
    # The resizes differ from exact rational arithmetic where float32 rounding moves an index (README 5.2: the
    # legacy `nearest` rule at one W index of the public fixture); fixtures.json counts them per axis.
    mismatches = summary["resize_index_maps"]
    for axis, (crop, model) in enumerate(zip(official.cropped_shape, model_shape)):
        exact_out = ((2 * np.arange(model) + 1) * crop) // (2 * model)      # floor((j + 0.5) * in / out)
        exact_back = (np.arange(crop) * model) // crop                      # floor(j * in / out)
        assert int((maps.out[axis] != exact_out).sum()) == \
            mismatches["zoom_out_nearest_exact_mismatch_vs_exact_rational_formula"][axis]
        assert int((maps.back[axis] != exact_back).sum()) == \
            mismatches["back_nearest_mismatch_vs_exact_rational_formula"][axis]


def test_zoom_out_model_input(official, reference, model_shape):
    maps = ZoomMaps.build(official.cropped_shape, model_shape)
    image = maps.zoom_out(official.cropped)
    np.testing.assert_allclose(image, reference[1]["image"][0, 0], rtol=0, atol=1e-6)


def test_zoomed_box_from_a_box_cube(official, summary, model_shape):
    # Each box of the summary (the prompt box of the pipeline's box case), in crop indices, resizes to the
    # fixture's zoomed box, exactly as resizing a cube of it does.
    maps = ZoomMaps.build(official.cropped_shape, model_shape)
    boxes = {key: value for key, value in summary.items() if key.endswith("_box")}
    assert boxes
    for box in boxes.values():
        crop = box["cropped_zyx_inclusive"]
        np.testing.assert_array_equal(maps.box_to_model(crop[:3], crop[3:]),
                                      box["zoomed_from_original_box_via_nearest_exact_resize"])


def test_input_array_is_not_modified(reference):
    raw = reference[0]["raw_volume"].astype(np.float32)
    before = raw.copy()
    preprocess(raw, np.eye(3), "official")
    np.testing.assert_array_equal(raw, before)


def test_constant_volume_is_a_clear_error():
    with pytest.raises(InputError, match="same value"):
        preprocess(np.full((4, 5, 6), 7.0, np.float32), np.eye(3), "official", name="flat.nii.gz")


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(InputError, match="canonical, official"):
        preprocess(np.zeros((2, 2, 2)), np.eye(3), "ras")


def _normalised_in_place(array_kji, orientation, stats):
    """The whole volume normalised in one float32 array, as ``preprocess`` does it internally."""
    from medsegx_core.inference.preprocessing import foreground_normalise, minmax_normalise

    whole = np.array(orientation.array_to_working(array_kji), dtype=np.float32, order="C")
    foreground_normalise(whole)
    minmax_normalise(whole)
    return whole


@pytest.mark.parametrize("direction", [np.eye(3), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)],
                         ids=["stored RAS", "permuted and flipped"])
def test_crop_read_in_parts_is_bit_identical_to_the_whole_normalised_volume(reference_ct, direction):
    # The preprocessed volume keeps no float copy: it normalises what is read from the caller's (int16) array.
    # Any read (windows, the zoom-out gather) must give exactly the bits of the whole normalised volume.
    raw = read_volume(reference_ct).array
    prepared = preprocess(raw, direction, "canonical")
    assert np.shares_memory(prepared.source, raw) and prepared.source.dtype == raw.dtype
    whole = _normalised_in_place(raw, prepared.orientation, prepared.stats)
    assert np.array_equal(prepared.normalised.view(np.uint32), whole.view(np.uint32))
    crop = whole[prepared.crop_slices]
    reader = prepared.crop_reader
    assert reader.shape == crop.shape == prepared.cropped_shape and reader.dtype == np.float32
    assert np.array_equal(prepared.cropped.view(np.uint32), crop.view(np.uint32))
    window = (slice(3, 35), slice(10, 70), slice(-50, None))
    assert np.array_equal(reader[window].view(np.uint32), crop[window].view(np.uint32))
    maps = ZoomMaps.build(prepared.cropped_shape, (32, 256, 256))      # SegVol's input size
    assert np.array_equal(maps.zoom_out(reader).view(np.uint32), maps.zoom_out(crop).view(np.uint32))
    assert np.array_equal(np.asarray(reader), crop)
    # The positive bounding box of the whole normalised volume is the crop.
    nonzero = np.nonzero(whole > 0)
    assert prepared.crop_lo == tuple(int(a.min()) for a in nonzero)
    assert prepared.crop_hi == tuple(int(a.max()) + 1 for a in nonzero)


def test_back_to_crop_written_slab_by_slab_equals_the_whole_gather(official, model_shape):
    # The predictor writes the coarse result straight into its uint8/float32 outputs (no crop-sized temporary);
    # the crop's D slices in slabs of 16, and of 10 (a partial last slab unless D is a multiple of 10).
    maps = ZoomMaps.build(official.cropped_shape, model_shape)
    zoomed = np.random.default_rng(0).normal(size=model_shape).astype(np.float32)
    for values, dtype, slab in ((zoomed, np.float32, 16), (zoomed > 0.5, np.uint8, 10)):
        full, view = official.working_canvas(dtype, fill=7)
        maps.back_to_crop_into(values, view, slab=slab)
        np.testing.assert_array_equal(view, maps.back_to_crop(values).astype(dtype))
        outside = np.ones(full.shape, bool)
        outside[official.crop_slices] = False
        assert np.all(full[outside] == 7) and official.to_stored(full).flags.c_contiguous
