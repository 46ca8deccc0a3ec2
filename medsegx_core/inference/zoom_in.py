"""Zoom-in: the region of interest, the sliding windows over it, each window's prompts, and their blending.

The rules follow the published SegVol inference (fixture README 5.3-5.4), on the foreground crop (d, h, w):

* region of interest (ROI): bounding box of the coarse foreground, widened to the window on short axes, clamped
  as the official code does (its maximum may equal the axis length); extended to hold every positive click (ours).
* windows of the model input size over the ROI crop zero-padded to at least one window, overlap 0.5 (MONAI's
  start rule), D-major.
* window prompts: text is passed unchanged; when the user gave a box or points, every window gets the box of the
  coarse mask inside it (``[-1]*6`` when it holds none), as the official code does for several windows; with a
  single window a user box is used instead, aligned with the window (the official code misaligns it when the ROI
  was padded). Points are not re-drawn at random as in the official code: each point goes, deterministically, to
  every window that contains it.
* blending: constant weights (plain average), finished slab by slab as rows of windows complete.
* idle windows (ours, default ``canonical`` mode only): a window that holds neither coarse foreground nor a click
  can only confirm background the zoom-out pass already found; it is skipped and adds nothing to the average
  (a voxel that only skipped windows cover keeps the coarse result).

``zoom_in`` blends the windows in order from a caller's ``readable_logits(index)``; ``blend_region`` writes that
blend over the crop canvases and, given the previous call's ``BlendedRegion``, re-blends only the rows a new prompt
changed. The model calls (batched), their caches and which windows are skipped belong to ``window_refiner.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from monai.data.utils import dense_patch_slices

from ..progress import CancelToken, ProgressCallback, check, report
from .prompt_mapping import CropPrompts
from .zoom import ZoomMaps, foreground

OVERLAP = 0.5
EMPTY_BOX = (-1.0,) * 6


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
    roi_dhw: tuple[int, ...] = ()   # the official ROI it covers: lo (d, h, w) then hi, inclusive (hi may be n)
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
                   tuple(tuple(int(lo) for lo, _ in s) for s in starts),
                   tuple(int(v) for v in roi_lo) + tuple(int(v) for v in roi_hi_inclusive))

    def __len__(self) -> int:
        return len(self.origins)

    @property
    def region(self) -> tuple[slice, ...]:
        """The blended region (the ROI crop) as crop slices."""
        return tuple(slice(lo, hi) for lo, hi in zip(self.region_lo, self.region_hi))

    @property
    def region_shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in zip(self.region_lo, self.region_hi))

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

    def coarse_extent(self, coarse_foreground_model: np.ndarray, maps: ZoomMaps,
                      index: int) -> Optional[tuple[list, list]]:
        """Inclusive window-local ``(lo, hi)`` of the coarse mask (resized back to the crop) inside window
        ``index``, or None when the window holds none of it.

        Worked out in model space: the resize back is a separable gather, so the crop-space mask inside the
        window is the model-space mask at the model indices its voxels read; the extent along an axis is the
        projection of that (at most window-sized, usually far smaller) model-space block. Equal to resizing
        the window's part back and boxing it, at a fraction of the cost."""
        crop, local = self.readable(index)
        read = [np.unique(b[s], return_inverse=True) for b, s in zip(maps.back, crop)]
        block = coarse_foreground_model[np.ix_(*(unique for unique, _ in read))]
        if not block.any():
            return None
        lo, hi = [], []
        for axis, (_, inverse) in enumerate(read):
            present = block.any(axis=tuple(a for a in range(3) if a != axis))[inverse]
            lo.append(local[axis].start + int(np.argmax(present)))
            hi.append(local[axis].start + int(len(present) - 1 - np.argmax(present[::-1])))
        return lo, hi

    def coarse_box(self, coarse_foreground_model: np.ndarray, maps: ZoomMaps, index: int) -> np.ndarray:
        """Inclusive window-local box of the coarse mask in window ``index``, or ``[-1]*6`` when empty."""
        extent = self.coarse_extent(coarse_foreground_model, maps, index)
        if extent is None:
            return np.asarray(EMPTY_BOX, dtype=np.float32)
        return np.asarray(extent[0] + extent[1], dtype=np.float32)

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
    next row's origin is final: it is averaged and handed to ``on_final(d_start, d_stop, logits, covered)``
    (region D indices, the averaged slab, and None when every voxel of the slab had a window, else a bool slab
    of the voxels that had one: a skipped window adds nothing, so a voxel only skipped windows cover keeps
    whatever the caller had there). Only one window depth of slices (and their window counts) is held, not a
    region-sized array (300 MB for a 512x512x300 region of interest). Call ``finish()`` after the last window.

    ``first_slice``, ``stop_slice``: hand over only these region D indices (a caller re-blending only the rows
    a new prompt changed passes the windows that reach into them).
    """

    def __init__(self, plan: WindowPlan, on_final: Callable[..., None], first_slice: int = 0,
                 stop_slice: Optional[int] = None):
        self.plan = plan
        self.on_final = on_final
        self.shape = plan.region_shape
        self.stop = self.shape[0] if stop_slice is None else stop_slice
        self.buffer = np.zeros((plan.window[0],) + self.shape[1:], dtype=np.float32)
        # Windows covering each voxel (at most 8 with overlap 0.5): dividing by them gives the plain average.
        self.counts = np.zeros(self.buffer.shape, dtype=np.uint8)
        self.start = first_slice  # region D index of buffer[0]; every slice before it has been handed over

    def add(self, index: int, logits: np.ndarray) -> None:
        """Add window ``index``'s full-resolution logits (window shape)."""
        self.add_readable(index, logits[self.plan.readable(index)[1]])

    def add_readable(self, index: int, logits: np.ndarray) -> None:
        """Add the logits of the readable part of window ``index`` (``plan.readable(index)[0]``'s shape)."""
        crop, _ = self.plan.readable(index)
        self._release_before(crop[0].start - self.plan.region_lo[0])
        target = (slice(crop[0].start - self.plan.region_lo[0] - self.start,
                        crop[0].stop - self.plan.region_lo[0] - self.start),) + tuple(
            slice(c.start - lo, c.stop - lo) for c, lo in zip(crop[1:], self.plan.region_lo[1:]))
        self.buffer[target] += logits
        self.counts[target] += 1

    def skip(self, index: int) -> None:
        """Window ``index`` adds nothing, but it still arrives in order: the slices before it are final."""
        self._release_before(self.plan.readable(index)[0][0].start - self.plan.region_lo[0])

    def finish(self) -> None:
        self._release_before(self.stop)

    def _release_before(self, stop: int) -> None:
        count = min(stop, self.stop) - self.start
        if count <= 0:
            return
        # Rows of windows overlap (or at least touch), so a row never starts a whole window past the last.
        assert count <= len(self.buffer), "windows must arrive D-major with overlapping rows"
        slab, counts = self.buffer[:count], self.counts[:count]
        covered = counts > 0
        if covered.all():
            slab /= counts
            self.on_final(self.start, self.start + count, slab, None)
        else:
            np.divide(slab, counts, out=slab, where=covered)
            self.on_final(self.start, self.start + count, slab, covered)
        kept = len(self.buffer) - count
        for array in (self.buffer, self.counts):
            if kept > 0:
                array[:kept] = array[count:].copy()
            array[max(kept, 0):] = 0
        self.start += count


