"""MedSegX slice mode: MedSegX's published 2D model (SAM ViT-B + ConMoAE) behind the prompts users know.

```python
sp = SlicePredictor(load_medsegx_weights(folder))      # weights.medsegx2d: our folder, merged or split files
sp.set_volume(volume, modality=None, rgb=None)         # a volume, or a 2D image read as a one-slice volume
result = sp.segment(Prompts(text="liver", box=BoxPrompt(...)), slice_index=None, propagate=False)
# -> SliceResult: mask uint8 (k, j, i) on the volume's grid, the per-slice outputs, the context, notes
```

Per slice (what MedSegX's evaluation does, README of the parity fixture section 5): the slice (rows = j,
cols = i, as stored) becomes uint8 grey (see ``INTENSITY_RULE``), is copied into three channels (a colour
picture keeps its colours), zero-padded at the bottom/right to a square S x S, resized to the model's 256 input
(bilinear, antialias); the box ``[i_min, j_min, i_max, j_max]`` (continuous voxel indices) is scaled by 256/S;
the three output logits are resized back to S x S (bilinear, antialias) and cropped; masks are sigmoid > 0.5.

Which of the three masks: the official evaluation reports the best of three against the label, which a user does
not have. Here ``choice="iou"`` (default) takes the mask the IoU head rates highest; an integer takes that
output always. ``Testing/benchmarks/medsegx_mask_choice.py`` measures how often the IoU head picks the oracle's.

Context: the text names the structure (``hierarchy.resolve_term``), the modality comes from the user, else the
file (DICOM Modality), else the intensities for volumes that are not pictures (``data.modality.routing_modality``).

Propagation: from the box's slice, the neighbouring slices are segmented one after another in both directions,
each with the bounding box of the previous slice's mask widened by ``propagation_margin`` pixels, until the mask
vanishes or the volume ends; progress per slice, cancel between slices. Embeddings are cached per (slice,
context), so a new box on a slice already seen re-runs only the decoder.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from .data.hierarchy import ContextIndices, Modality, context_indices, resolve_term
from .data.modality import routing_modality
from .data.volume import Volume
from .errors import InputError, PromptError
from .inference.device import resolve_device
from .inference.slice_preprocessing import CT_MODALITIES, CT_WINDOW, window_to_uint8
from .modeling.medsegx2d.model import MedSegX2D
from .progress import CancelToken, ProgressCallback, check, report
from .prompts import Prompts

PERCENTILE_WINDOW = (0.5, 99.5)
INTENSITY_RULE = (f"colour pictures as they are; CT (HU) clipped to {list(CT_WINDOW)} HU (the fixture's MedSegDB "
                  f"convention); other uint8 images as they are; anything else mapped from its volume-wide "
                  f"{PERCENTILE_WINDOW[0]}-{PERCENTILE_WINDOW[1]} percentiles onto 0..255")
EPS = 1e-6


@dataclass
class SliceOutput:
    """One slice's forward pass: box in pixels, the three outputs at the slice's resolution, the choice."""
    slice_index: int
    box: np.ndarray               # (4,) [i_min, j_min, i_max, j_max], continuous voxel indices on the slice
    logits: np.ndarray            # (3, rows, cols) float32
    iou_pred: np.ndarray          # (3,) float32, the IoU head's rating of each output
    masks: np.ndarray             # (3, rows, cols) bool, sigmoid > 0.5
    chosen: int                   # index of the output taken

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.chosen]


@dataclass
class SliceResult:
    mask: np.ndarray              # uint8 (k, j, i) on the volume's grid
    name: Optional[str]           # canonical name of the text, or None
    context: ContextIndices
    slices: List[SliceOutput]     # the prompted slice first, then the propagated ones in the order segmented
    runtime: str = ""
    notes: List[str] = field(default_factory=list)

    @property
    def slice_indices(self) -> List[int]:
        return sorted(out.slice_index for out in self.slices if out.mask.any())


def box_of_mask(mask: np.ndarray, margin: float = 0.0) -> Optional[np.ndarray]:
    """[i_min, j_min, i_max, j_max] (inclusive pixel indices) of a 2D mask widened by ``margin`` and kept on the
    slice, or None when the mask is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    high = np.array([mask.shape[1] - 1, mask.shape[0] - 1] * 2, dtype=np.float64)
    box = np.array([cols.min() - margin, rows.min() - margin, cols.max() + margin, rows.max() + margin])
    return np.clip(box, 0, high).astype(np.float32)


