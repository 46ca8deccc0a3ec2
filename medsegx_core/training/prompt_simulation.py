"""Training samples with simulated prompts, on the two views inference uses.

* zoom-out: the whole foreground crop resized to the model input (the same nearest-exact index maps as
  inference, ``inference.zoom.ZoomMaps``), so the model learns the coarse pass;
* zoom-in: a model-sized window at native resolution around the structure (its centre jittered inside the
  structure's bounding box, zero-padded at the border), as the zoom-in windows are.

Prompts, as a user gives them: the structure's name (text); a box = the tight bounding box with each side pushed
out by a random 0..``box_jitter`` voxels (MedSegX jitters its boxes by 0-20 px); points = ``positive_points``
voxels inside the mask and ``negative_points`` outside it but near it (inside the box grown by ``box_jitter``),
where a user clicks to correct a leak. All coordinates are model-space (d, h, w) voxel indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from ..inference.zoom import ZoomMaps

PROMPT_KINDS = ("text", "box", "points", "text+box", "text+points")
VIEWS = ("zoom-out", "zoom-in")


@dataclass(frozen=True)
class PromptSettings:
    box_jitter: int = 4              # voxels (model space) each box side may move outwards
    positive_points: int = 2
    negative_points: int = 1
    zoom_in_probability: float = 0.5


@dataclass
class PromptedSample:
    image: np.ndarray                # (D, H, W) float32, the model input window
    mask: np.ndarray                 # (D, H, W) float32 in {0, 1}
    name: str                        # text prompt (hierarchy display name)
    kind: str                        # one of PROMPT_KINDS
    view: str                        # "zoom-out" or "zoom-in"
    box: Optional[np.ndarray] = None            # (6,) [d0, h0, w0, d1, h1, w1] inclusive
    points: Optional[np.ndarray] = None         # (N, 3) float32 (d, h, w)
    point_labels: Optional[np.ndarray] = None   # (N,) int64: 1 inside, 0 outside
    context_rows: Tuple[int, ...] = ()          # ConMoAE context (ContextIndices.rows()) of the structure

    @property
    def uses_text(self) -> bool:
        return "text" in self.kind


def zoom_out_view(image: np.ndarray, mask: np.ndarray, model_shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The crop and its mask resized to the model input with inference's index maps (mask: same nearest map)."""
    maps = ZoomMaps.build(image.shape, model_shape)
    return maps.zoom_out(image), maps.zoom_out(mask)


def zoom_in_view(image: np.ndarray, mask: np.ndarray, model_shape: Sequence[int],
                 rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A model-sized window at native resolution centred on a random point of the structure's bounding box."""
    lo, hi = bounding_box(mask)
    centre = [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)]
    origin = [c - s // 2 for c, s in zip(centre, model_shape)]
    return window(image, origin, model_shape), window(mask, origin, model_shape)


def window(array: np.ndarray, origin: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """``array[origin : origin + shape]`` with zeros where the window leaves the array."""
    out = np.zeros(tuple(shape), dtype=np.float32)
    source, target = [], []
    for o, s, n in zip(origin, shape, array.shape):
        start, stop = max(o, 0), min(o + s, n)
        if stop <= start:
            return out
        source.append(slice(start, stop))
        target.append(slice(start - o, stop - o))
    out[tuple(target)] = array[tuple(source)]
    return out


def bounding_box(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive (lo, hi) voxel indices of the mask's nonzero voxels."""
    where = np.argwhere(mask > 0)
    return where.min(0), where.max(0)


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: int) -> np.ndarray:
    lo, hi = bounding_box(mask)
    lo = np.maximum(lo - rng.integers(0, jitter + 1, size=3), 0)
    hi = np.minimum(hi + rng.integers(0, jitter + 1, size=3), np.asarray(mask.shape) - 1)
    return np.concatenate([lo, hi]).astype(np.float32)


def sample_points(mask: np.ndarray, rng: np.random.Generator, positive: int, negative: int,
                  margin: int) -> Tuple[np.ndarray, np.ndarray]:
    """``positive`` voxels inside, ``negative`` outside within the bounding box grown by ``margin`` (anywhere
    outside when that region is all mask)."""
    inside = np.argwhere(mask > 0)
    points = [inside[rng.integers(len(inside))] for _ in range(positive)]
    lo, hi = bounding_box(mask)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, np.asarray(mask.shape) - 1)
    region = mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1]
    outside = np.argwhere(region == 0) + lo
    if len(outside) == 0:
        outside = np.argwhere(mask == 0)
    if len(outside):
        points += [outside[rng.integers(len(outside))] for _ in range(negative)]
    labels = [1] * positive + [0] * (len(points) - positive)
    return np.asarray(points, dtype=np.float32), np.asarray(labels, dtype=np.int64)


def simulate(image: np.ndarray, mask: np.ndarray, name: str, kind: str, view: str, model_shape: Sequence[int],
             rng: np.random.Generator, settings: PromptSettings = PromptSettings(),
             view_transform: Optional[Callable] = None) -> Optional[PromptedSample]:
    """One prompted sample of the structure ``mask`` in ``image`` (both the foreground crop, (d, h, w)).
    ``view_transform(view_image, view_mask) -> (image, mask)`` changes the view before the prompts are read from
    its mask (a spatial augmentation, so that boxes and clicks follow it).

    Returns None when the structure is absent from the view (e.g. thinner than one zoom-out voxel)."""
    if kind not in PROMPT_KINDS or view not in VIEWS:
        raise ValueError(f"unknown prompt kind {kind!r} or view {view!r}")
    if not mask.any():
        return None
    if view == "zoom-out":
        view_image, view_mask = zoom_out_view(image, mask.astype(np.float32), model_shape)
    else:
        view_image, view_mask = zoom_in_view(image, mask.astype(np.float32), model_shape, rng)
    if view_transform is not None:
        view_image, view_mask = view_transform(view_image, view_mask)
    if not view_mask.any():
        return None
    sample = PromptedSample(view_image, view_mask, name, kind, view)
    if "box" in kind:
        sample.box = jittered_box(view_mask, rng, settings.box_jitter)
    if "points" in kind:
        sample.points, sample.point_labels = sample_points(view_mask, rng, settings.positive_points,
                                                           settings.negative_points, settings.box_jitter)
    return sample
