"""Zoom-in geometry and blending on synthetic arrays: the model-space coarse extent against resizing the coarse
mask back to the crop, and blending with skipped windows or only some rows."""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.inference.zoom import ZoomMaps
from medsegx_core.inference.zoom_in import EMPTY_BOX, WindowPlan, zoom_in

WINDOW = (4, 8, 8)


def extent_by_resizing_back(plan, coarse, maps, index):
    """The straightforward rule: resize the window's part of the coarse mask back to the crop and box it."""
    crop, local = plan.readable(index)
    inside = maps.back_to_crop(coarse, crop)
    if not inside.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        present = inside.any(axis=tuple(a for a in range(3) if a != axis))
        lo.append(local[axis].start + int(np.argmax(present)))
        hi.append(local[axis].start + int(len(present) - 1 - np.argmax(present[::-1])))
    return lo, hi


@pytest.mark.parametrize("cropped_shape", [(13, 20, 19), (3, 5, 6), (9, 8, 30)])   # larger, smaller, mixed
def test_the_model_space_coarse_extent_equals_resizing_back(cropped_shape):
    rng = np.random.default_rng(sum(cropped_shape))
    maps = ZoomMaps.build(cropped_shape, WINDOW)
    for density in (0.0, 0.01, 0.2):
        coarse = rng.random(WINDOW) < density
        plan = WindowPlan.official((0, 0, 0), tuple(n - 1 for n in cropped_shape), cropped_shape, WINDOW)
        for index in range(len(plan)):
            expected = extent_by_resizing_back(plan, coarse, maps, index)
            assert plan.coarse_extent(coarse, maps, index) == expected
            box = plan.coarse_box(coarse, maps, index)
            assert box.tolist() == (list(EMPTY_BOX) if expected is None else expected[0] + expected[1])


def blend(plan, logits, slices=None, skipped=()):
    shape = tuple(hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi))
    out = np.full(shape, np.nan, np.float32)

    def receive(start, stop, slab, covered):
        target = out[start:stop]
        if covered is None:
            target[...] = slab
        else:
            target[covered] = slab[covered]

    zoom_in(plan, lambda i: None if i in skipped else logits[i][plan.readable(i)[1]], receive, slices=slices)
    return out


def test_skipped_windows_add_nothing_and_rows_can_be_blended_alone():
    window = (4, 6, 6)
    plan = WindowPlan.official((1, 0, 2), (13, 9, 16), (20, 10, 17), window)
    rng = np.random.default_rng(1)
    logits = [rng.normal(size=window).astype(np.float32) for _ in plan.origins]
    shape = tuple(hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi))
    skipped = {0, 3}
    total, count = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for index, values in enumerate(logits):
        if index in skipped:
            continue
        crop, local = plan.readable(index)
        target = tuple(slice(c.start - lo, c.stop - lo) for c, lo in zip(crop, plan.region_lo))
        total[target] += values[local]
        count[target] += 1
    expected = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    full = blend(plan, logits, skipped=skipped)
    np.testing.assert_array_equal(np.isnan(full), count == 0)          # only skipped windows: untouched
    assert (count == 0).any()
    np.testing.assert_allclose(full, expected, rtol=1e-6, atol=1e-6)
    # The rows in the middle, blended alone, are bit-identical to the same rows of the whole blend.
    rows = blend(plan, logits, slices=(5, 9), skipped=skipped)
    np.testing.assert_array_equal(rows[5:9], full[5:9])
    assert np.isnan(rows[:5]).all() and np.isnan(rows[9:]).all()


def test_packed_embeddings_are_a_quarter_of_float32_and_close_to_the_original():
    import torch

    from medsegx_core.inference.cache import PackedEmbedding, tensor_bytes

    torch.manual_seed(0)
    embedding = (torch.randn(1, 64, 8, 16, 16) * torch.linspace(0.1, 5, 64)[None, :, None, None, None]).bfloat16()
    packed = PackedEmbedding.pack(embedding)
    assert tensor_bytes(packed) == 64 * 8 * 16 * 16 + 4 * 8 * 16 * 16          # int8 + one scale per token
    restored = packed.unpack()
    assert restored.dtype == torch.bfloat16 and restored.shape == embedding.shape
    # Each value within half a step of its token's scale (absmax / 127), plus bf16 rounding of the result.
    step = embedding.float().abs().amax(dim=1, keepdim=True) / 127
    assert ((restored.float() - embedding.float()).abs() <= 0.5 * step + 0.01 * embedding.float().abs()).all()
