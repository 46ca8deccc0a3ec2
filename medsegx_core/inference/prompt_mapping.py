"""Prompts on the preprocessed volume: voxel prompts mapped onto the foreground crop the model sees.

``Prompts.to_voxel`` (prompts.py) is the one check of what the user gave (something to segment, inside the
volume); this adds the one thing only the preprocessing knows: a point or box in the cropped-away border (voxels
at the volume's minimum value, which the model never sees) cannot be segmented.

Crop coordinates are (d, h, w) = working-grid (k, j, i) minus the crop's first voxel; points stay continuous,
the box becomes inclusive crop voxels (the bounding box of its corners, rounded, clipped to the crop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import PromptError
from ..prompts import Prompts, VoxelPrompts
from .preprocessing import PreprocessedVolume


@dataclass(frozen=True)
class CropPrompts:
    """One prompt set on the foreground crop."""

    text: Optional[str]            # the canonical structure name (what the model's template receives)
    context: object                # the ConMoAE ContextIndices the embeddings depend on, or None
    points: np.ndarray             # (N, 3) float crop (d, h, w)
    labels: np.ndarray             # (N,) 1 positive / 0 negative
    box_lo: Optional[np.ndarray]   # (3,) int inclusive crop voxels, or None
    box_hi: Optional[np.ndarray]

    @property
    def spatial(self) -> bool:
        """Whether the user gave points or a box (zoom-in windows then get a box of their own)."""
        return len(self.points) > 0 or self.box_lo is not None

    @property
    def positive_voxels(self) -> np.ndarray:
        """(M, 3) int crop voxels of the positive points."""
        return np.floor(self.points[self.labels == 1] + 0.5).astype(int)


_BORDER = "lies in the empty border of the volume (voxels at its minimum value, which the model never sees)"


def to_crop(prompts: Prompts, voxel: VoxelPrompts, prepared: PreprocessedVolume, text: Optional[str] = None,
            context: object = None) -> CropPrompts:
    """``voxel`` (= ``prompts.to_voxel(volume)``) on ``prepared``'s crop; ``PromptError`` for the border."""
    shape = np.asarray(prepared.cropped_shape)
    points = prepared.points_to_cropped(voxel.points_ijk)
    for point, position in zip(prompts.points, points):
        voxel_index = np.floor(position + 0.5)
        if np.any(voxel_index < 0) or np.any(voxel_index >= shape):
            raise PromptError(f"{point.describe()} {_BORDER}; click on the body")
    box_lo = box_hi = None
    if voxel.box_ijk is not None:
        corners = prepared.points_to_cropped(voxel.box_ijk)
        if np.any(corners.max(axis=0) < -0.5) or np.any(corners.min(axis=0) > shape - 0.5):
            raise PromptError(f"{prompts.box.describe()} {_BORDER}; draw it over the body")
        box_lo = np.clip(np.floor(corners.min(axis=0) + 0.5), 0, shape - 1).astype(int)
        box_hi = np.clip(np.floor(corners.max(axis=0) + 0.5), 0, shape - 1).astype(int)
    return CropPrompts(text=text, context=context, points=points, labels=np.asarray(voxel.labels),
                       box_lo=box_lo, box_hi=box_hi)
