"""Signed-distance interpolation between two segmented slices (the slice-wise predictor's fast mode)."""
from __future__ import annotations

import numpy as np
import pytest

from medsegx_core.inference.slice_interpolation import interpolate_masks, signed_distance


def disc(shape, centre, radius):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def test_the_distance_is_negative_inside_and_counts_millimetres():
    mask = disc((64, 64), (32, 32), 10)
    distance = signed_distance(mask, (0.5, 0.5))
    assert (distance[mask] <= 0).all() and (distance[~mask] > 0).all()
    # the centre lies 10 pixels of 0.5 mm inside the border
    assert distance[32, 32] == pytest.approx(-5.0, abs=0.5)


def test_a_disc_moving_and_growing_passes_through_the_shapes_between():
    # overlapping, as a structure's masks on slices a few millimetres apart are
    first, last = disc((96, 96), (40, 40), 10), disc((96, 96), (48, 46), 18)
    start, middle, end = interpolate_masks(first, last, [0.0, 0.5, 1.0])
    assert np.array_equal(start, first) and np.array_equal(end, last)
    # halfway: a disc of about the mean radius around the midpoint of the centres
    expected = disc((96, 96), (44, 43), 14)
    overlap = 2 * (middle & expected).sum() / (middle.sum() + expected.sum())
    assert overlap > 0.9
    areas = [m.sum() for m in interpolate_masks(first, last, np.linspace(0, 1, 7))]
    assert areas == sorted(areas)                 # it grows steadily, never jumps


def test_an_empty_side_gives_the_nearer_shape_and_bad_shapes_are_refused():
    shape = disc((32, 32), (16, 16), 5)
    empty = np.zeros((32, 32), dtype=bool)
    near, far = interpolate_masks(shape, empty, [0.25, 0.75])
    assert np.array_equal(near, shape) and not far.any()
    with pytest.raises(ValueError, match="different shapes"):
        interpolate_masks(shape, np.zeros((16, 16), dtype=bool), [0.5])
