"""Prompts in world coordinates (RAS mm) or voxel indices, and their exact conversion to a volume's voxel space.

A user clicks in patient space; the model works in voxel space. The conversion goes through the volume's own
RASToIJK matrix, so it is exact on oblique and mirrored grids. Anything that cannot be segmented (no prompt at
all, a point or box outside the volume, a malformed coordinate) is a ``PromptError`` naming the prompt, the volume
(its ``source``: the file, or the Slicer node's name) and its RAS bounds. This is the one check of what the user
gave: the command line, the Slicer batch script and the Slicer Logic call ``to_voxel`` before any work, and the
predictor calls it again on every request.

Voxel indices are ``(i, j, k)`` (ITK order); arrays are indexed ``[k, j, i]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .data.volume import Volume
from .errors import PromptError

SPACES = ("ras", "ijk")
Triple = Tuple[float, float, float]


def _triple(value, what: str) -> Triple:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise PromptError(f"{what}: {value!r} is not three numbers") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise PromptError(f"{what}: {value!r} is not three finite numbers")
    return triple


def _space(space: str, what: str) -> str:
    if space not in SPACES:
        raise PromptError(f"{what}: space must be 'ras' (mm) or 'ijk' (voxel indices), got {space!r}")
    return space


def _fmt(triple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in triple) + ")"


def _the_volume(volume: Volume) -> str:
    """"the volume 'NAME'" when the volume knows where it came from (a file, a Slicer node's name): the user may
    have several open."""
    return f"the volume '{volume.source}'" if volume.source else "the volume"


@dataclass(frozen=True)
class PointPrompt:
    """A click: RAS mm (``space="ras"``) or voxel indices (``space="ijk"``); positive = foreground."""

    position: Triple
    positive: bool = True
    space: str = "ras"

    def __post_init__(self) -> None:
        object.__setattr__(self, "position", _triple(self.position, "point prompt"))
        object.__setattr__(self, "space", _space(self.space, "point prompt"))
        object.__setattr__(self, "positive", bool(self.positive))

    def describe(self) -> str:
        sign = "positive" if self.positive else "negative"
        unit = "RAS mm" if self.space == "ras" else "voxel ijk"
        return f"{sign} point {_fmt(self.position)} ({unit})"

    def to_ijk(self, volume: Volume) -> np.ndarray:
        point = np.asarray(self.position, dtype=float)
        return volume.ras_to_ijk_points(point) if self.space == "ras" else point


@dataclass(frozen=True)
class BoxPrompt:
    """Two opposite corners of a box, in RAS mm or voxel indices.

    A RAS box is axis-aligned in RAS; on an oblique volume its voxel-space box is the tightest one holding all 8
    corners. A voxel box is taken as given (inclusive voxel centres).
    """

    corner_a: Triple
    corner_b: Triple
    space: str = "ras"

    def __post_init__(self) -> None:
        object.__setattr__(self, "corner_a", _triple(self.corner_a, "box prompt corner"))
        object.__setattr__(self, "corner_b", _triple(self.corner_b, "box prompt corner"))
        object.__setattr__(self, "space", _space(self.space, "box prompt"))

    def describe(self) -> str:
        unit = "RAS mm" if self.space == "ras" else "voxel ijk"
        return f"box {_fmt(self.corner_a)} to {_fmt(self.corner_b)} ({unit})"

    def corners(self) -> np.ndarray:
        """All 8 corners in the prompt's own space, ``(8, 3)``."""
        a, b = np.asarray(self.corner_a), np.asarray(self.corner_b)
        return np.array([[x, y, z] for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])])

    def to_ijk(self, volume: Volume) -> np.ndarray:
        """``(2, 3)`` min and max continuous ijk of the box, before clipping to the volume."""
        corners = self.corners()
        if self.space == "ras":
            corners = volume.ras_to_ijk_points(corners)
        return np.stack([corners.min(axis=0), corners.max(axis=0)])


@dataclass(frozen=True)
class VoxelPrompts:
    """Prompts in one volume's voxel space, as the predictor consumes them."""

    text: Optional[str]
    points_ijk: np.ndarray  # (N, 3) float (i, j, k), unrounded
    labels: np.ndarray  # (N,) int: 1 positive, 0 negative
    box_ijk: Optional[np.ndarray]  # (2, 3) float min/max (i, j, k), inside [0, size - 1]


