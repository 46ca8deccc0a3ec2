"""Augmentation for training: make one CT patient look like many scanners, modalities and fields of view.

The starter learns abdominal anatomy from few patients. Its held-out abdominal patients include MR, thin 20-slice
series whose tissues have other brightness orders than CT's (fat is dark on CT and bright on T1). A model that has
only ever seen CT greys learns "liver = this grey", which no MR satisfies. These augmentations keep the anatomy and
the label and change what a model could memorise instead of shape and context, in the spirit of SynthSeg (Billot
et al., 2023: random intensities per label) and random intensity curves:

* ``label_intensity_shift``: each labelled structure's voxels shifted by its own random offset, so structures
  swap brightness order as they do between CT and MR sequences (texture and edges inside each stay real);
  ``label_offsets`` is its table, for callers that keep one draw through a whole volume;
* ``random_intensity_curve``: a random piecewise-linear, not necessarily monotonic, curve applied to every
  voxel (a tissue that was dark may become bright), the whole-image counterpart of the above;
* ``bias_field``: a smooth multiplicative field, as MR coil sensitivity gives (MONAI ``RandBiasField``);
* ``intensity_jitter``: gamma, contrast about the mean, brightness and noise (MONAI ``RandAdjustContrast``,
  ``RandScaleIntensityFixedMean``, ``RandShiftIntensity``, ``RandGaussianNoise``);
* ``random_affine``: a small rotation / scaling / translation of a view and its mask together (MONAI
  ``RandAffine``; off in the shipped recipes);
* ``slab_region``: a sub-box that keeps only a thin stack of slices, as an MR series of 20 slices covers only
  part of the abdomen (and then gets stretched along the slice axis by the zoom-out resize).

All take and return images in [0, 1] (the normalised model input) and draw from the caller's numpy generator: a
MONAI transform gets its own random state seeded from that generator, so a recipe's seed reproduces every draw
(MONAI transforms otherwise draw from a global state that worker processes and other code share).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from monai.transforms import (Compose, RandAdjustContrast, RandAffine, RandBiasField, RandGaussianNoise,
                               RandScaleIntensityFixedMean, RandShiftIntensity)
from monai.utils import convert_to_numpy


def label_offsets(values: np.ndarray, rng: np.random.Generator, spread: float = 0.2) -> np.ndarray:
    """A table (max value + 1,) float32: an offset drawn from N(0, spread) for each of ``values``, 0 elsewhere and
    for the background (label 0). Index it with a label map to shift each structure by its own offset."""
    values = np.unique(np.asarray(values)).astype(np.int64)
    table = np.zeros(int(values.max(initial=0)) + 1, dtype=np.float32)
    table[values] = rng.normal(0.0, spread, size=len(values)).astype(np.float32)
    table[0] = 0.0
    return table


def label_intensity_shift(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                          spread: float = 0.2) -> np.ndarray:
    """``image`` + an offset drawn from N(0, spread) for each label value (background, label 0, unchanged)."""
    table = label_offsets(labels, rng, spread)
    return np.clip(image + table[labels], 0.0, 1.0).astype(np.float32)


def random_intensity_curve(image: np.ndarray, rng: np.random.Generator, knots: int = 6) -> np.ndarray:
    """``image`` through a random curve on [0, 1]: ``knots`` inner control points at random positions and
    heights, joined linearly (so the brightness order of tissues may change).

    Not MONAI's ``RandHistogramShift``: that moves each control point only between its neighbours, so distant
    tissues (fat and liver) keep their order; this curve is meant to reverse it about half the time."""
    x = np.concatenate([[0.0], np.sort(rng.uniform(0.0, 1.0, size=knots)), [1.0]])
    y = rng.uniform(0.0, 1.0, size=knots + 2)
    return np.interp(image, x, y).astype(np.float32)


def _seeded(transform, rng: np.random.Generator):
    """``transform`` (a MONAI randomisable transform) with its random state drawn from ``rng``."""
    transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
    return transform


def _apply(transform, image: np.ndarray, **kwargs) -> np.ndarray:
    """A MONAI array transform on a (d, h, w) image: channel added, float32 numpy back."""
    return np.asarray(convert_to_numpy(transform(image[None], **kwargs))[0], dtype=np.float32)


def bias_field(image: np.ndarray, rng: np.random.Generator, strength: float = 0.15, degree: int = 3) -> np.ndarray:
    """``image`` times exp(a smooth random field): MONAI's ``RandBiasField``, a degree-``degree`` Legendre
    polynomial with coefficients uniform in [-strength, strength] (both darker and brighter regions)."""
    transform = _seeded(RandBiasField(degree=degree, coeff_range=(-strength, strength), prob=1.0), rng)
    return np.clip(_apply(transform, image), 0.0, 1.0)


def intensity_jitter(image: np.ndarray, rng: np.random.Generator, gamma: Tuple[float, float] = (0.7, 1.5),
                     contrast: Tuple[float, float] = (0.85, 1.15), brightness: float = 0.05,
                     noise_std: float = 0.02) -> np.ndarray:
    """A random gamma, contrast about the mean (a factor in ``contrast``), brightness offset (up to
    +-``brightness``) and Gaussian noise (standard deviation uniform in [0, ``noise_std``]), clipped to [0, 1]."""
    steps = Compose([RandAdjustContrast(prob=1.0, gamma=gamma),
                     RandScaleIntensityFixedMean(prob=1.0, factors=(contrast[0] - 1.0, contrast[1] - 1.0)),
                     RandShiftIntensity(offsets=(-brightness, brightness), prob=1.0),
                     RandGaussianNoise(prob=1.0, std=noise_std, sample_std=True)])
    return np.clip(_apply(_seeded(steps, rng), image), 0.0, 1.0)


def random_affine(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rotate: float = 0.15,
                  scale: float = 0.1, translate: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    """One random affine map (rotations up to ``rotate`` radians about each axis, scaling by up to
    1 +- ``scale``, shifts up to ``translate`` of each side) applied to the image (trilinear) and its mask
    (nearest), zeros outside: MONAI's ``RandAffine``, drawn once for both."""
    shift = tuple(translate * n for n in image.shape)
    transform = _seeded(RandAffine(prob=1.0, rotate_range=(rotate,) * 3, scale_range=(scale,) * 3,
                                   translate_range=shift, padding_mode="zeros"), rng)
    transform.randomize()
    moved = _apply(transform, image, mode="bilinear", randomize=False)
    moved_mask = _apply(transform, mask.astype(np.float32), mode="nearest", randomize=False)
    return np.clip(moved, 0.0, 1.0), moved_mask


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
