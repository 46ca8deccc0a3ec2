"""MedSegX's official evaluation of one 2D sample (README of the parity fixture, section 5, steps 4-10), for the
parity test (``engine/test_medsegx_parity.py``); the engine's own slice path is ``medsegx_core.slice_predictor``.

From a MedSegDB-style slice (uint8 (S, S, 3) image, 0/1 (S, S) label, ``Modality_Task`` folder name): the box of
the label, the context from the folder name, image and box brought to the 256 input (bilinear with antialias;
box times 256/S, unrounded), the model, logits back to S x S (bilinear with antialias), masks ``sigmoid > 0.5``,
and the Dice of each of the three masks; the official figure is the best of them, an oracle choice that uses the
label (the IoU prediction is never used to choose).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from medsegx_core.data.hierarchy import ContextIndices, resolve_task_folder
from medsegx_core.data.metrics import dice
from medsegx_core.errors import InputError
from medsegx_core.inference.slice_preprocessing import CT_WINDOW, window_to_uint8
from medsegx_core.modeling.medsegx2d.model import MedSegX2D


def medsegdb_slice(raw_slice: np.ndarray, label: np.ndarray, window: Tuple[float, float] = CT_WINDOW
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """A CT slice (rows, cols) and its 0/1 label -> MedSegDB-style files: uint8 (S, S, 3) image, uint8 (S, S)
    label, S = the longer side. Windowed to uint8 (round half to even), zero-padded at the bottom/right to a
    square (the official evaluation assumes square slices), grey copied to three channels."""
    if raw_slice.ndim != 2 or raw_slice.shape != label.shape:
        raise InputError(f"a slice and its label must be 2-D arrays of one shape (got {raw_slice.shape} and "
                         f"{label.shape})")
    grey = window_to_uint8(raw_slice, *window)
    side = max(grey.shape)
    pad = ((0, side - grey.shape[0]), (0, side - grey.shape[1]))
    image = np.repeat(np.pad(grey, pad)[..., None], 3, axis=-1)
    return image, np.pad((label > 0).astype(np.uint8), pad)


def box_from_label(label: np.ndarray) -> np.ndarray:
    """[x_min, y_min, x_max, y_max] (float32, inclusive pixel indices) of the label's foreground."""
    rows, cols = np.nonzero(label)
    if rows.size == 0:
        raise InputError("the label is empty: MedSegX's evaluation takes its box from the label, so the slice "
                         "needs at least one foreground pixel")
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)


def context_from_task_folder(folder: str) -> ContextIndices:
    """MedSegDB's 'Modality_Task' folder name (e.g. 'CT_LeftKidney') -> context indices."""
    term, _ = resolve_task_folder(folder)
    return term.context


@dataclass
class SliceEvaluation:
    context: ContextIndices
    box_native: np.ndarray        # (4,) float32
    box_input: torch.Tensor       # (1, 4) float32, box in the model's input frame
    image_input: torch.Tensor     # (1, 3, 256, 256) float32, 0..255
    logits: torch.Tensor          # (1, 3, 256, 256)
    iou_pred: torch.Tensor        # (1, 3), computed but not used by the official evaluation
    logits_label_res: torch.Tensor  # (1, 3, S, S)
    masks_label_res: np.ndarray   # (3, S, S) bool
    dice: np.ndarray              # (3,) float64
    trace: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def best_index(self) -> int:
        """The oracle pick the official evaluation reports (uses the label)."""
        return int(np.argmax(self.dice))


@torch.no_grad()
def evaluate_slice(model: MedSegX2D, image: np.ndarray, label: np.ndarray, context: ContextIndices,
                   trace: bool = False) -> SliceEvaluation:
    """Steps 4-10 on one square MedSegDB-style slice: image uint8 (S, S, 3), label (S, S) 0/1."""
    side = model.config.image_size
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1] or label.shape != image.shape[:2]:
        raise InputError(f"MedSegX evaluates square slices (S, S, 3) with an (S, S) label (got {image.shape} and "
                         f"{label.shape}); pad the slice to a square first (medsegdb_slice)")
    size = image.shape[0]
    box_native = box_from_label(label)
    device = model.pixel_mean.device
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)
    boxes = torch.from_numpy(box_native)[None].to(device)
    if size != side:
        pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        boxes = boxes * (side / size)
    details: Dict[str, torch.Tensor] = {}
    out = model(pixels, boxes, [context], trace=details if trace else None)
    logits_label_res = F.interpolate(out.logits, size=(size, size), mode="bilinear", align_corners=False,
                                     antialias=True)
    masks = (torch.sigmoid(logits_label_res) > 0.5)[0].cpu().numpy()
    dice_of_masks = np.array([dice(mask, label) for mask in masks], dtype=np.float64)
    return SliceEvaluation(context, box_native, boxes, pixels, out.logits, out.iou_pred, logits_label_res, masks,
                           dice_of_masks, details)