def box_on_slice(volume: Volume, prompts: Prompts, slice_index: Optional[int] = None) -> Tuple[int, np.ndarray]:
    """(slice k, box [i_min, j_min, i_max, j_max]) of a prompt set on ``volume``: a box on one slice of the k axis
    (a flat box, or one slice thick), or any box reaching ``slice_index``; PromptError for anything else."""
    if prompts.points:
        raise PromptError("MedSegX's slice model takes a box only (its published model has no point prompts): "
                          "drop the points, or use SegVol weights for clicks")
    if prompts.box is None:
        raise PromptError("MedSegX's slice mode needs a box: give two opposite corners of a box drawn on one "
                          "slice (--box), with --text naming the structure")
    name = volume.source or "the volume"
    slices = volume.array.shape[0]
    if slice_index is not None and not 0 <= int(slice_index) < slices:
        raise PromptError(f"slice {slice_index} is not in {name} (slices 0..{slices - 1})")
    lo, hi = prompts.to_voxel(volume).box_ijk
    extent = hi - lo
    if min(extent[0], extent[1]) < 0.5:
        raise PromptError(f"{prompts.box.describe()} has no width or height on the volume's slices (drawn on "
                          f"another view?); MedSegX segments slices of the k axis: draw the box on one of them")
    covered = list(range(math.ceil(lo[2] - EPS), math.floor(hi[2] + EPS) + 1))
    if slice_index is not None:
        slice_index = int(slice_index)
        if not lo[2] - 0.5 - EPS <= slice_index <= hi[2] + 0.5 + EPS:
            raise PromptError(f"{prompts.box.describe()} lies on slices {lo[2]:.1f}..{hi[2]:.1f} of {name} and "
                              f"does not reach slice {slice_index}; draw it on that slice or drop --slice")
        k = slice_index
    elif not covered:
        raise PromptError(f"{prompts.box.describe()} lies between slices {math.floor(lo[2])} and "
                          f"{math.ceil(hi[2])} of {name}, on no slice; draw it on a slice or pass --slice K")
    elif len(covered) > 1:
        raise PromptError(f"{prompts.box.describe()} spans slices {covered[0]}..{covered[-1]} of {name}: a 3D box, "
                          f"but MedSegX's model is 2D; draw the box on one slice (one slice thick), or pass "
                          f"--slice K to use its outline on slice K")
    else:
        k = covered[0]
    return k, np.array([lo[0], lo[1], hi[0], hi[1]], dtype=np.float32)


def check_slice_precision(precision: str) -> None:
    """MedSegX slice mode runs in fp32 only: "auto" means fp32 here, a reduced precision is refused (the command
    line asks before any reading)."""
    if precision not in ("auto", "fp32"):
        raise InputError(f"precision {precision!r}: MedSegX slice mode runs in fp32 (its parity with the official "
                         f"code is checked there); use --precision fp32 or auto")


