"""Zoom-out-zoom-in geometry: resizes, region of interest, sliding windows, per-window prompts, blending.

Everything here is array geometry on the foreground crop (``PreprocessedVolume.cropped``, axes (d, h, w)); the
model is run by the predictor. Functions that read image values take the crop as an array or as anything
indexable like one (``PreprocessedVolume.crop_reader``, which normalises only the voxels read). The rules
follow the published SegVol inference (fixture README 5.2-5.4):

* zoom-out: the crop is resized to the model input size with PyTorch ``nearest-exact``; the coarse logits come
  back to the crop's shape with the legacy ``nearest`` rule (float32 ``floor(j * in/out)``). Both are index
  maps (one per axis) taken from ``torch.nn.functional.interpolate`` itself, so they match it exactly, and are
  applied as gathers, so no crop-sized intermediate is ever built for the coarse result.
* region of interest (ROI): bounding box of sigmoid(coarse) > 0.5, widened to the window on short axes,
  clamped as the official code does (its maximum may equal the axis length).
* zoom-in: windows of the model input size over the ROI crop zero-padded to at least one window, overlap 0.5
  (MONAI's start rule), D-major; constant blending (plain average).

Window prompts (documented in DESIGN.md, "Predictor"): text is passed unchanged; when the user gave a box or
points, every window gets the box of the coarse mask inside it (``[-1]*6`` when it holds none), as the official
code does for several windows; with a single window a user box is used instead, aligned with the window (the
official code misaligns it when the ROI was padded). Points are not re-drawn at random as in the official code:
each point goes, deterministically, to every window that contains it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices

OVERLAP = 0.5
EMPTY_BOX = (-1.0,) * 6


def resize_index(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """Source index of each output index for a 1-D resize, exactly as ``F.interpolate(mode=...)`` picks it."""
    # float32 input, as the official resizes: the kernel computes its scale in the input's precision, and
    # the legacy `nearest` rule picks a different source index in float32 than in exact arithmetic (the
    # fixture has one). float32 holds every index below 2**24 exactly. The (n, 1, 1) shape makes torch use
    # its 3-D kernel, as the official 3-D resizes do (the scale is per axis, so the maps are separable).
    source = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, in_size, 1, 1)
    picked = F.interpolate(source, size=(out_size, 1, 1), mode=mode)
    return picked.reshape(-1).to(torch.int64).numpy()


@dataclass(frozen=True)
class ZoomMaps:
    """Index maps between the foreground crop and model space, per axis (d, h, w)."""

    out: tuple[np.ndarray, np.ndarray, np.ndarray]   # model index -> crop index (nearest-exact)
    back: tuple[np.ndarray, np.ndarray, np.ndarray]  # crop index -> model index (legacy nearest)
    cropped_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]

    @classmethod
    def build(cls, cropped_shape: Sequence[int], model_shape: Sequence[int]) -> "ZoomMaps":
        cropped_shape = tuple(int(n) for n in cropped_shape)
        model_shape = tuple(int(n) for n in model_shape)
        out = tuple(resize_index(c, m, "nearest-exact") for c, m in zip(cropped_shape, model_shape))
        back = tuple(resize_index(m, c, "nearest") for c, m in zip(cropped_shape, model_shape))
        return cls(out, back, cropped_shape, model_shape)

    def zoom_out(self, cropped: np.ndarray) -> np.ndarray:
        """The zoom-out model input (model shape, float32) from the crop."""
        return np.ascontiguousarray(cropped[np.ix_(*self.out)], dtype=np.float32)

    def back_to_crop(self, zoomed: np.ndarray, region: Optional[Sequence[slice]] = None) -> np.ndarray:
        """The zoomed array resized back (legacy nearest) to the crop, or to ``region`` of it."""
        region = region or tuple(slice(0, n) for n in self.cropped_shape)
        index = [b[s] for b, s in zip(self.back, region)]
        return zoomed[np.ix_(*index)]

    def back_to_crop_into(self, zoomed: np.ndarray, out: np.ndarray, slab: int = 16) -> None:
        """``back_to_crop`` written into ``out`` (crop-shaped, any dtype) slab by slab, so no crop-sized
        temporary is built (75 MB of bool for a 512x512x300 crop, and as much again converting it)."""
        whole = (slice(None), slice(None))
        for start in range(0, self.cropped_shape[0], slab):
            out[start:start + slab] = self.back_to_crop(zoomed, (slice(start, start + slab),) + whole)

    def points_to_model(self, points_dhw: np.ndarray) -> np.ndarray:
        """Continuous crop coordinates -> model coordinates (the inverse of the resize's sample positions)."""
        scale = np.asarray(self.model_shape, np.float64) / np.asarray(self.cropped_shape, np.float64)
        return (np.asarray(points_dhw, np.float64) + 0.5) * scale - 0.5

    def box_to_model(self, box_lo: Sequence[int], box_hi: Sequence[int]) -> np.ndarray:
        """Inclusive crop-voxel box -> the inclusive bounding box of its resized cube in model space."""
        lo, hi = [], []
        for axis in range(3):
            source = self.out[axis]
            first = int(np.searchsorted(source, box_lo[axis], side="left"))
            last = int(np.searchsorted(source, box_hi[axis], side="right")) - 1
            if first > last:  # thinner than the sampling step: the nearest model slice
                centre = 0.5 * (box_lo[axis] + box_hi[axis])
                first = last = int(np.argmin(np.abs(source - centre)))
            lo.append(first)
            hi.append(last)
        return np.asarray(lo + hi, dtype=np.float32)


def foreground(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """sigmoid(logits) > 0.5 as the official code computes it, slab by slab (no full-size float copy)."""
    logits = torch.as_tensor(logits)
    out = np.empty(tuple(logits.shape), dtype=bool)
    for start in range(0, logits.shape[0], 8):
        out[start:start + 8] = (torch.sigmoid(logits[start:start + 8].float()) > 0.5).numpy()
    return out


def region_of_interest(coarse_foreground_model: np.ndarray, maps: ZoomMaps, window: Sequence[int],
                       include_voxels: Optional[np.ndarray] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The official ROI ``(lo, hi)`` (inclusive, hi may equal the axis length) in crop indices, or None.

    The coarse mask is the zoom-out foreground resized back to the crop; its bounding box is found from
    per-axis projections through the back maps, which is exact for a separable nearest resize.
    ``include_voxels`` (N, 3) crop voxels (the positive clicks) are added to the box: a click says "this is
    the structure", so it must be zoomed in on even where the coarse result missed it (our addition; the
    official code has no clicks in its pipeline cases, so parity is unaffected).
    """
    include = np.zeros((0, 3), dtype=int) if include_voxels is None else np.asarray(include_voxels, int)
    lo, hi = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present_model = coarse_foreground_model.any(axis=others)
        present_crop = present_model[maps.back[axis]].copy()
        present_crop[include[:, axis]] = True
        if not present_crop.any():
            return None
        first = int(np.argmax(present_crop))
        last = int(len(present_crop) - 1 - np.argmax(present_crop[::-1]))
        widen = max(0, window[axis] - (last - first + 1)) // 2
        lo.append(max(first - widen, 0))
        hi.append(min(last + widen, maps.cropped_shape[axis]))
    return np.asarray(lo), np.asarray(hi)


@dataclass(frozen=True)
class WindowPlan:
    """Where the zoom-in windows lie, in crop coordinates.

    ``origins`` are the windows' first voxels in the crop (negative where the ROI was padded), D-major.
    ``region_lo/hi`` (exclusive) bound the blended region (the ROI crop) and what windows may read: voxels of
    a window outside it are zeros, as in the official zero-padded ROI crop.
    """

    window: tuple[int, int, int]
    region_lo: tuple[int, int, int]
    region_hi: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]
    starts_padded: tuple[tuple[int, int, int], ...]
    origins: tuple[tuple[int, int, int], ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "origins", tuple(
            tuple(lo - pad + s for lo, pad, s in zip(self.region_lo, self.pad_before, start))
            for start in self.starts_padded))

    @classmethod
    def official(cls, roi_lo, roi_hi_inclusive, cropped_shape, window) -> "WindowPlan":
        """The official sliding window over the ROI crop ``roi_lo .. roi_hi`` (truncated at the array end)."""
        window = tuple(int(w) for w in window)
        region_lo = tuple(int(v) for v in roi_lo)
        region_hi = tuple(min(int(h) + 1, int(n)) for h, n in zip(roi_hi_inclusive, cropped_shape))
        size = [hi - lo for lo, hi in zip(region_lo, region_hi)]
        diff = [max(w - s, 0) for w, s in zip(window, size)]
        before = tuple(d // 2 for d in diff)
        after = tuple(d - d // 2 for d in diff)
        padded = [s + d for s, d in zip(size, diff)]
        interval = [w if p == w else max(int(w * (1 - OVERLAP)), 1) for w, p in zip(window, padded)]
        starts = dense_patch_slices(padded, window, interval, return_slice=False)
        return cls(window, region_lo, region_hi, before, after,
                   tuple(tuple(int(lo) for lo, _ in s) for s in starts))

    def __len__(self) -> int:
        return len(self.origins)

    def readable(self, index: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(crop slices, window-local slices) of the part of window ``index`` that holds real data."""
        crop, local = [], []
        for origin, lo, hi, w in zip(self.origins[index], self.region_lo, self.region_hi, self.window):
            first, last = max(origin, lo), min(origin + w, hi)
            crop.append(slice(first, last))
            local.append(slice(first - origin, last - origin))
        return tuple(crop), tuple(local)

    def cache_key(self, index: int) -> tuple:
        """What a window's image content depends on (its origin and readable part), for embedding caches."""
        crop, _ = self.readable(index)
        return self.origins[index], tuple((s.start, s.stop) for s in crop)

    def window_image(self, cropped: np.ndarray, index: int) -> np.ndarray:
        """The model input of window ``index``: crop data where readable, zeros elsewhere (float32)."""
        image = np.zeros(self.window, dtype=np.float32)
        crop, local = self.readable(index)
        image[local] = cropped[crop]
        return image

    def coarse_box(self, coarse_foreground_model: np.ndarray, maps: ZoomMaps, index: int) -> np.ndarray:
        """Inclusive window-local box of the coarse mask in window ``index``, or ``[-1]*6`` when empty."""
        crop, local = self.readable(index)
        inside = maps.back_to_crop(coarse_foreground_model, crop)
        if not inside.any():
            return np.asarray(EMPTY_BOX, dtype=np.float32)
        lo, hi = [], []
        for axis in range(3):
            present = inside.any(axis=tuple(a for a in range(3) if a != axis))
            lo.append(local[axis].start + int(np.argmax(present)))
            hi.append(local[axis].start + int(len(present) - 1 - np.argmax(present[::-1])))
        return np.asarray(lo + hi, dtype=np.float32)

    def points_in_window(self, points_dhw: np.ndarray, labels: np.ndarray,
                         index: int) -> tuple[np.ndarray, np.ndarray]:
        """The points (crop coordinates) whose voxel lies in the readable part of window ``index``, local."""
        crop, local = self.readable(index)
        points = np.asarray(points_dhw, np.float64).reshape(-1, 3)
        voxel = np.floor(points + 0.5)
        keep = np.ones(len(points), dtype=bool)
        for axis in range(3):
            keep &= (voxel[:, axis] >= crop[axis].start) & (voxel[:, axis] < crop[axis].stop)
        origin = np.asarray(self.origins[index], np.float64)
        return points[keep] - origin, np.asarray(labels)[keep]

    def box_in_window(self, box_lo: Sequence[int], box_hi: Sequence[int], index: int) -> np.ndarray:
        """An inclusive crop-voxel box in window-local coordinates, clipped to the window."""
        origin = np.asarray(self.origins[index])
        lo = np.clip(np.asarray(box_lo) - origin, 0, np.asarray(self.window) - 1)
        hi = np.clip(np.asarray(box_hi) - origin, 0, np.asarray(self.window) - 1)
        return np.concatenate([lo, hi]).astype(np.float32)


class RegionBlender:
    """Constant-weight average of window logits over the plan's region (the official blending, float32).

    Windows arrive D-major, so once a row of windows (one D origin) is done, every region slice before the
    next row's origin is final: it is averaged and handed to ``on_final(d_start, d_stop, logits)`` (region D
    indices, the averaged slab). Only one window depth of slices is held, not a region-sized array
    (300 MB for a 512x512x300 region of interest). Call ``finish()`` after the last window.
    """

    def __init__(self, plan: WindowPlan, on_final: Callable[[int, int, np.ndarray], None]):
        self.plan = plan
        self.on_final = on_final
        self.shape = tuple(hi - lo for lo, hi in zip(plan.region_lo, plan.region_hi))
        # Windows form a grid, so the number covering a voxel is the product of per-axis counts: no
        # region-sized count array is needed.
        self.count_along = []
        for axis in range(3):
            count = np.zeros(self.shape[axis], dtype=np.float32)
            for origin in sorted({o[axis] for o in plan.origins}):
                first = max(origin - plan.region_lo[axis], 0)
                count[first:max(origin + plan.window[axis] - plan.region_lo[axis], 0)] += 1
            self.count_along.append(count)
        self.plane_count = np.outer(self.count_along[1], self.count_along[2]).astype(np.float32)
        self.buffer = np.zeros((plan.window[0],) + self.shape[1:], dtype=np.float32)
        self.start = 0          # region D index of buffer[0]; every slice before it has been handed over

    def add(self, index: int, logits: np.ndarray) -> None:
        """Add window ``index``'s full-resolution logits (window shape)."""
        crop, local = self.plan.readable(index)
        self._release_before(crop[0].start - self.plan.region_lo[0])
        target = (slice(crop[0].start - self.plan.region_lo[0] - self.start,
                        crop[0].stop - self.plan.region_lo[0] - self.start),) + tuple(
            slice(c.start - lo, c.stop - lo) for c, lo in zip(crop[1:], self.plan.region_lo[1:]))
        self.buffer[target] += logits[local]

    def finish(self) -> None:
        self._release_before(self.shape[0])

    def _release_before(self, stop: int) -> None:
        count = min(stop, self.shape[0]) - self.start
        if count <= 0:
            return
        # Rows of windows overlap (or at least touch), so a row never starts a whole window past the last.
        assert count <= len(self.buffer), "windows must arrive D-major with overlapping rows"
        slab = self.buffer[:count]
        for offset in range(count):
            slab[offset] /= self.count_along[0][self.start + offset] * self.plane_count
        self.on_final(self.start, self.start + count, slab)
        kept = len(self.buffer) - count
        if kept > 0:
            self.buffer[:kept] = self.buffer[count:].copy()
        self.buffer[max(kept, 0):] = 0
        self.start += count
