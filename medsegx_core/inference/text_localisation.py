"""The zoom-out of a text prompt on the slice-wise path: a structure name -> its slices and a box on each.

The localiser (``modeling/slice_localiser.py``) reads each sampled slice's LiteMedSAM embedding and gives a
coarse probability map per structure of its vocabulary. For a name:

1. the hierarchy resolves it; the localiser's structures it covers are the name itself or, for a parent, its
   children ("kidney" -> left and right kidney); a name it does not cover is refused here (``channels_for``)
   and the caller falls back to another model;
2. maps of slices about ``SLICE_STEP_MM`` apart (every slice of a thick-slice volume) are stacked (read coarse to
   fine: every ``COARSE_STRIDE``-th first, then the ones around where the structure shows); cells above
   ``threshold`` are grouped into 3D connected blobs, and the blob holding the most probability is the structure
   (the one holding a positive click, when there are clicks);
3. the structure is **absent** when no cell passes the threshold, its blob is smaller than ``MIN_VOLUME_ML`` or its
   cells average under ``MIN_BLOB_MEAN`` (unless a positive click picked it);
4. its slices run from the first to the last sampled slice of the blob, widened by half a sampling step at each
   end; each gets the box of the blob's cells (on an unsampled slice, the union of the boxes of the sampled
   slices either side), converted from embedding cells to slice pixels and widened by ``BOX_MARGIN_CELLS``.

LiteMedSAM then segments the structure (``VolumeSlicePredictor.segment_text``): each slice from its own box, or
(measured alternatives) from the blob's widest sampled slice (``widest``) propagated within these slices and a
sampling step beyond.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.hierarchy import ResolvedTerm, resolve_term

# Slices about this far apart are read by the localiser (its training sampled the same).
SLICE_STEP_MM = 4.0
# The localiser first reads every COARSE_STRIDE-th of those slices (about 12 mm apart), then only the slices around
# the coarse ones where the structure shows (``positions_to_refine``): the blobs found are the same as from reading
# every sampled slice, except one thinner than the coarse step that falls between two coarse slices, and a structure
# that shows on no coarse slice is absent after a third of the reads.
COARSE_STRIDE = 3
# A cell belongs to the structure above this probability. (Growing the blob through cells above 0.25 as well,
# hysteresis, joined more slices but gave their boxes worse masks: held-out MR liver 0.697 -> 0.689, CT spleen
# 0.403 -> 0.366; model card.)
DEFAULT_THRESHOLD = 0.5
# A blob smaller than this (millilitres, from its cells and the sampling step) is noise: the structure is absent.
MIN_VOLUME_ML = 2.0
# A blob whose cells average under this probability is not the structure: the structure is absent. Where an organ
# is, its blob is confident throughout (held-out MR and CT, 56 present: mean 0.83-0.98); what the localiser finds
# where the organ is not (a "liver" in the pelvis, a "spleen" in a head) is a fainter blob (0.78-0.81), though as
# large as a real one (model card: 21 -> 25 of 27 absent structures found absent, no present one lost).
# A positive click on the blob overrides it.
MIN_BLOB_MEAN = 0.82
# Cells added around the blob's box on each slice (1 cell = 4 model pixels).
BOX_MARGIN_CELLS = 0.5
CELL = 4   # model pixels per embedding cell


@dataclass
class Localisation:
    """Where the localiser found a structure (``found``), or why not."""
    name: str
    found: bool
    peak: float                                            # highest probability of the structure's cells
    volume_ml: float                                       # of its blob
    boxes: Dict[int, np.ndarray] = field(default_factory=dict)   # working slice -> [x0, y0, x1, y1] slice pixels
    note: str = ""
    widest: Optional[int] = None      # the sampled slice where the blob covers the most cells
    step: int = 1                     # slices between the sampled ones
    sampled: List[int] = field(default_factory=list)   # the sampled (so encoded) slices the blob lies on

    @property
    def slices(self) -> List[int]:
        return sorted(self.boxes)


def channels_for(structures: Sequence[str], term: ResolvedTerm) -> List[int]:
    """The localiser's outputs that make up ``term``: the node itself, or every structure below it."""
    if term.name in structures:
        return [structures.index(term.name)]
    return [index for index, name in enumerate(structures)
            if resolve_term(name).node.ancestor(term.node.level) is term.node]


