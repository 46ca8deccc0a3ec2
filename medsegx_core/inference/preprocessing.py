"""Intensity preprocessing and foreground crop, as SegVol's published inference does it.

Two profiles share one implementation:

* ``official``: exactly the published steps (fixture README 5.1), on the voxel order as stored. The official
  loader drops the image metadata before its "reorient to RAS" step, so that step changes nothing; we do the
  same, which is what the parity tests check.
* ``canonical`` (default): first permutes/flips the voxel axes to RAS+ (``data/orientation.py``), then runs the same
  steps; results are mapped back exactly. On a volume stored RAS+ the permutation is the identity and the two
  profiles give identical arrays.

The steps, on float32: foreground normalisation (threshold = mean of all voxels; clip to the 0.05th/99.95th
percentiles of the voxels above it; z-score with their mean and population std), min-max to [0, 1], then a
crop to the bounding box of voxels > 0. The official code also zero-pads to at least the model input size
before cropping; the pad is all zeros and the crop removes it again, so we skip it (the crop is the same).

Memory: the official path holds several full-size float copies (2.8 GB peak on a 469x388x269 CT). Here the
volume is converted to float32 once and normalised in place; the statistics of the voxels above the mean are
gathered chunk by chunk (the percentiles exactly, from a histogram and the few voxels of the bins that hold the
wanted ranks), so no other full-size buffer exists. That float32 copy lives only while the statistics and the
crop are found: every step is an elementwise float32 operation with fixed scalars (``NormalisationStats.apply``),
so normalising any part of the stored array again gives the same bits as the part of the whole normalised
array. ``PreprocessedVolume`` therefore keeps only a view of the caller's array (int16 for CT: a quarter of the
float32 volume's size, and already in memory) and normalises what is read, a window at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, check, report
from ..data.orientation import AxisReorientation

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

    def apply(self, values: np.ndarray) -> np.ndarray:
        """``values`` of the stored array normalised as ``preprocess`` normalised the whole (a float32 copy).

        The same float32 operations with the same scalars, element by element, so the result is bit-identical
        to the corresponding part of the whole normalised array."""
        out = np.array(values, dtype=np.float32, copy=True)
        _clip_and_standardise(out, self.lower, self.upper, np.float32(self.mean), np.float32(self.std))
        _rescale(out, np.float32(self.minmax_min), np.float32(self.minmax_range))
        return out


@dataclass
class PreprocessedVolume:
    """The preprocessed volume on the working grid plus what is needed to map prompts in and masks out.

    ``source`` is a view of the caller's array in working order (k, j, i), not a copy: it must not be changed
    while this object is used. The model only ever sees the foreground crop ``[crop_lo, crop_hi)`` of its
    normalisation: ``crop_reader`` reads parts of it (normalised on the fly, float32), ``cropped`` and
    ``normalised`` build whole arrays. Working grid = stored grid for ``official``, the RAS+ reoriented grid
    for ``canonical``.
    """

    profile: str
    orientation: AxisReorientation
    source: np.ndarray
    crop_lo: tuple[int, int, int]
    crop_hi: tuple[int, int, int]
    stats: NormalisationStats

    @property
    def working_shape(self) -> tuple[int, int, int]:
        return tuple(self.source.shape)

    @property
    def crop_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(lo, hi) for lo, hi in zip(self.crop_lo, self.crop_hi))

    @property
    def crop_reader(self) -> "NormalisedCrop":
        """The normalised foreground crop as an indexable view (nothing computed until indexed)."""
        return NormalisedCrop(self.source[self.crop_slices], self.stats)

    @property
    def cropped(self) -> np.ndarray:
        """The normalised foreground crop (a new float32 array, crop-sized)."""
        return self.stats.apply(self.source[self.crop_slices])

    @property
    def normalised(self) -> np.ndarray:
        """The whole normalised working-grid array in [0, 1] (a new float32 array, volume-sized)."""
        return self.stats.apply(self.source)

    @property
    def cropped_shape(self) -> tuple[int, int, int]:
        return tuple(hi - lo for lo, hi in zip(self.crop_lo, self.crop_hi))

    def points_to_cropped(self, points_ijk: np.ndarray) -> np.ndarray:
        """Stored-grid (i, j, k) voxel coordinates (N, 3) -> (d, h, w) coordinates in the foreground crop."""
        working_ijk = self.orientation.points_to_working(points_ijk)
        return working_ijk[:, ::-1] - np.asarray(self.crop_lo, dtype=np.float64)

    def working_canvas(self, dtype, fill=0) -> tuple[np.ndarray, np.ndarray]:
        """A working-grid array filled with ``fill`` and its crop view: a result written into the view is
        already the full-size output (``to_stored``), with no crop-sized array to paste."""
        full = np.full(self.working_shape, fill, dtype=dtype)
        return full, full[self.crop_slices]

    def to_stored(self, working: np.ndarray) -> np.ndarray:
        """A working-grid array in stored (k, j, i) order (no copy when the working grid is the stored one)."""
        return np.ascontiguousarray(self.orientation.array_to_stored(working))


class NormalisedCrop:
    """Read-only, array-like normalised crop: ``crop[key]`` normalises only the indexed voxels (any numpy
    index: slices for windows, ``np.ix_`` maps for the zoom-out view), bit-identical to indexing the whole."""

    dtype = np.dtype(np.float32)

    def __init__(self, source_crop: np.ndarray, stats: NormalisationStats):
        self._source = source_crop
        self._stats = stats

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._source.shape)

    @property
    def ndim(self) -> int:
        return self._source.ndim

    def __getitem__(self, key) -> np.ndarray:
        return self._stats.apply(self._source[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self._stats.apply(self._source)
        return whole if dtype is None else whole.astype(dtype, copy=False)


_BINS = 1 << 16  # histogram bins used to find the percentiles' order statistics without a full-size copy


def _chunks(flat: np.ndarray, threshold: np.float32):
    """The above-threshold voxels of a flat array, one bounded chunk at a time."""
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        yield chunk[chunk > threshold]


def _order_statistics(flat: np.ndarray, threshold: np.float32, ranks: list, low: float, high: float,
                      histogram: np.ndarray) -> dict:
    """The values of the given 0-based ranks among the above-threshold voxels, exactly: the histogram says
    which bin holds each rank; only the voxels of those bins are collected and sorted."""
    cumulative = np.cumsum(histogram)
    wanted = {rank: int(np.searchsorted(cumulative, rank, side="right")) for rank in ranks}
    collected = {b: [] for b in set(wanted.values())}
    for values in _chunks(flat, threshold):
        bins = _bin_of(values, low, high)
        for b in collected:
            collected[b].append(values[bins == b])
    result = {}
    for rank, b in wanted.items():
        in_bin = np.sort(np.concatenate(collected[b]))
        before = int(cumulative[b - 1]) if b > 0 else 0
        result[rank] = float(in_bin[rank - before])
    return result


def _bin_of(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scale = _BINS / max(high - low, 1e-30)
    return np.clip(((values.astype(np.float64) - low) * scale).astype(np.int64), 0, _BINS - 1)


def _percentile(order: dict, count: int, q: float) -> float:
    """numpy's default (linear) percentile from the two order statistics around q, same arithmetic."""
    position = q / 100.0 * (count - 1)
    below = int(np.floor(position))
    fraction = position - below
    a, b = order[below], order[min(below + 1, count - 1)]
    return b - (b - a) * (1 - fraction) if fraction >= 0.5 else a + (b - a) * fraction


