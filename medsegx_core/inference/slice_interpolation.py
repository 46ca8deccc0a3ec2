"""Masks between two segmented slices, by signed-distance interpolation (the fast mode's filling step).

The slice-wise predictor's fast mode encodes and decodes only every n-th slice of a propagation; the slices between
two decoded ones are filled here. Each decoded mask becomes its signed distance map (negative inside, in
millimetres of the slice plane), the maps are blended linearly by the in-between slice's position, and the blend's
negative part is the mask: a shape that moves, grows or shrinks between the two slices does so smoothly, which a
per-pixel blend of the masks (or a nearest-slice copy) does not.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# The fast mode decodes every n-th slice, n at most this: further apart, a structure's masks stop overlapping and
# there is nothing to interpolate between (and its end is found slice by slice anyway)
MAX_SLICE_STEP = 8
# The step of the Slicer module's "Fast" check box: 2 costs the 3D box 0.009 (CT) and 0.016 (MR) mean Dice and decodes
# 60-66 % of the slices; 3 and 4 cost two to three times as much and save little more, because near a structure's ends
# the masks disagree and those slices are decoded one by one anyway (Testing/benchmarks/fast_mode.py, model card)
FAST_MODE_SLICE_STEP = 2


def check_slice_step(slice_step) -> int:
    """The fast mode's slice step (1: every slice decoded, the default), or an InputError that says what to give.
    The one rule for the command line, the batch script, the Slicer Logic and the predictor."""
    if isinstance(slice_step, bool) or not isinstance(slice_step, (int, np.integer)) or not (
            1 <= slice_step <= MAX_SLICE_STEP):
        raise InputError(f"slice step {slice_step!r}: give a whole number from 1 (every slice decoded, the default) "
                         f"to {MAX_SLICE_STEP} (decode every n-th slice, interpolate the slices between)")
    return int(slice_step)


def signed_distance(mask: np.ndarray, spacing_xy: Tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """(H, W) float32 signed distance to a 2D mask's border: negative inside, positive outside (in the units of
    ``spacing_xy``, the pixel size along x then y), half a pixel at the border on either side, so that ``< 0`` gives
    the mask back exactly. The mask must not be empty."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all():
        return np.full(mask.shape, -float(max(mask.shape) * max(spacing_xy)), dtype=np.float32)
    # Maurer's map is 0 on the border pixels of whichever set it measures; the mean of the mask's map and its
    # complement's (sign flipped) puts the zero crossing between the last pixel inside and the first outside
    return 0.5 * (_maurer(mask, spacing_xy) - _maurer(~mask, spacing_xy))


def _maurer(mask: np.ndarray, spacing_xy: Tuple[float, float]) -> np.ndarray:
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_xy))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance).astype(np.float32)


def interpolate_masks(first: np.ndarray, last: np.ndarray, positions: Sequence[float],
                      spacing_xy: Tuple[float, float] = (1.0, 1.0)) -> List[np.ndarray]:
    """Masks (bool, the slices' shape) at each of ``positions`` (0 = ``first``, 1 = ``last``) between two 2D masks.

    Where one of the two masks is empty there is no shape to move towards: the slices nearer the non-empty one take
    it, the others stay empty."""
    first, last = np.asarray(first, dtype=bool), np.asarray(last, dtype=bool)
    if first.shape != last.shape:
        raise ValueError(f"masks of different shapes: {first.shape} and {last.shape}")
    if not first.any() or not last.any():
        return [(first if t < 0.5 else last).copy() for t in positions]
    near, far = signed_distance(first, spacing_xy), signed_distance(last, spacing_xy)
    return [((1.0 - t) * near + t * far) < 0 for t in positions]


__all__ = ["signed_distance", "interpolate_masks", "check_slice_step", "MAX_SLICE_STEP", "FAST_MODE_SLICE_STEP"]