class SlicePredictor:
    def __init__(self, model: MedSegX2D, device: Union[str, torch.device] = "auto", choice: Union[str, int] = "iou",
                 propagation_margin: float = 2.0, cached_slices: int = 16, precision: str = "auto"):
        check_slice_precision(precision)
        if not isinstance(model, MedSegX2D):
            raise InputError(f"slice mode needs MedSegX's 2D model, got a {type(model).__name__}; load MedSegX "
                             f"weights (weights.medsegx2d.load_medsegx_weights)")
        outputs = model.config.mask_decoder.num_multimask_outputs
        if choice != "iou" and not (isinstance(choice, int) and 0 <= choice < outputs):
            raise InputError(f"mask choice {choice!r}: use 'iou' (the IoU head's best) or an output index "
                             f"0..{outputs - 1}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.choice = choice
        self.propagation_margin = float(propagation_margin)
        self._cached_slices = int(cached_slices)
        self._embeddings: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.volume: Optional[Volume] = None
        self.rgb: Optional[np.ndarray] = None
        self.modality: Optional[Modality] = None
        self.intensity = ""

    # ---- the image ---------------------------------------------------------------------------------------------
    def set_volume(self, volume: Volume, modality: Optional[str] = None, rgb: Optional[np.ndarray] = None) -> None:
        """The volume (or a 2D image as a one-slice volume, with its colours in ``rgb`` (k, rows, cols, 3)
        uint8) to segment slices of; ``modality`` (a user's choice) overrides the file's."""
        if rgb is not None and (rgb.dtype != np.uint8 or rgb.shape != volume.array.shape + (3,)):
            raise InputError(f"colours of shape {rgb.shape} ({rgb.dtype}) do not fit the image "
                             f"{volume.array.shape}: uint8 (k, rows, cols, 3) is needed")
        chosen = routing_modality(volume, modality, picture=rgb is not None or volume.array.dtype == np.uint8)
        self.volume, self.rgb, self.modality = volume, rgb, chosen
        self._embeddings.clear()
        array = volume.array
        if rgb is not None:
            self._window, self.intensity = None, "colour picture as it is"
        elif chosen.name in CT_MODALITIES and array.dtype != np.uint8:
            self._window, self.intensity = CT_WINDOW, f"CT window {CT_WINDOW[0]:g}..{CT_WINDOW[1]:g} HU"
        elif array.dtype == np.uint8:
            self._window, self.intensity = None, "8-bit grey as it is"
        else:
            sample = array.ravel()[:: max(1, array.size // 2_000_000)].astype(np.float64)
            low, high = np.percentile(sample, PERCENTILE_WINDOW)
            if high <= low:
                low, high = float(sample.min()), float(sample.max())
            self._window = (float(low), float(high) if high > low else float(low) + 1.0)
            self.intensity = f"percentile window {self._window[0]:.4g}..{self._window[1]:.4g}"

    def slice_pixels(self, k: int) -> np.ndarray:
        """Slice ``k`` as the model's picture: uint8 (rows, cols, 3)."""
        self._require_volume()
        if self.rgb is not None:
            return self.rgb[k]
        plane = self.volume.array[k]
        grey = plane if self._window is None else window_to_uint8(plane, *self._window)
        return np.repeat(grey[..., None], 3, axis=-1)

    # ---- prompts -----------------------------------------------------------------------------------------------
    def context_of(self, text: Optional[str]) -> Tuple[ContextIndices, Optional[str]]:
        self._require_volume()
        if not text:
            return context_indices(None, self.modality), None
        term = resolve_term(text)
        return context_indices(term, self.modality), term.name

    def locate(self, prompts: Prompts, slice_index: Optional[int] = None) -> Tuple[int, np.ndarray]:
        """``box_on_slice`` on this predictor's volume."""
        return box_on_slice(self._require_volume(), prompts, slice_index)

    # ---- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def segment_slice(self, k: int, box: np.ndarray, context: ContextIndices) -> SliceOutput:
        """The three outputs of slice ``k`` for ``box`` ([i_min, j_min, i_max, j_max] pixels)."""
        pixels = self.slice_pixels(k)
        rows, cols = pixels.shape[:2]
        side, size = self.model.config.image_size, max(rows, cols)
        embedding = self._embedding(k, context, pixels, size)
        boxes = torch.as_tensor(np.asarray(box, dtype=np.float32))[None].to(self.device)
        if size != side:
            boxes = boxes * (side / size)
        out = self.model.decode(embedding, boxes)[0]
        logits = F.interpolate(out.logits, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        logits = logits[0, :, :rows, :cols]
        masks = (torch.sigmoid(logits) > 0.5).cpu().numpy()
        iou = out.iou_pred[0].float().cpu().numpy()
        chosen = int(np.argmax(iou)) if self.choice == "iou" else int(self.choice)
        return SliceOutput(k, np.asarray(box, dtype=np.float32), logits.float().cpu().numpy(), iou, masks, chosen)

    def segment(self, prompts: Prompts, slice_index: Optional[int] = None, propagate: bool = False,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> SliceResult:
        """Segment the box's slice (or ``slice_index``), and with ``propagate`` the neighbouring slices."""
        started = time.perf_counter()
        volume = self._require_volume()
        k, box = self.locate(prompts, slice_index)
        context, name = self.context_of(prompts.text)
        notes = [] if prompts.text else ["no text: the experts route with the 'unknown' anatomy rows"]
        if not self.modality.known:
            notes.append("modality unknown: the experts route with the 'unknown' modality row (give the modality)")
        total = volume.array.shape[0] if propagate else 1
        report(progress, 0.0, f"slice {k}")
        check(cancel)
        first = self.segment_slice(k, box, context)
        outputs = [first]
        mask = np.zeros(volume.array.shape, dtype=np.uint8)
        mask[k] = first.mask
        if not first.mask.any():
            notes.append(f"nothing found in the box on slice {k}" + ("; nothing to propagate" if propagate else ""))
        elif propagate:
            for step in (1, -1):
                previous = first
                index = k + step
                while 0 <= index < volume.array.shape[0]:
                    check(cancel)
                    report(progress, len(outputs) / total, f"slice {index}")
                    current = self.segment_slice(index, box_of_mask(previous.mask, self.propagation_margin), context)
                    outputs.append(current)
                    if not current.mask.any():
                        break
                    mask[index] = current.mask
                    previous, index = current, index + step
                end = "the volume's end" if not 0 <= index < volume.array.shape[0] else \
                    f"slice {index}, where the mask vanished"
                notes.append(f"propagated {'up' if step > 0 else 'down'} from slice {k} to {end}")
        report(progress, 1.0, "done")
        runtime = f"{self.device.type} fp32, {time.perf_counter() - started:.1f} s"
        return SliceResult(mask, name, context, outputs, runtime, notes)

    # ---- internals ---------------------------------------------------------------------------------------------
    def _require_volume(self) -> Volume:
        if self.volume is None:
            raise InputError("no image yet: call set_volume(volume) before segmenting")
        return self.volume

    def _embedding(self, k: int, context: ContextIndices, pixels: np.ndarray, size: int) -> torch.Tensor:
        key = (k, context.rows())
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        side = self.model.config.image_size
        square = np.zeros((size, size, 3), dtype=np.uint8)
        square[: pixels.shape[0], : pixels.shape[1]] = pixels
        image = torch.from_numpy(square).permute(2, 0, 1)[None].float().to(self.device)
        if size != side:
            image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        embedding = self.model.encode(image, [context])
        self._embeddings[key] = embedding
        while len(self._embeddings) > self._cached_slices:
            self._embeddings.popitem(last=False)
        return embedding


__all__ = ["SlicePredictor", "SliceResult", "SliceOutput", "box_of_mask", "box_on_slice", "check_slice_precision",
           "INTENSITY_RULE"]
