"""Random training samples for the starter model: which case, structure, view and prompt, plus augmentation.

The view and prompt simulation itself is the fine-tuning one (``prompt_simulation.simulate``: zoom-out = the
whole crop resized with inference's index maps; zoom-in = a native-resolution window in the structure; box
jitter, positive/negative points, text name). This file decides what to draw and adds what a many-structure,
many-case training needs on top:

* case weights (the abdominal CT, the README's default input, is drawn most) and structure weights (the
  organs the issue measures are drawn more often than, say, one rib);
* a varying number of clicks (1-3 positive, 0-1 negative), since a user's first click is a single point;
* zoom-out field-of-view augmentation: a random sub-box of the crop is what gets resized, as when a user's scan
  covers more or less of the body;
* intensity augmentation (gamma, contrast, brightness, noise) on the model input, staying in [0, 1];
* optionally (``AugmentSettings.domain_randomised()``, ``--domain-randomisation``) the ``domain_randomisation``
  transforms: per-structure intensity shifts, random intensity curves, bias fields and thin slabs, so that one
  CT patient teaches anatomy rather than CT greys.
No flips: left and right structures are different prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.hierarchy import context_indices
from .domain_randomisation import (absent_slab, bias_field, label_intensity_shift, random_intensity_curve,
                                   random_sub_box, slab_region)
from .prompt_simulation import PromptedSample, PromptSettings, bounding_box, simulate, zoom_out_view
from .starter_data import TrainingCase

# Prompt kinds (prompt_simulation.PROMPT_KINDS) and how often each is drawn: text alone is the README's main
# job, so it is drawn most.
KIND_WEIGHTS: Dict[str, float] = {"text": 0.35, "box": 0.2, "points": 0.15, "text+box": 0.12, "text+points": 0.18}
# Structures the issue measures (and that users ask for first) are drawn this many times more often.
KEY_STRUCTURES = ("liver", "spleen", "left kidney", "right kidney", "aorta", "heart", "stomach", "pancreas",
                  "gallbladder", "urinary bladder", "brain whole tumor")
KEY_STRUCTURE_WEIGHT = 12.0
# The thinnest slab (slices of the crop) an absent-structure sample shows.
MIN_ABSENT_SLICES = 6


@dataclass(frozen=True)
class AugmentSettings:
    zoom_in_probability: float = 0.5
    subcrop_probability: float = 0.5
    subcrop_min_fraction: float = 0.6
    intensity_probability: float = 0.8
    gamma_range: Tuple[float, float] = (0.7, 1.5)
    contrast_range: Tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    noise_std: float = 0.02
    box_jitter: int = 4
    # Domain randomisation (training/domain_randomisation.py); all off in the default recipe.
    label_shift_probability: float = 0.0    # per-structure intensity offsets, on the native crop
    curve_probability: float = 0.0          # a random (non-monotonic) intensity curve, on the model input
    bias_probability: float = 0.0           # a smooth multiplicative field, on the model input
    slab_probability: float = 0.0           # zoom-out views: a thin slab of slices instead of a sub-box
    # Text prompts for a structure outside the view (a slab of slices above or below it), with an empty target,
    # so that the model answers "not here" instead of a confident blob elsewhere.
    absent_probability: float = 0.0

    @classmethod
    def domain_randomised(cls) -> "AugmentSettings":
        """The recipe of ``--domain-randomisation``: about 60 % of the samples lose CT's brightness order."""
        return replace(cls(), label_shift_probability=0.35, curve_probability=0.4, bias_probability=0.3,
                       slab_probability=0.3)


