"""The `official` preprocessing and the zoom index maps reproduce the SegVol fixture (README 5.1, 5.2, 7)."""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.data.readers import read_volume
from medsegx_core.errors import InputError
from medsegx_core.inference.preprocessing import preprocess
from medsegx_core.inference.zoom import ZoomMaps

MODEL_SHAPE = (32, 256, 256)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    public = fixtures_dir / "segvol_parity" / "public"
    return np.load(public / "pipeline_preprocess.npz"), np.load(public / "model_input.npz")


@pytest.fixture(scope="module")
def official(reference):
    raw = reference[0]["raw_volume"]
    return preprocess(raw, np.eye(3), "official")


def test_reference_ct_file_is_the_fixture_volume(data_dir, reference):
    volume = read_volume(data_dir / "ct" / "totalseg_ct.nii.gz")
    np.testing.assert_array_equal(volume.array, reference[0]["raw_volume"])


def test_foreground_normalisation_statistics(official):
    # Values printed in the fixture README (5.1 step 2) and fixtures.json -> summary.preprocess.
    stats = official.stats
    assert stats.threshold == pytest.approx(-360.0203857421875, abs=1e-4)
    assert stats.foreground_count == 872929
    assert stats.lower == pytest.approx(-356.0, abs=1e-4)
    assert stats.upper == pytest.approx(2449.823974609375, abs=1e-3)
    assert stats.mean == pytest.approx(-19.6723690032959, abs=1e-4)
    assert stats.std == pytest.approx(128.04962158203125, abs=1e-3)
    assert stats.minmax_min == pytest.approx(-2.6265413761138916, abs=1e-5)
    assert stats.minmax_range == pytest.approx(21.912004470825195, abs=1e-5)


def test_crop_bounds_and_normalised_crop(official, reference):
    pre = reference[0]
    assert official.crop_lo == tuple(pre["crop_lo_zyx"])
    assert tuple(h - 1 for h in official.crop_hi) == tuple(pre["crop_hi_zyx_inclusive"])
    np.testing.assert_allclose(official.cropped, pre["normalised_cropped"], rtol=0, atol=1e-6)
    assert official.cropped.dtype == np.float32


def test_index_maps_match_torch_resizes_of_the_fixture(official, reference):
    pre = reference[0]
    maps = ZoomMaps.build(official.cropped_shape, MODEL_SHAPE)
    for axis, name in enumerate("dhw"):
        np.testing.assert_array_equal(maps.out[axis], pre[f"zoom_index_{name}"])
        np.testing.assert_array_equal(maps.back[axis], pre[f"back_index_{name}"])
    # The legacy float32 `nearest` rule differs from exact arithmetic at one W index (README 5.2).
    assert maps.back[2][61] == 127


def test_zoom_out_model_input(official, reference):
    maps = ZoomMaps.build(official.cropped_shape, MODEL_SHAPE)
    image = maps.zoom_out(official.cropped)
    np.testing.assert_allclose(image, reference[1]["image"][0, 0], rtol=0, atol=1e-6)


def test_zoomed_box_from_a_box_cube(official):
    # The liver box in crop indices resizes to the fixture's zoomed box (fixtures.json -> summary.liver_box).
    maps = ZoomMaps.build(official.cropped_shape, MODEL_SHAPE)
    box = maps.box_to_model((69, 25, 37), (111, 86, 104))
    np.testing.assert_array_equal(box, [20, 66, 78, 31, 229, 219])


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
def test_crop_read_in_parts_is_bit_identical_to_the_whole_normalised_volume(data_dir, direction):
    # The preprocessed volume keeps no float copy: it normalises what is read from the caller's (int16) array.
    # Any read (windows, the zoom-out gather) must give exactly the bits of the whole normalised volume.
    raw = read_volume(data_dir / "ct" / "totalseg_ct.nii.gz").array
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
    maps = ZoomMaps.build(prepared.cropped_shape, MODEL_SHAPE)
    assert np.array_equal(maps.zoom_out(reader).view(np.uint32), maps.zoom_out(crop).view(np.uint32))
    assert np.array_equal(np.asarray(reader), crop)
    # The positive bounding box of the whole normalised volume is the crop.
    nonzero = np.nonzero(whole > 0)
    assert prepared.crop_lo == tuple(int(a.min()) for a in nonzero)
    assert prepared.crop_hi == tuple(int(a.max()) + 1 for a in nonzero)


def test_back_to_crop_written_slab_by_slab_equals_the_whole_gather(official):
    # The predictor writes the coarse result straight into its uint8/float32 outputs (no crop-sized temporary);
    # the crop's 112 D slices in slabs of 16, and of 10 (ending in a partial slab).
    maps = ZoomMaps.build(official.cropped_shape, MODEL_SHAPE)
    zoomed = np.random.default_rng(0).normal(size=MODEL_SHAPE).astype(np.float32)
    for values, dtype, slab in ((zoomed, np.float32, 16), (zoomed > 0.5, np.uint8, 10)):
        full, view = official.working_canvas(dtype, fill=7)
        maps.back_to_crop_into(values, view, slab=slab)
        np.testing.assert_array_equal(view, maps.back_to_crop(values).astype(dtype))
        outside = np.ones(full.shape, bool)
        outside[official.crop_slices] = False
        assert np.all(full[outside] == 7) and official.to_stored(full).flags.c_contiguous