@dataclass(frozen=True)
class WindowPrompts:
    """The prompts of one window, window-local model coordinates (d, h, w)."""

    points: np.ndarray            # (N, 3) float
    labels: np.ndarray            # (N,)
    box: Optional[np.ndarray]     # (6,) inclusive, ``EMPTY_BOX`` for a window without coarse foreground, or None

    def cache_key(self) -> tuple:
        """Exactly what the decoder receives, for caches of decoded windows."""
        return (np.asarray(self.points, np.float64).tobytes(), np.asarray(self.labels).tobytes(),
                None if self.box is None else np.asarray(self.box, np.float32).tobytes())


def plan_windows(coarse_foreground: np.ndarray, maps: ZoomMaps, window: Sequence[int],
                 prompts: CropPrompts) -> Optional[WindowPlan]:
    """The windows over the ROI of the coarse foreground (model shape) and the positive clicks, or None when
    there is neither (the coarse result is then kept, as SegVol does)."""
    roi = region_of_interest(coarse_foreground, maps, window, include_voxels=prompts.positive_voxels)
    return None if roi is None else WindowPlan.official(roi[0], roi[1], maps.cropped_shape, window)


def window_prompts(plan: WindowPlan, index: int, prompts: CropPrompts, coarse_foreground: np.ndarray,
                   maps: ZoomMaps) -> WindowPrompts:
    points, labels = plan.points_in_window(prompts.points, prompts.labels, index)
    if prompts.box_lo is not None and len(plan) == 1:
        box = plan.box_in_window(prompts.box_lo, prompts.box_hi, index)
    elif prompts.spatial:
        box = plan.coarse_box(coarse_foreground, maps, index)
    else:
        box = None
    return WindowPrompts(points, labels, box)


def is_idle(plan: WindowPlan, index: int, prompts: WindowPrompts, coarse_foreground: np.ndarray,
            maps: ZoomMaps) -> bool:
    """Whether window ``index`` holds neither coarse foreground nor a click (its refinement can only confirm
    background the zoom-out pass already found; the default mode skips it, see ``zoom_in``)."""
    if len(prompts.points):
        return False
    if prompts.box is not None and len(plan) > 1:   # the window's coarse box already says it
        return bool(np.array_equal(prompts.box, np.asarray(EMPTY_BOX, np.float32)))
    return plan.coarse_extent(coarse_foreground, maps, index) is None