def foreground_normalise(volume: np.ndarray, name: str = "volume") -> NormalisationStats:
    """SegVol's foreground normalisation, in place on a C-contiguous float32 array.

    Statistics of the voxels above the mean are accumulated chunk by chunk (float64 sums; the percentiles'
    order statistics exactly, through a histogram), so no copy of those voxels is made.
    """
    flat = volume.reshape(-1)
    threshold = np.float32(flat.mean(dtype=np.float32))   # numpy's float32 pairwise mean, as the official code
    low, high = float(threshold), float(flat.max())
    count, total = 0, 0.0
    histogram = np.zeros(_BINS, dtype=np.int64)
    for values in _chunks(flat, threshold):
        count += values.size
        total += float(values.sum(dtype=np.float64))
        histogram += np.bincount(_bin_of(values, low, high), minlength=_BINS)
    if count == 0:
        raise InputError(f"{name}: all voxels have the same value; there is nothing to segment "
                         f"(check that the file holds an image, not an empty or constant array)")
    mean = np.float32(total / count)
    squares = 0.0
    for values in _chunks(flat, threshold):
        deviation = values.astype(np.float64) - float(mean)
        squares += float(np.dot(deviation, deviation))
    std = np.float32(np.sqrt(squares / count))
    ranks = []
    for q in (LOWER_PERCENTILE, UPPER_PERCENTILE):
        below = int(np.floor(q / 100.0 * (count - 1)))
        ranks += [below, min(below + 1, count - 1)]
    order = _order_statistics(flat, threshold, sorted(set(ranks)), low, high, histogram)
    lower, upper = (_percentile(order, count, q) for q in (LOWER_PERCENTILE, UPPER_PERCENTILE))
    lower, upper = float(np.float32(lower)), float(np.float32(upper))   # the clip bounds as applied
    _clip_and_standardise(volume, lower, upper, mean, std)
    return NormalisationStats(float(threshold), count, lower, upper, float(mean), float(std), 0.0, 0.0)


def minmax_normalise(volume: np.ndarray) -> tuple[float, float]:
    """Rescale in place to [0, 1]; returns (min, range) before rescaling."""
    low, high = volume.min(), volume.max()
    value_range = high - low
    _rescale(volume, low, value_range)
    return float(low), float(value_range)


# The two in-place steps, shared by the whole-volume pass and ``NormalisationStats.apply`` (which must repeat
# them bit for bit): float32 array, float32 scalars, the official order of operations.
def _clip_and_standardise(volume: np.ndarray, lower: float, upper: float, mean: np.float32,
                          std: np.float32) -> None:
    np.clip(volume, np.float32(lower), np.float32(upper), out=volume)
    volume -= mean
    volume /= max(std, np.float32(1e-8))


def _rescale(volume: np.ndarray, low: np.float32, value_range: np.float32) -> None:
    volume -= low
    volume /= max(value_range, np.float32(1e-8))


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
    # One float32 copy in working order for the statistics and the crop; everything happens in place on it,
    # and it is dropped on return (the result normalises what it reads from the caller's array again).
    source = orientation.array_to_working(array_kji)
    working = np.array(source, dtype=np.float32, order="C", copy=True)
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
    return PreprocessedVolume(profile, orientation, source, box[0], box[1], stats)
