"""Zoom-out geometry: the index maps between the foreground crop and model space, and the foreground rule.

Everything here is array geometry on the foreground crop (``PreprocessedVolume.cropped``, axes (d, h, w)); the
model is run by the predictor. Functions that read image values take the crop as an array or as anything
indexable like one (``PreprocessedVolume.crop_reader``, which normalises only the voxels read). The rules
follow the published SegVol inference (fixture README 5.2): the crop is resized to the model input size with
PyTorch ``nearest-exact``; the coarse logits come back to the crop's shape with the legacy ``nearest`` rule
(float32 ``floor(j * in/out)``). Both are index maps (one per axis) taken from ``torch.nn.functional.interpolate``
itself, so they match it exactly, and are applied as gathers, so no crop-sized intermediate is ever built for
the coarse result. The zoom-in (region of interest, windows, their prompts, blending) is ``zoom_in.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
