"""Domain randomisation for the starter model: make one CT patient look like many scanners and modalities.

The starter learns abdominal anatomy from a single CT patient. Its first held-out abdominal patient is an MR, a
thin 20-slice series whose tissues have other brightness orders than CT's (fat is dark on CT and bright on T1).
A model that has only ever seen CT greys learns "liver = this grey", which no MR satisfies. These augmentations
keep the anatomy and the label and change what a model could memorise instead of shape and context, in the spirit
of SynthSeg (Billot et al., 2023: random intensities per label) and random intensity curves:

* ``label_intensity_shift``: each labelled structure's voxels shifted by its own random offset, so structures
  swap brightness order as they do between CT and MR sequences (texture and edges inside each stay real);
* ``random_intensity_curve``: a random piecewise-linear, not necessarily monotonic, curve applied to every
  voxel (a tissue that was dark may become bright), the whole-image counterpart of the above;
* ``bias_field``: a smooth multiplicative field, as MR coil sensitivity gives;
* ``slab_region``: a sub-box that keeps only a thin stack of slices, as an MR series of 20 slices covers only
  part of the abdomen (and then gets stretched along the slice axis by the zoom-out resize).

All take and return images in [0, 1] (the normalised model input) and draw from the caller's generator.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch


def label_intensity_shift(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                          spread: float = 0.2) -> np.ndarray:
    """``image`` + an offset drawn from N(0, spread) for each label value (background, label 0, unchanged)."""
    values = np.unique(labels)
    table = np.zeros(int(values.max()) + 1, dtype=np.float32)
    table[values] = rng.normal(0.0, spread, size=len(values)).astype(np.float32)
    table[0] = 0.0
    return np.clip(image + table[labels], 0.0, 1.0).astype(np.float32)


def random_intensity_curve(image: np.ndarray, rng: np.random.Generator, knots: int = 6) -> np.ndarray:
    """``image`` through a random curve on [0, 1]: ``knots`` inner control points at random positions and
    heights, joined linearly (so the brightness order of tissues may change)."""
    x = np.concatenate([[0.0], np.sort(rng.uniform(0.0, 1.0, size=knots)), [1.0]])
    y = rng.uniform(0.0, 1.0, size=knots + 2)
    return np.interp(image, x, y).astype(np.float32)


def bias_field(image: np.ndarray, rng: np.random.Generator, strength: float = 0.3,
               coarse: Tuple[int, int, int] = (3, 4, 4)) -> np.ndarray:
    """``image`` times exp(a smooth random field): a coarse grid of N(0, strength) values resized trilinearly."""
    grid = torch.from_numpy(rng.normal(0.0, strength, size=coarse).astype(np.float32))[None, None]
    field = torch.nn.functional.interpolate(grid, size=image.shape, mode="trilinear", align_corners=True)
    return np.clip(image * np.exp(field[0, 0].numpy()), 0.0, 1.0).astype(np.float32)


def random_sub_box(shape: Sequence[int], centre: Sequence[int], rng: np.random.Generator,
                   fractions: Sequence[Tuple[float, float]], minimum: Sequence[int]) -> Tuple[slice, ...]:
    """A random sub-box of an array of ``shape`` holding ``centre``: on each axis a uniform ``fractions[axis]``
    share of its length (at least ``minimum[axis]``), placed at random around the centre."""
    region = []
    for axis, n in enumerate(shape):
        size = min(n, max(minimum[axis], int(round(n * rng.uniform(*fractions[axis])))))
        first = int(rng.integers(max(0, centre[axis] - size + 1), min(centre[axis], n - size) + 1))
        region.append(slice(first, first + size))
    return tuple(region)


def slab_region(shape: Sequence[int], centre: Sequence[int], rng: np.random.Generator,
                slice_fraction: Tuple[float, float] = (0.12, 0.5),
                inplane_fraction: Tuple[float, float] = (0.7, 1.0)) -> Tuple[slice, ...]:
    """A thin slab of an array of ``shape`` (d, h, w) holding ``centre``: a random ``slice_fraction`` of the
    slices (axis 0, at least 4) and a random ``inplane_fraction`` of each in-plane axis."""
    return random_sub_box(shape, centre, rng, (slice_fraction, inplane_fraction, inplane_fraction), (4, 1, 1))


def absent_slab(mask: np.ndarray, min_slices: int, rng: np.random.Generator) -> Optional[slice]:
    """A random run of at least ``min_slices`` slices (axis 0) of ``mask`` that holds none of its voxels: above or
    below the structure, as a scan that stops short of it. None when neither side is that thick."""
    occupied = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    sides = [(start, stop) for start, stop in ((0, int(occupied[0])), (int(occupied[-1]) + 1, mask.shape[0]))
             if stop - start >= min_slices]
    if not sides:
        return None
    start, stop = sides[int(rng.integers(len(sides)))]
    thickness = int(rng.integers(min_slices, stop - start + 1))
    first = int(rng.integers(start, stop - thickness + 1))
    return slice(first, first + thickness)