def sampled_slices(count: int, spacing_k: float, step_mm: float = SLICE_STEP_MM) -> Tuple[List[int], int]:
    """(the slices the localiser reads, the step between them)."""
    step = max(1, int(round(step_mm / max(spacing_k, 1e-6))))
    return list(range(step // 2, count, step)) or [0], step


def coarse_positions(count: int, stride: int = COARSE_STRIDE) -> List[int]:
    """Which of ``count`` sampled slices (their positions) the localiser reads first: every ``stride``-th and the
    last."""
    positions = list(range(0, count, max(1, stride)))
    if positions[-1] != count - 1:
        positions.append(count - 1)
    return positions


def positions_to_refine(coarse: Sequence[int], hits: Sequence[bool]) -> List[int]:
    """The sampled positions to read after the ``coarse`` ones: every position between a coarse one where the
    structure shows (``hits``) and its coarse neighbours. A blob is connected through consecutive sampled slices and
    cannot pass a coarse slice where nothing shows, so every blob that touches a coarse slice lies within these."""
    wanted = set()
    for index, (position, hit) in enumerate(zip(coarse, hits)):
        if hit:
            low = coarse[index - 1] if index else position
            high = coarse[index + 1] if index + 1 < len(coarse) else position
            wanted.update(range(low + 1, high))
    return sorted(wanted - set(coarse))


def connected_blobs(binary: np.ndarray) -> np.ndarray:
    """Labels (int32) of the 3D connected blobs of a (n, G, G) boolean stack (full connectivity)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(binary.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True)).astype(np.int32)


def locate(name: str, maps: np.ndarray, slices: Sequence[int], step: int, slice_shape: Tuple[int, int],
           cell_mm: float, spacing_k: float, side: int = 256, threshold: float = DEFAULT_THRESHOLD,
           clicks: Optional[np.ndarray] = None, total_slices: Optional[int] = None) -> Localisation:
    """The structure's blob in ``maps`` (n, G, G) probabilities on the sampled ``slices``; ``clicks``: positive
    clicks (N, 3) working (i, j, k) that pick the blob; ``cell_mm``: a cell's side in mm."""
    peak = float(maps.max()) if maps.size else 0.0
    seeds = maps > threshold
    if not seeds.any():
        return Localisation(name, False, peak, 0.0, note=f"{name!r} not found (highest probability {peak:.2f})")
    blobs = connected_blobs(seeds)
    mass = np.bincount(blobs.ravel(), weights=(maps * seeds).ravel(), minlength=int(blobs.max()) + 1)
    mass[0] = 0.0
    chosen, picked = int(np.argmax(mass)), 0
    scale = max(slice_shape) / side          # slice pixels per model pixel
    if clicks is not None and len(clicks):
        picked = _blob_at_clicks(blobs, clicks, slices, scale)
        chosen = picked if picked else chosen
    blob = blobs == chosen
    volume_ml = float(blob.sum()) * cell_mm * cell_mm * spacing_k * step / 1000.0
    blob_peak, blob_mean = float(maps[blob].max()), float(maps[blob].mean())
    if volume_ml < MIN_VOLUME_ML:
        return Localisation(name, False, blob_peak, volume_ml,
                            note=f"{name!r} not found (largest candidate {volume_ml:.1f} mL, under {MIN_VOLUME_ML} mL)")
    if blob_mean < MIN_BLOB_MEAN and not picked:
        return Localisation(name, False, blob_peak, volume_ml,
                            note=f"{name!r} not found (the likeliest candidate, {volume_ml:.0f} mL, is faint: mean "
                                 f"probability {blob_mean:.2f}, under {MIN_BLOB_MEAN}); click on it to segment it")
    sampled_boxes = {}
    widest = slices[int(np.argmax(blob.sum(axis=(1, 2))))]
    for row, k in enumerate(slices):
        cells = np.argwhere(blob[row])
        if len(cells):
            (r0, c0), (r1, c1) = cells.min(axis=0), cells.max(axis=0)
            box = np.array([c0 - BOX_MARGIN_CELLS, r0 - BOX_MARGIN_CELLS, c1 + 1 + BOX_MARGIN_CELLS,
                            r1 + 1 + BOX_MARGIN_CELLS], dtype=np.float32) * CELL * scale
            upper = np.array([slice_shape[1] - 1, slice_shape[0] - 1] * 2, dtype=np.float32)
            sampled_boxes[k] = np.clip(box, 0, upper)
    boxes = _boxes_between(sampled_boxes, step, total_slices if total_slices is not None else max(slices) + 1)
    return Localisation(name, True, blob_peak, volume_ml, boxes,
                        note=f"{name!r} found on slices {min(boxes)}..{max(boxes)} ({volume_ml:.0f} mL, "
                             f"peak {blob_peak:.2f})", widest=widest, step=step, sampled=sorted(sampled_boxes))


def _blob_at_clicks(blobs: np.ndarray, clicks: np.ndarray, slices: Sequence[int], scale: float) -> int:
    """The blob under (or nearest in slices to) the first positive click that lands on one; 0 if none."""
    for i, j, k in np.asarray(clicks, dtype=np.float64).reshape(-1, 3):
        row = int(np.argmin([abs(s - k) for s in slices]))
        c, r = int(i / scale / CELL), int(j / scale / CELL)
        if 0 <= r < blobs.shape[1] and 0 <= c < blobs.shape[2] and blobs[row, r, c]:
            return int(blobs[row, r, c])
    return 0


def _boxes_between(sampled: Dict[int, np.ndarray], step: int, total: int) -> Dict[int, np.ndarray]:
    """A box on every slice from half a step before the first sampled slice to half a step after the last: a
    sampled slice keeps its own, a slice between two gets their union, one past an end the end's box."""
    keys = sorted(sampled)
    low, high = max(0, keys[0] - step // 2), min(total - 1, keys[-1] + step // 2)
    boxes = {}
    for k in range(low, high + 1):
        if k in sampled:
            boxes[k] = sampled[k]
            continue
        before = max((s for s in keys if s < k), default=None)
        after = min((s for s in keys if s > k), default=None)
        near = [sampled[s] for s in (before, after) if s is not None and abs(s - k) < step]
        if not near:
            continue      # a gap in the blob wider than a step: the slices between stay empty
        boxes[k] = np.concatenate([np.min([b[:2] for b in near], axis=0), np.max([b[2:] for b in near], axis=0)])
    return boxes


__all__ = ["Localisation", "locate", "channels_for", "sampled_slices", "coarse_positions", "positions_to_refine",
           "SLICE_STEP_MM", "MIN_VOLUME_ML", "MIN_BLOB_MEAN", "COARSE_STRIDE"]
