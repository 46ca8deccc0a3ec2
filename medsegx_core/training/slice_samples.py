"""Slice-wise training samples for LiteMedSAM: labelled volumes read as ``VolumeSlicePredictor`` reads them, and a
sampler of (slice, box) samples drawn as the predictor prompts the model.

* ``load_slice_case``: the volume reoriented to radiological axial slices (``AxisReorientation.to_radiological``)
  and mapped onto 0..255 by LiteMedSAM's intensity window (CT level 40 / width 400, MR percentiles), the labels on
  the same grid, the structures resolved through the hierarchy (``NAME@PARENT`` for a new leaf) as
  ``training.dataset`` resolves them.
* ``SliceSampler``: one sample per (seed, step, index), like ``sampling.Sampler``, so the one training loop
  (``training/loop.py``) resumes, splits over DDP processes and runs DataLoader workers the same way. A sample is a
  slice of the model's S x S input (``litemedsam_input``: longest side to S, min-max, zero padding) shaped as a
  volume one slice deep, (1, S, S), its mask resized alike, and a box (in the loop's ``[d0, h0, w0, d1, h1, w1]``,
  model pixels) from the label, as the predictor gives boxes (``BOX_SOURCES``):

    start        the in-plane extent of the structure's 3D box, on a slice of its middle half (a 3D box prompt is
                 decoded first on its middle slice);
    propagated   the box of the mask on a neighbouring slice, widened by the predictor's margin (3 or 6 model
                 pixels: a propagated box on one slice, or inside a 3D box), which is what every other slice of a
                 propagation gets;
    slice        the slice's own tight box (a box drawn on one slice);

  each side then pushed out by 0..``box_jitter`` model pixels. The experts are routed as the predictor routes them
  (``sampling.routing_rows``): by the structure's name and the modality for a box given with a text (kind
  "text+box"; LiteMedSAM has no text branch, so the name only routes), by the modality alone for a bare box; each
  kind is half of the samples. Intensity augmentation as ``sampling.Sampler`` (``SamplingSettings``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.hierarchy import Modality
from ..data.orientation import AxisReorientation
from ..errors import InputError
from ..inference.slice_preprocessing import (IntensityWindow, box_to_model, litemedsam_input, litemedsam_window,
                                            longest_side_to, pad_to_square, resized_shape)
from ..volume_slice_predictor import DEFAULT_MARGIN, DEFAULT_OPEN_MARGIN
from .dataset import Structure, read_labelled_volume
from .domain_randomisation import intensity_jitter
from .prompt_simulation import PromptedSample
from .sampling import Item, SamplingSettings, routing_rows

PathLike = Union[str, Path]

BOX_SOURCES = {"start": 0.25, "propagated": 0.5, "slice": 0.25}
PROPAGATION_MARGINS = (DEFAULT_OPEN_MARGIN, DEFAULT_MARGIN)
ROUTING_KINDS = ("box", "text+box")       # bare box: modality routing; a box with a text: the structure's context
VALIDATION_SLICES = 5                     # slices per held-out structure, evenly over its range
SLICE_VIEW = "slice"


@dataclass
class SliceCase:
    """A labelled volume on LiteMedSAM's working grid: radiological axial slices, intensities on 0..255."""
    working: np.ndarray          # (k, rows, cols) float32 on 0..255 (the volume's intensity window)
    labels: np.ndarray           # (k, rows, cols) integer labels on the same grid
    structures: List[Structure]
    modality: Modality
    window: IntensityWindow
    source: str
    voxels: Dict[int, int] = field(default_factory=dict)

    def mask(self, structure: Structure) -> np.ndarray:
        return self.labels == structure.label


def load_slice_case(image_path: PathLike, label_path: PathLike, names_spec: Optional[str] = None,
                    only: Optional[Sequence[str]] = None, modality: Optional[str] = None) -> SliceCase:
    """Read one labelled volume as the LiteMedSAM predictor reads it. ``only``: just these structures (names)."""
    image, labelmap, structures, chosen = read_labelled_volume(image_path, label_path, names_spec, only, modality)
    orientation = AxisReorientation.to_radiological(image.direction_ras, image.shape_ijk)
    window = litemedsam_window(image.array, chosen.name)
    working = np.ascontiguousarray(window.apply(orientation.array_to_working(image.array)), dtype=np.float32)
    labels = np.ascontiguousarray(orientation.array_to_working(labelmap))
    counts = {s.label: int((labels == s.label).sum()) for s in structures}
    return SliceCase(working, labels, structures, chosen, window, str(image_path), counts)


def model_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A slice's mask (rows, cols) on the model grid (S, S) as ``litemedsam_input`` places the slice: the longest
    side scaled to S (area when shrinking, bilinear when enlarging: a soft mask), zero-padded bottom and right."""
    return pad_to_square(longest_side_to(mask, side), side)[0].numpy()


def plane_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """[x_min, y_min, x_max, y_max] (inclusive pixels) of a 2D mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


@dataclass
class StructureSlices:
    """Where one structure of one case lies: its slices, each slice's box and the 3D box's in-plane extent."""
    slices: np.ndarray                   # working k of the slices holding it, ascending
    boxes: Dict[int, np.ndarray]         # k -> [x0, y0, x1, y1] slice pixels
    extent: np.ndarray                   # [x0, y0, x1, y1] over all its slices

    @classmethod
    def of(cls, mask: np.ndarray) -> "StructureSlices":
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        boxes = {int(k): plane_box(mask[k]) for k in slices}
        stacked = np.stack(list(boxes.values()))
        extent = np.concatenate([stacked[:, :2].min(0), stacked[:, 2:].max(0)]).astype(np.float32)
        return cls(slices, boxes, extent)

    def middle_half(self) -> np.ndarray:
        first, last = int(self.slices[0]), int(self.slices[-1])
        quarter = (last - first) / 4
        inside = self.slices[(self.slices >= first + quarter) & (self.slices <= last - quarter)]
        return inside if inside.size else self.slices