class StarterSampler:
    """Draws prompted samples (``prompt_simulation.PromptedSample``) from the cases with one seeded generator."""

    def __init__(self, cases: Sequence[TrainingCase], model_shape: Sequence[int], seed: int,
                 settings: AugmentSettings = AugmentSettings()):
        if not cases:
            raise ValueError("the starter sampler needs at least one case")
        self.cases = list(cases)
        self.model_shape = tuple(int(n) for n in model_shape)
        self.settings = settings
        self.rng = np.random.default_rng(seed)
        weights = np.asarray([case.spec.weight for case in self.cases], dtype=np.float64)
        self.case_p = weights / weights.sum()
        self.structure_p = []
        for case in self.cases:
            w = np.asarray([KEY_STRUCTURE_WEIGHT if s.name in KEY_STRUCTURES else 1.0 for s in case.structures])
            self.structure_p.append(w / w.sum())
        self.kinds = list(KIND_WEIGHTS)
        self.kind_p = np.asarray([KIND_WEIGHTS[k] for k in self.kinds]) / sum(KIND_WEIGHTS.values())

    def draw(self) -> PromptedSample:
        """One sample; retries when the structure vanishes from the drawn view (e.g. thinner than a voxel)."""
        while True:
            sample = self._try_draw()
            if sample is not None:
                return sample

    def batch(self, size: int) -> list:
        return [self.draw() for _ in range(size)]

    def _try_draw(self) -> Optional[PromptedSample]:
        rng, settings = self.rng, self.settings
        index = int(rng.choice(len(self.cases), p=self.case_p))
        case = self.cases[index]
        structure = case.structures[int(rng.choice(len(case.structures), p=self.structure_p[index]))]
        if settings.absent_probability and rng.random() < settings.absent_probability:
            return self._absent_sample(case, structure)
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        view = "zoom-in" if rng.random() < settings.zoom_in_probability else "zoom-out"
        image, mask = case.labelled.image, case.labelled.mask(structure)
        if view == "zoom-out" and settings.slab_probability and rng.random() < settings.slab_probability:
            lo, hi = bounding_box(mask)
            region = slab_region(mask.shape, (lo + hi) // 2, rng)
            image, mask = image[region], mask[region]
        elif view == "zoom-out" and rng.random() < settings.subcrop_probability:
            region = self._subcrop(mask)
            image, mask = image[region], mask[region]
        else:
            region = None
        if settings.label_shift_probability and rng.random() < settings.label_shift_probability:
            labels = case.labelled.labels if region is None else case.labelled.labels[region]
            image = label_intensity_shift(image, labels, rng)
        clicks = PromptSettings(box_jitter=settings.box_jitter, positive_points=int(rng.integers(1, 4)),
                                negative_points=int(rng.integers(0, 2)))
        sample = simulate(image, mask, structure.name, kind, view, self.model_shape, rng, clicks)
        return None if sample is None else self._finish(sample, case, structure)

    def _absent_sample(self, case: TrainingCase, structure) -> Optional[PromptedSample]:
        """The structure's name as a text prompt on a zoom-out view of slices that do not hold it (a slab above
        or below it, as in a scan that stops short of it), with an empty target. None when neither side of the
        structure has enough slices."""
        region = absent_slab(case.labelled.mask(structure), max(MIN_ABSENT_SLICES, self.model_shape[0] // 4),
                             self.rng)
        if region is None:
            return None
        image = case.labelled.image[region]
        view_image, _ = zoom_out_view(image, np.zeros(image.shape, dtype=np.float32), self.model_shape)
        empty = np.zeros(self.model_shape, dtype=np.float32)
        return self._finish(PromptedSample(view_image, empty, structure.name, "text", "zoom-out"), case, structure)

    def _finish(self, sample: PromptedSample, case: TrainingCase, structure) -> PromptedSample:
        """Intensity augmentation on the model input, and the experts' routing rows."""
        rng, settings = self.rng, self.settings
        if settings.curve_probability and rng.random() < settings.curve_probability:
            sample.image = random_intensity_curve(sample.image, rng)
        if settings.bias_probability and rng.random() < settings.bias_probability:
            sample.image = bias_field(sample.image, rng)
        if rng.random() < settings.intensity_probability:
            sample.image = self._augment_intensity(sample.image)
        # The experts' routing as the predictor does it: the named anatomy with a text prompt, the modality alone
        # for boxes and clicks (no text names the anatomy there).
        term = structure.term if sample.uses_text else None
        sample.context_rows = context_indices(term, case.labelled.modality).rows()
        return sample

    def _subcrop(self, mask: np.ndarray) -> Tuple[slice, slice, slice]:
        """A random sub-box of the crop (each side >= subcrop_min_fraction) holding the structure's centre."""
        lo, hi = bounding_box(mask)
        fraction = (self.settings.subcrop_min_fraction, 1.0)
        return random_sub_box(mask.shape, (lo + hi) // 2, self.rng, (fraction,) * mask.ndim, (1,) * mask.ndim)

    def _augment_intensity(self, image: np.ndarray) -> np.ndarray:
        rng, s = self.rng, self.settings
        out = np.power(image, rng.uniform(*s.gamma_range), dtype=np.float32)
        mean = out.mean()
        out = (out - mean) * rng.uniform(*s.contrast_range) + mean + rng.uniform(-s.brightness, s.brightness)
        out += rng.normal(0.0, rng.uniform(0.0, s.noise_std), size=out.shape).astype(np.float32)
        return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


class SampleStream(torch.utils.data.IterableDataset):
    """Endless batches for a ``DataLoader`` with worker processes: worker ``w`` draws with its own
    ``StarterSampler`` seeded (seed, w), so a run is reproducible for a given number of workers (the loader
    takes batches from the workers in turn)."""

    def __init__(self, cases: Sequence[TrainingCase], model_shape: Sequence[int], seed: int, batch_size: int,
                 settings: AugmentSettings = AugmentSettings()):
        super().__init__()
        self.cases, self.model_shape, self.seed, self.batch_size = list(cases), model_shape, seed, batch_size
        self.settings = settings

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        sampler = StarterSampler(self.cases, self.model_shape, np.random.SeedSequence([self.seed, worker]),
                                 self.settings)
        while True:
            yield collate(sampler.batch(self.batch_size))


def collate(samples: Sequence[PromptedSample]) -> Tuple[list, torch.Tensor, torch.Tensor]:
    """(samples without their arrays, images (B, 1, D, H, W), masks (B, 1, D, H, W)) as tensors, which a
    DataLoader hands from its workers through shared memory (pickling the arrays made the pipe the bottleneck)."""
    images = torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None]
    for sample in samples:
        sample.image = sample.mask = None
    return list(samples), images, masks