def zoom_in(plan: WindowPlan, readable_logits: Callable[[int], Optional[np.ndarray]],
            on_final: Callable[..., None], progress: Optional[ProgressCallback] = None,
            cancel: Optional[CancelToken] = None, slices: Optional[tuple[int, int]] = None) -> None:
    """The windows of ``plan`` blended: ``readable_logits(index)`` gives the full-resolution logits of the
    readable part of window ``index``, or None for a skipped window (it adds nothing); finished region slabs go
    to ``on_final(d_start, d_stop, logits, covered)`` (see ``RegionBlender``). ``slices`` (region D indices,
    stop exclusive): blend only the windows that reach into them and hand over only those slices."""
    d_lo, d_hi = slices if slices is not None else (0, plan.region_hi[0] - plan.region_lo[0])
    reach = [i for i in range(len(plan))
             if plan.origins[i][0] - plan.region_lo[0] < d_hi and plan.origins[i][0] + plan.window[0]
             - plan.region_lo[0] > d_lo]

    def within(d_start: int, d_stop: int, logits: np.ndarray, covered) -> None:
        start, stop = max(d_start, d_lo), min(d_stop, d_hi)
        if start < stop:
            part = slice(start - d_start, stop - d_start)
            on_final(start, stop, logits[part], None if covered is None else covered[part])

    first = max(0, min((plan.origins[i][0] - plan.region_lo[0] for i in reach), default=0))
    blender = RegionBlender(plan, within, first_slice=min(first, d_lo), stop_slice=d_hi)
    for step, index in enumerate(reach):
        check(cancel)
        report(progress, step / len(reach), f"blending window {step + 1}/{len(reach)}")
        logits = readable_logits(index)
        if logits is not None:
            blender.add_readable(index, logits)
        else:
            blender.skip(index)
    blender.finish()


@dataclass(frozen=True)
class BlendedRegion:
    """A blend written over the plan's region, kept so that the next call on the same plan re-blends only the rows
    of windows whose logits changed (a click changes the prompts of a few windows; the others give the same
    logits)."""

    plan: WindowPlan
    keys: tuple                        # per window: what its logits depend on; None for a skipped window
    mask: np.ndarray                   # uint8, the region of interest of the crop
    logits: Optional[np.ndarray]       # float32, the same region, when the canvas had logits


def blend_region(plan: WindowPlan, keys: Sequence, readable_logits: Callable[[int], Optional[np.ndarray]],
                 mask_crop: np.ndarray, logits_crop: Optional[np.ndarray], previous: Optional[BlendedRegion] = None,
                 progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> BlendedRegion:
    """The windows' average written over the region of interest of the crop canvases: its foreground on
    ``mask_crop``, its values on ``logits_crop`` (or None). ``keys[i]`` says what window i's logits depend on
    (None: skipped; a voxel only skipped windows cover keeps what the canvas held, the coarse result).
    With ``previous`` on the same plan, the windows' rows whose keys did not change are copied from it and only
    the rows reaching into the changed windows' slices are blended again (bit-identical: the same windows in the
    same order)."""
    region = plan.region
    slices = None
    if previous is not None and previous.plan == plan and (logits_crop is None or previous.logits is not None):
        _copy_covered(plan, keys, previous, mask_crop, logits_crop)
        changed = [i for i, (key, before) in enumerate(zip(keys, previous.keys)) if key != before]
        rows = [plan.readable(i)[0][0] for i in changed]
        slices = (min((r.start for r in rows), default=0) - plan.region_lo[0],
                  max((r.stop for r in rows), default=0) - plan.region_lo[0])

    def write_final(d_start: int, d_stop: int, logits: np.ndarray, covered: Optional[np.ndarray]) -> None:
        rows = (slice(plan.region_lo[0] + d_start, plan.region_lo[0] + d_stop),) + region[1:]
        if covered is None:
            mask_crop[rows] = foreground(logits)
            if logits_crop is not None:
                logits_crop[rows] = logits
        else:
            mask_crop[rows][covered] = foreground(logits[covered])
            if logits_crop is not None:
                logits_crop[rows][covered] = logits[covered]

    if slices is None or slices[0] < slices[1]:
        zoom_in(plan, readable_logits, write_final, progress, cancel, slices=slices)
    return BlendedRegion(plan, tuple(keys), mask_crop[region].copy(),
                         None if logits_crop is None else logits_crop[region].copy())


def _copy_covered(plan: WindowPlan, keys: Sequence, previous: BlendedRegion, mask_crop: np.ndarray,
                  logits_crop: Optional[np.ndarray]) -> None:
    """The previous result wherever a window that ran covered it (the changed rows are blended again after)."""
    region = plan.region
    if all(key is not None for key in keys):
        boxes = [tuple(slice(0, n) for n in plan.region_shape)]
    else:   # voxels only skipped windows cover show this call's coarse result, already on the canvas
        boxes = [tuple(slice(c.start - lo, c.stop - lo) for c, lo in zip(plan.readable(i)[0], plan.region_lo))
                 for i, key in enumerate(keys) if key is not None]
    for box in boxes:
        mask_crop[region][box] = previous.mask[box]
        if logits_crop is not None:
            logits_crop[region][box] = previous.logits[box]