class NoTextBranch:
    """The loop's sentence table for a model without a text branch (LiteMedSAM): a text only routes the experts,
    so no text embedding reaches the decoder."""

    def embed(self, model, names: Sequence[str]) -> None:
        return None


class SliceSampler:
    """Prompted slices from ``cases`` (``items``: the (case, structure) pairs to draw from), one per (seed, step,
    index); the same interface as ``sampling.Sampler`` for the training loop."""

    def __init__(self, cases: Sequence[SliceCase], side: int, seed: int,
                 settings: SamplingSettings = SamplingSettings(), items: Optional[Sequence[Item]] = None):
        self.cases = list(cases)
        self.side = int(side)
        self.seed = int(seed)
        self.settings = settings
        if items is None:
            items = [(c, s) for c, case in enumerate(self.cases) for s in range(len(case.structures))]
        self.items = list(items)
        if not self.items:
            raise InputError("nothing to train on: no labelled structure in the training cases")
        self.where = {(c, s): StructureSlices.of(self.cases[c].mask(self.cases[c].structures[s]))
                      for c, s in self.items}
        self.sources = list(BOX_SOURCES)
        self.source_p = np.asarray([BOX_SOURCES[k] for k in self.sources]) / sum(BOX_SOURCES.values())

    def batch(self, step: int, indices: Sequence[int]) -> List[PromptedSample]:
        return [self.sample(step, index) for index in indices]

    def sample(self, step: int, index: int) -> PromptedSample:
        """Sample ``index`` of ``step``: every (case, structure) pair equally often, then a slice and a box."""
        rng = np.random.default_rng([self.seed, step, index])
        item = self.items[int(rng.integers(len(self.items)))]
        where = self.where[item]
        source = self.sources[int(rng.choice(len(self.sources), p=self.source_p))]
        if source == "start":
            k = int(rng.choice(where.middle_half()))
            box = where.extent
        else:
            k = int(rng.choice(where.slices))
            box = where.boxes[k]
            if source == "propagated":
                neighbours = [n for n in (k - 1, k + 1) if n in where.boxes]
                if neighbours:
                    margin = float(rng.choice(PROPAGATION_MARGINS)) * self._pixels_per_model_pixel(item)
                    box = where.boxes[int(rng.choice(neighbours))] + np.array([-margin, -margin, margin, margin])
        kind = ROUTING_KINDS[int(rng.integers(len(ROUTING_KINDS)))]
        sample = self.prompted(item, k, box, kind, rng, jitter=self.settings.box_jitter)
        if rng.random() < self.settings.intensity_probability:
            s = self.settings
            sample.image = intensity_jitter(sample.image, rng, s.gamma_range, s.contrast_range, s.brightness,
                                            s.noise_std).astype(np.float32)
        return sample

    def prompted(self, item: Item, k: int, box: np.ndarray, kind: str, rng: Optional[np.random.Generator] = None,
                 jitter: int = 0) -> PromptedSample:
        """Slice ``k`` of the item's case with ``box`` (slice pixels) on the model grid, each side pushed out by
        0..``jitter`` model pixels."""
        case = self.cases[item[0]]
        structure = case.structures[item[1]]
        plane = case.working[k]
        image = litemedsam_input(plane, self.side)[:1].numpy()
        mask = model_mask(case.labels[k] == structure.label, self.side)
        model_box = box_to_model(box, plane.shape, self.side)
        if jitter and rng is not None:
            model_box = model_box + rng.integers(0, jitter + 1, size=4) * np.array([-1, -1, 1, 1])
        new_h, new_w = resized_shape(plane.shape, self.side)
        model_box = np.clip(model_box, 0, [new_w - 1, new_h - 1, new_w - 1, new_h - 1]).astype(np.float32)
        sample = PromptedSample(image, mask, structure.name, kind, SLICE_VIEW,
                                box=np.array([0, model_box[1], model_box[0], 0, model_box[3], model_box[2]],
                                             dtype=np.float32))
        sample.context_rows = routing_rows(sample, case, structure)
        return sample

    def validation_samples(self, items: Sequence[Item]) -> List[PromptedSample]:
        """Fixed samples of held-out pairs: ``VALIDATION_SLICES`` slices over each structure's range, with the box
        the propagation gives them (the previous slice's mask box widened by the predictor's margin for a 3D box,
        the tight box at the range's ends), both routings, no augmentation."""
        samples = []
        for c, s in items:
            where = self.where.get((c, s)) or StructureSlices.of(self.cases[c].mask(self.cases[c].structures[s]))
            self.where[(c, s)] = where
            margin = DEFAULT_MARGIN * self._pixels_per_model_pixel((c, s))
            for k in sorted({int(where.slices[round(i)]) for i in np.linspace(0, len(where.slices) - 1,
                                                                                VALIDATION_SLICES)}):
                toward_middle = k - 1 if k > int(np.median(where.slices)) else k + 1
                box = (where.boxes[toward_middle] + np.array([-margin, -margin, margin, margin])
                       if toward_middle in where.boxes else where.boxes[k])
                samples += [self.prompted((c, s), k, box, kind) for kind in ROUTING_KINDS]
        return samples

    def _pixels_per_model_pixel(self, item: Item) -> float:
        return max(self.cases[item[0]].working.shape[1:]) / self.side