@dataclass(frozen=True)
class Prompts:
    """What the user asked for: a structure name, clicks, and/or a box. At least one is needed."""

    text: Optional[str] = None
    points: Tuple[PointPrompt, ...] = ()
    box: Optional[BoxPrompt] = None

    def __post_init__(self) -> None:
        if self.text is not None and not isinstance(self.text, str):
            raise PromptError(f"text prompt must be a string, got {type(self.text).__name__}")
        text = self.text.strip() if self.text is not None else None
        object.__setattr__(self, "text", text or None)
        object.__setattr__(self, "points", tuple(self.points))
        for point in self.points:
            if not isinstance(point, PointPrompt):
                raise PromptError(f"points must be PointPrompt objects, got {point!r}")
        if self.box is not None and not isinstance(self.box, BoxPrompt):
            raise PromptError(f"box must be a BoxPrompt, got {self.box!r}")

    def describe(self) -> str:
        parts = ([f"text {self.text!r}"] if self.text else []) + [p.describe() for p in self.points] + \
                ([self.box.describe()] if self.box else [])
        return ", ".join(parts) or "no prompt"

    def to_voxel(self, volume: Volume) -> VoxelPrompts:
        """Convert to ``volume``'s voxel space; ``PromptError`` if empty or outside the volume."""
        if not self.text and not self.box and not any(p.positive for p in self.points):
            what = "only negative points" if self.points else "no text, point or box"
            raise PromptError(f"nothing to segment ({what}): give a structure name, a positive point or a box")
        points = np.array([p.to_ijk(volume) for p in self.points], dtype=float).reshape(-1, 3)
        inside = volume.contains_ijk(points)
        last_voxel = _fmt(np.subtract(volume.shape_ijk, 1))
        for point, ok in zip(self.points, inside):
            if not ok:
                raise PromptError(f"{point.describe()} is outside {_the_volume(volume)} "
                                  f"({volume.describe_ras_bounds()}, voxels 0..{last_voxel}); click inside the image")
        labels = np.array([1 if p.positive else 0 for p in self.points], dtype=np.int64)
        return VoxelPrompts(self.text, points, labels, None if self.box is None else _box_in(self.box, volume))


def _box_in(box: BoxPrompt, volume: Volume) -> np.ndarray:
    """The box in continuous ijk, clipped to the voxel centres; refused if it misses the volume entirely.

    A box that only overhangs the edge is kept (users draw generously); a flat box (drawn on one slice) is kept.
    A box without size (its corners within half a voxel of each other along two or more axes: a point or a line)
    holds nothing to segment and is refused.
    """
    lo, hi = box.to_ijk(volume)
    last = np.asarray(volume.shape_ijk, dtype=float) - 1
    if np.any(hi < -0.5) or np.any(lo > last + 0.5):
        raise PromptError(f"{box.describe()} is outside {_the_volume(volume)} ({volume.describe_ras_bounds()}); "
                          f"draw the box over the image")
    clipped = np.stack([np.clip(lo, 0, last), np.clip(hi, 0, last)])
    if np.count_nonzero(clipped[1] - clipped[0] >= 0.5) < 2:
        raise PromptError(f"{box.describe()} has no size inside the volume (it is a point or a line); give two "
                          f"opposite corners of a box around the structure")
    return clipped


def prompt_sets(texts: Sequence[Optional[str]], points: Sequence[PointPrompt] = (), box: Optional[BoxPrompt] = None,
                name: Optional[str] = None) -> List[Prompts]:
    """One prompt set per structure: each text alone, or one set holding the clicks and the box (with at most one
    text). ``texts``: the structures of ``hierarchy.resolve_structures`` (``[None]`` for none). ``name`` (a segment
    name chosen by the user) is refused with several structures. The command line and the Slicer batch script
    share this rule (and its wording: their options are the same)."""
    texts = list(texts) or [None]
    if len(texts) > 1 and (points or box is not None):
        raise PromptError(f"{len(texts)} structure names (--text) with points or a box: clicks and boxes "
                          f"describe one structure, so give them with a single --text (or run once per structure)")
    if name and len(texts) > 1:
        raise PromptError(f"--name {name!r} names one segment; with several --text values the segments are named "
                          f"after the structures")
    return [Prompts(text=text, points=tuple(points), box=box) for text in texts]


__all__ = ["PointPrompt", "BoxPrompt", "Prompts", "VoxelPrompts", "SPACES", "prompt_sets"]
