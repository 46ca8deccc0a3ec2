"""Intensity preprocessing and foreground crop, as SegVol's published inference does it.

Two profiles share one implementation:

* ``official``: exactly the published steps (fixture README 5.1), on the voxel order as stored. The official
  loader drops the image metadata before its "reorient to RAS" step, so that step changes nothing; we do the
  same, which is what the parity tests check.
* ``canonical`` (default): first permutes/flips the voxel axes to RAS+ (``orientation.py``), then runs the same
  steps; results are mapped back exactly. On a volume stored RAS+ the permutation is the identity and the two
  profiles give identical arrays.

The steps, on float32: foreground normalisation (threshold = mean of all voxels; clip to the 0.05th/99.95th
percentiles of the voxels above it; z-score with their mean and population std), min-max to [0, 1], then a
crop to the bounding box of voxels > 0. The official code also zero-pads to at least the model input size
before cropping; the pad is all zeros and the crop removes it again, so we skip it (the crop is the same).

Memory: the official path holds several full-size float copies (2.8 GB peak on a 469x388x269 CT). Here the
volume is converted to float32 once and normalised in place; the only other full-size buffer is the transient
copy of the above-threshold voxels that the percentiles need (partitioned in place, freed before returning).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, check, report
from .orientation import AxisReorientation

PROFILES = ("canonical", "official")
LOWER_PERCENTILE = 0.05
UPPER_PERCENTILE = 99.95
_CHUNK = 1 << 22  # voxels per step of the chunked reductions (16 MB of float32)


@dataclass(frozen=True)
class NormalisationStats:
    """What foreground normalisation measured (reported in the fixture, useful for debugging)."""

    threshold: float
    foreground_count: int
    lower: float
    upper: float
    mean: float
    std: float
    minmax_min: float
    minmax_range: float


@dataclass
class PreprocessedVolume:
    """The normalised volume on the working grid plus what is needed to map prompts in and masks out.

    ``normalised`` is the whole working-grid array (k, j, i) in [0, 1]; the model only ever sees its foreground
    crop ``[crop_lo, crop_hi)`` (``cropped``, a view). Working grid = stored grid for ``official``, the RAS+
    reoriented grid for ``canonical``.
    """

    profile: str
    orientation: AxisReorientation
    normalised: np.ndarray
    crop_lo: tuple[int, int, int]
    crop_hi: tuple[int, int, int]
    stats: NormalisationStats

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, hi) for lo, hi in zip(self.crop_lo, self.crop_hi))

    @property
    def cropped(self) -> np.ndarray:
        return self.normalised[self.crop_slices]

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(hi - lo for lo, hi in zip(self.crop_lo, self.crop_hi))

    def points_to_cropped(self, points_ijk: np.ndarray) -> np.ndarray:
        """Stored-grid (i, j, k) voxel coordinates (N, 3) -> (d, h, w) coordinates in the foreground crop."""
        working_ijk = self.orientation.points_to_working(points_ijk)
        return working_ijk[:, ::-1] - np.asarray(self.crop_lo, dtype=np.float64)

    def cropped_to_stored(self, cropped_values: np.ndarray, fill=0) -> np.ndarray:
        """Paste a crop-shaped array into a full working-grid array and return it in stored (k, j, i) order."""
        full = np.full(self.normalised.shape, fill, dtype=cropped_values.dtype)
        full[self.crop_slices] = cropped_values
        return np.ascontiguousarray(self.orientation.array_to_stored(full))


def _mean_float32(values: np.ndarray) -> np.float32:
    # numpy's float32 pairwise mean, as the official numpy code computes it.
    return np.float32(values.mean(dtype=np.float32))


def _population_std(values: np.ndarray, mean: np.float32) -> np.float32:
    """Population std without a full-size temporary (numpy's ``std`` allocates one); float64 accumulation."""
    total = 0.0
    for start in range(0, values.size, _CHUNK):
        deviation = values[start:start + _CHUNK].astype(np.float64) - float(mean)
        total += float(np.dot(deviation, deviation))
    return np.float32(np.sqrt(total / max(values.size, 1)))


def foreground_normalise(volume: np.ndarray, name: str = "volume") -> NormalisationStats:
    """SegVol's foreground normalisation, in place on a C-contiguous float32 array."""
    flat = volume.reshape(-1)
    threshold = _mean_float32(flat)
    foreground = flat[flat > threshold]
    if foreground.size == 0:
        raise InputError(f"{name}: all voxels have the same value; there is nothing to segment "
                         f"(check that the file holds an image, not an empty or constant array)")
    mean = _mean_float32(foreground)
    std = _population_std(foreground, mean)
    lower, upper = np.percentile(foreground, [LOWER_PERCENTILE, UPPER_PERCENTILE], overwrite_input=True)
    count = int(foreground.size)
    del foreground
    np.clip(volume, volume.dtype.type(lower), volume.dtype.type(upper), out=volume)
    volume -= mean
    volume /= max(std, np.float32(1e-8))
    return NormalisationStats(float(threshold), count, float(lower), float(upper), float(mean), float(std),
                              0.0, 0.0)


def minmax_normalise(volume: np.ndarray) -> tuple[float, float]:
    """Rescale in place to [0, 1]; returns (min, range) before rescaling."""
    low, high = volume.min(), volume.max()
    value_range = high - low
    volume -= low
    volume /= max(value_range, np.float32(1e-8))
    return float(low), float(value_range)


def positive_bounding_box(volume: np.ndarray) -> Optional[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(lo, hi-exclusive) of the voxels > 0 per array axis, or None when there are none.

    Works slab by slab so no full-size boolean array is allocated.
    """
    any_along = [np.zeros(n, dtype=bool) for n in volume.shape]
    slab = max(1, _CHUNK // max(1, volume.shape[1] * volume.shape[2]))
    for start in range(0, volume.shape[0], slab):
        positive = volume[start:start + slab] > 0
        any_along[0][start:start + slab] |= positive.any(axis=(1, 2))
        any_along[1] |= positive.any(axis=(0, 2))
        any_along[2] |= positive.any(axis=(0, 1))
    if not any_along[0].any():
        return None
    lo = tuple(int(np.argmax(a)) for a in any_along)
    hi = tuple(int(len(a) - np.argmax(a[::-1])) for a in any_along)
    return lo, hi


def preprocess(array_kji: np.ndarray, direction_ras: np.ndarray, profile: str = "canonical",
               name: str = "volume", progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> PreprocessedVolume:
    """Normalise and foreground-crop a stored (k, j, i) array for the model.

    ``direction_ras`` (3x3, columns = unit i, j, k axes in RAS) is used only by the ``canonical`` profile.
    The caller's array is never modified.
    """
    if profile not in PROFILES:
        raise InputError(f"unknown preprocessing profile {profile!r}; choose one of {', '.join(PROFILES)}")
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got an array of shape {array_kji.shape}")
    shape_ijk = array_kji.shape[::-1]
    orientation = (AxisReorientation.to_ras(direction_ras, shape_ijk) if profile == "canonical"
                   else AxisReorientation.identity(shape_ijk))
    report(progress, 0.0, "normalising intensities")
    # One float32 copy in working order; everything else happens in place on it.
    working = np.array(orientation.array_to_working(array_kji), dtype=np.float32, order="C", copy=True)
    check(cancel)
    stats = foreground_normalise(working, name)
    check(cancel)
    report(progress, 0.6, "rescaling and cropping the foreground")
    low, value_range = minmax_normalise(working)
    box = positive_bounding_box(working)
    if box is None:
        raise InputError(f"{name}: no voxel is above the volume's minimum after normalisation; "
                         f"there is nothing to segment")
    stats = NormalisationStats(**{**stats.__dict__, "minmax_min": low, "minmax_range": value_range})
    report(progress, 1.0, "preprocessed")
    return PreprocessedVolume(profile, orientation, working, box[0], box[1], stats)
