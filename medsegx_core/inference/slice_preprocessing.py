"""How each 2D model wants a slice, in one place: intensities, the model input, the box, the logits back.

LiteMedSAM (as trained; upstream ``pre_CT_MR.py`` and ``CVPR24_LiteMedSAM_infer.py``):
* intensities: CT clipped to window level 40 / width 400 ([-160, 240] HU); MR (anything not CT) clipped to the
  0.5-99.5 percentiles of its non-zero voxels; both scaled to 0..255, and for MR voxels that were 0 stay 0;
* per slice: grey copied to 3 channels; the longest side resized to 256 (area averaging when shrinking, bilinear
  when enlarging); min-max to [0, 1]; zero-padded at the bottom and right to 256 x 256;
* the box ``[x_min, y_min, x_max, y_max]`` in slice pixels scaled by 256 / max(H, W);
* logits (256 x 256) cropped to the unpadded size, bilinear back to the slice size, mask = logits > 0.

MedSegX's 2D model (the parity fixture's convention): ``window_to_uint8`` (CT -160..240 HU, rounded to uint8),
zero-padded to a square first and resized with antialiasing (see ``slice_predictor.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from torch.nn import functional as F

CT_MODALITIES = ("CT", "CTA", "CBCT")
LITEMEDSAM_CT_WINDOW = (-160.0, 240.0)      # level 40, width 400
MR_PERCENTILES = (0.5, 99.5)
CT_WINDOW = (-160.0, 240.0)                 # MedSegX fixture's HU window


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Intensities clipped to [low, high] and mapped linearly onto 0..255, rounded half to even (the MedSegX
    fixture's slice convention for CT; MedSegX slice mode uses it for every non-uint8 grey image)."""
    scaled = (np.clip(np.asarray(values, dtype=np.float64), low, high) - low) / (high - low) * 255
    return np.round(scaled).astype(np.uint8)


@dataclass(frozen=True)
class IntensityWindow:
    """Volume-wide mapping of intensities onto 0..255 (LiteMedSAM's training conversion)."""
    low: float
    high: float
    keep_zero: bool        # MR: voxels that were exactly 0 (background) stay 0
    description: str

    def apply(self, plane: np.ndarray) -> np.ndarray:
        values = np.asarray(plane, dtype=np.float32)
        scaled = (np.clip(values, self.low, self.high) - self.low) * np.float32(255.0 / (self.high - self.low))
        if self.keep_zero:
            scaled[values == 0] = 0.0
        return scaled


def litemedsam_window(array: np.ndarray, modality_name: str) -> IntensityWindow:
    """The intensity window LiteMedSAM was trained with for this volume (CT by HU, else by percentiles)."""
    if modality_name in CT_MODALITIES:
        low, high = LITEMEDSAM_CT_WINDOW
        return IntensityWindow(low, high, False, f"CT window level 40 / width 400 ({low:g}..{high:g} HU)")
    flat = np.asarray(array).ravel()
    sample = flat[:: max(1, flat.size // 4_000_000)]
    nonzero = sample[sample != 0].astype(np.float64)
    if nonzero.size == 0:
        return IntensityWindow(0.0, 1.0, True, "blank volume")
    low, high = (float(v) for v in np.percentile(nonzero, MR_PERCENTILES))
    if high <= low:
        low, high = float(nonzero.min()), float(max(nonzero.max(), nonzero.min() + 1))
    return IntensityWindow(low, high, True, f"MR percentiles {MR_PERCENTILES[0]}-{MR_PERCENTILES[1]} of non-zero "
                                            f"voxels ({low:.4g}..{high:.4g})")


def resized_shape(shape: Tuple[int, int], side: int) -> Tuple[int, int]:
    """(h, w) after scaling the longest side to ``side`` (rounded as upstream: int(x * scale + 0.5))."""
    scale = side / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def longest_side_to(plane: np.ndarray, side: int) -> torch.Tensor:
    """A plane (H, W) as float32 (1, 1, h, w) with its longest side scaled to ``side`` (area when shrinking,
    bilinear when enlarging), as LiteMedSAM's training resized its images."""
    image = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    new_h, new_w = resized_shape(plane.shape, side)
    if (new_h, new_w) == tuple(plane.shape):
        return image
    shrinking = new_h < plane.shape[0]
    return F.interpolate(image, size=(new_h, new_w), mode="area" if shrinking else "bilinear",
                         align_corners=None if shrinking else False)


def pad_to_square(image: torch.Tensor, side: int) -> torch.Tensor:
    """Zero padding at the bottom and right up to ``side`` x ``side`` (the model's input grid)."""
    return F.pad(image, (0, side - image.shape[-1], 0, side - image.shape[-2]))


def litemedsam_input(grey: np.ndarray, side: int = 256) -> torch.Tensor:
    """A slice on the 0..255 scale (H, W) -> the model input (3, side, side) float32 in [0, 1]."""
    image = longest_side_to(grey, side)
    low, high = image.min(), image.max()
    image = (image - low) / torch.clamp(high - low, min=1e-8)
    return pad_to_square(image, side)[0].expand(3, -1, -1).contiguous()


def box_to_model(box: np.ndarray, shape: Tuple[int, int], side: int = 256) -> np.ndarray:
    """[x_min, y_min, x_max, y_max] slice pixels -> model input pixels."""
    return np.asarray(box, dtype=np.float32) * np.float32(side / max(shape))


def points_to_model(points_xy: np.ndarray, shape: Tuple[int, int], side: int = 256) -> np.ndarray:
    return np.asarray(points_xy, dtype=np.float32) * np.float32(side / max(shape))


def logits_to_slice(lowres: torch.Tensor, shape: Tuple[int, int], side: int = 256) -> torch.Tensor:
    """(B, 1, side, side) logits -> (B, H, W) on the slice: crop the padding, bilinear back to the slice."""
    new_h, new_w = resized_shape(shape, side)
    cropped = lowres[..., :new_h, :new_w].float()
    return F.interpolate(cropped, size=tuple(shape), mode="bilinear", align_corners=False)[:, 0]
