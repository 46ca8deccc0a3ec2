"""What the training loop sees: prompted samples drawn from labelled cases, as a pure function of (seed, step, index).

One sampler serves both recipes of the loop (training the base model, fine-tuning adapter experts). The view and
prompt simulation itself is ``prompt_simulation.simulate`` (zoom-out = the whole crop resized with inference's
index maps; zoom-in = a native-resolution window in the structure; box jitter, positive/negative points, text).
This file decides what to draw and adds what a many-structure, many-case training needs on top:

* case weights (``case_weights``; the starter draws the abdominal CT most) and structure weights (the organs users
  ask for first drawn ``key_structure_weight`` times as often as, say, one rib);
* prompt kinds drawn per sample with ``kind_weights`` (text alone, the README's main job, most), a varying number
  of clicks, since a user's first click is a single point;
* zoom-out field-of-view augmentation: a random sub-box of the crop is what gets resized, as when a user's scan
  covers more or less of the body;
* intensity augmentation (gamma, contrast, brightness, noise) on the model input, staying in [0, 1];
* optionally the ``domain_randomisation`` transforms (per-structure intensity shifts, random intensity curves, bias
  fields, thin slabs, affine maps) and absent-structure samples.
No flips: left and right structures are different prompts.

Every sample has its own generator seeded with (seed, step, index): a batch does not depend on the batches before
it, so a run resumed at step s draws what the uninterrupted run drew, N processes (DDP) each draw their slice of
the same global batch, and DataLoader workers give the same samples however many there are.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data.hierarchy import context_indices
from ..errors import InputError
from .dataset import LabelledCase, Structure
from .domain_randomisation import (absent_slab, bias_field, intensity_jitter, label_intensity_shift, random_affine,
                                   random_intensity_curve, random_sub_box, slab_region)
from .prompt_simulation import PromptedSample, PromptSettings, bounding_box, simulate, zoom_out_view

Item = Tuple[int, int]      # (case index, structure index)

# Structures the issue measures (and that users ask for first).
KEY_STRUCTURES = ("liver", "spleen", "left kidney", "right kidney", "aorta", "heart", "stomach", "pancreas",
                  "gallbladder", "urinary bladder", "brain whole tumor")
# The thinnest slab (slices of the crop) an absent-structure sample shows.
MIN_ABSENT_SLICES = 6
# Redraws when a view misses the structure (e.g. thinner than one zoom-out voxel) before giving up.
MAX_DRAWS = 50
VALIDATION_KINDS = ("text", "box", "points")


@dataclass(frozen=True)
class SamplingSettings:
    # How often each prompt kind (prompt_simulation.PROMPT_KINDS) is drawn.
    kind_weights: Dict[str, float] = field(default_factory=lambda: {
        "text": 0.35, "box": 0.2, "points": 0.15, "text+box": 0.12, "text+points": 0.18})
    key_structure_weight: float = 12.0
    positive_points: Tuple[int, int] = (1, 3)       # inclusive range of positive clicks
    negative_points: Tuple[int, int] = (0, 1)       # inclusive range of negative clicks
    box_jitter: int = 4
    zoom_in_probability: float = 0.5
    subcrop_probability: float = 0.5
    subcrop_min_fraction: float = 0.6
    intensity_probability: float = 0.8
    gamma_range: Tuple[float, float] = (0.7, 1.5)
    contrast_range: Tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    noise_std: float = 0.02
    # Domain randomisation (training/domain_randomisation.py); all off unless a recipe switches them on.
    label_shift_probability: float = 0.0    # per-structure intensity offsets, on the native crop
    curve_probability: float = 0.0          # a random (non-monotonic) intensity curve, on the model input
    bias_probability: float = 0.0           # a smooth multiplicative field, on the model input
    slab_probability: float = 0.0           # zoom-out views: a thin slab of slices instead of a sub-box
    affine_probability: float = 0.0         # a small rotation / scaling / shift of the view and its mask
    # Text prompts for a structure outside the view (a slab of slices above or below it), with an empty target,
    # so that the model answers "not here" instead of a confident blob elsewhere.
    absent_probability: float = 0.0

    def with_domain_randomisation(self) -> "SamplingSettings":
        """``--domain-randomisation``: about 60 % of the samples lose CT's brightness order."""
        return replace(self, label_shift_probability=0.35, curve_probability=0.4, bias_probability=0.3,
                       slab_probability=0.3)


class Sampler:
    """Prompted samples from ``cases``; ``items`` restricts them to some (case, structure) pairs (the rest being,
    say, validation), ``case_weights`` sets how often each case is drawn (default: equally)."""

    def __init__(self, cases: Sequence[LabelledCase], model_shape: Sequence[int], seed: int,
                 settings: SamplingSettings = SamplingSettings(), items: Optional[Sequence[Item]] = None,
                 case_weights: Optional[Sequence[float]] = None):
        self.cases = list(cases)
        self.model_shape = tuple(int(n) for n in model_shape)
        self.seed = int(seed)
        self.settings = settings
        if items is None:
            items = [(c, s) for c, case in enumerate(self.cases) for s in range(len(case.structures))]
        per_case: Dict[int, List[int]] = {}
        for c, s in items:
            per_case.setdefault(c, []).append(s)
        if not per_case:
            raise InputError("nothing to train on: no labelled structure in the training cases")
        self.case_order = sorted(per_case)
        weights = np.asarray([1.0 if case_weights is None else case_weights[c] for c in self.case_order])
        self.case_p = weights / weights.sum()
        self.structures = [per_case[c] for c in self.case_order]
        self.structure_p = []
        for c, allowed in zip(self.case_order, self.structures):
            w = np.asarray([settings.key_structure_weight if self.cases[c].structures[s].name in KEY_STRUCTURES
                            else 1.0 for s in allowed])
            self.structure_p.append(w / w.sum())
        self.kinds = [k for k, w in settings.kind_weights.items() if w > 0]
        self.kind_p = np.asarray([settings.kind_weights[k] for k in self.kinds], dtype=np.float64)
        self.kind_p /= self.kind_p.sum()

    def batch(self, step: int, indices: Sequence[int]) -> List[PromptedSample]:
        """Samples ``indices`` of the global batch of ``step``."""
        return [self.sample(step, index) for index in indices]

    def sample(self, step: int, index: int) -> PromptedSample:
        """Sample ``index`` of ``step``: its own generator, redrawn when the structure vanishes from the view."""
        rng = np.random.default_rng([self.seed, step, index])
        for _ in range(MAX_DRAWS):
            sample = self._try_draw(rng)
            if sample is not None:
                return sample
        raise InputError(f"could not draw a training sample in {MAX_DRAWS} tries: the structures are too small "
                         f"for the model input {self.model_shape}")

    def _try_draw(self, rng: np.random.Generator) -> Optional[PromptedSample]:
        settings = self.settings
        slot = int(rng.choice(len(self.case_order), p=self.case_p))
        case = self.cases[self.case_order[slot]]
        structure = case.structures[self.structures[slot][int(rng.choice(len(self.structures[slot]),
                                                                          p=self.structure_p[slot]))]]
        if settings.absent_probability and rng.random() < settings.absent_probability:
            return self._absent_sample(case, structure, rng)
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.kind_p))]
        view = "zoom-in" if rng.random() < settings.zoom_in_probability else "zoom-out"
        image, mask, region = case.image, case.mask(structure), None
        if view == "zoom-out" and settings.slab_probability and rng.random() < settings.slab_probability:
            lo, hi = bounding_box(mask)
            region = slab_region(mask.shape, (lo + hi) // 2, rng)
        elif view == "zoom-out" and rng.random() < settings.subcrop_probability:
            lo, hi = bounding_box(mask)
            fraction = (settings.subcrop_min_fraction, 1.0)
            region = random_sub_box(mask.shape, (lo + hi) // 2, rng, (fraction,) * mask.ndim, (1,) * mask.ndim)
        if region is not None:
            image, mask = image[region], mask[region]
        if settings.label_shift_probability and rng.random() < settings.label_shift_probability:
            image = label_intensity_shift(image, case.labels if region is None else case.labels[region], rng)
        clicks = PromptSettings(box_jitter=settings.box_jitter,
                                positive_points=int(rng.integers(settings.positive_points[0],
                                                                 settings.positive_points[1] + 1)),
                                negative_points=int(rng.integers(settings.negative_points[0],
                                                                 settings.negative_points[1] + 1)))
        view_transform = None
        if settings.affine_probability and rng.random() < settings.affine_probability:
            view_transform = lambda view_image, view_mask: random_affine(view_image, view_mask, rng)  # noqa: E731
        sample = simulate(image, mask, structure.name, kind, view, self.model_shape, rng, clicks,
                          view_transform=view_transform)
        return None if sample is None else self._finish(sample, case, structure, rng)

    def _absent_sample(self, case: LabelledCase, structure: Structure,
                       rng: np.random.Generator) -> Optional[PromptedSample]:
        """The structure's name as a text prompt on a zoom-out view of slices that do not hold it (a slab above
        or below it, as in a scan that stops short of it), with an empty target. None when neither side of the
        structure has enough slices."""
        region = absent_slab(case.mask(structure), max(MIN_ABSENT_SLICES, self.model_shape[0] // 4), rng)
        if region is None:
            return None
        image = case.image[region]
        view_image, _ = zoom_out_view(image, np.zeros(image.shape, dtype=np.float32), self.model_shape)
        empty = np.zeros(self.model_shape, dtype=np.float32)
        sample = PromptedSample(view_image, empty, structure.name, "text", "zoom-out")
        return self._finish(sample, case, structure, rng)

    def _finish(self, sample: PromptedSample, case: LabelledCase, structure: Structure,
                rng: np.random.Generator) -> PromptedSample:
        """Intensity augmentation on the model input, and the experts' routing rows."""
        settings = self.settings
        if settings.curve_probability and rng.random() < settings.curve_probability:
            sample.image = random_intensity_curve(sample.image, rng)
        if settings.bias_probability and rng.random() < settings.bias_probability:
            sample.image = bias_field(sample.image, rng)
        if rng.random() < settings.intensity_probability:
            sample.image = intensity_jitter(sample.image, rng, settings.gamma_range, settings.contrast_range,
                                            settings.brightness, settings.noise_std)
        sample.context_rows = routing_rows(sample, case, structure)
        return sample

    def validation_samples(self, items: Sequence[Item], kinds: Sequence[str] = VALIDATION_KINDS
                           ) -> List[PromptedSample]:
        """Fixed samples to validate on: each (case, structure) of ``items`` with each prompt kind on the zoom-out
        view, no augmentation, fixed clicks (the same every time they are drawn)."""
        samples = []
        clicks = PromptSettings(box_jitter=self.settings.box_jitter)
        for k, kind in enumerate(kinds):
            rng = np.random.default_rng([self.seed, 7919, k])
            for c, s in items:
                case = self.cases[c]
                structure = case.structures[s]
                sample = simulate(case.image, case.mask(structure), structure.name, kind, "zoom-out",
                                  self.model_shape, rng, clicks)
                if sample is not None:
                    sample.context_rows = routing_rows(sample, case, structure)
                    samples.append(sample)
        return samples


def routing_rows(sample: PromptedSample, case: LabelledCase, structure: Structure) -> Tuple[int, ...]:
    """The experts' routing as the predictor does it: the named anatomy with a text prompt, the modality alone
    for boxes and clicks (no text names the anatomy there)."""
    return context_indices(structure.term if sample.uses_text else None, case.modality).rows()


def split_items(cases: Sequence[LabelledCase], val_fraction: float, seed: int) -> Tuple[List[Item], List[Item]]:
    """Hold out a seeded fraction of the (volume, structure) pairs for validation (at least one is kept)."""
    items = [(c, s) for c, case in enumerate(cases) for s in range(len(case.structures))]
    if val_fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    held = min(max(1, int(round(val_fraction * len(items)))), len(items) - 1)
    return [items[i] for i in sorted(order[held:])], [items[i] for i in sorted(order[:held])]


def training_items(cases: Sequence, validation_cases: Sequence, val_fraction: float,
                   seed: int) -> Tuple[List, List[Item], List[Item]]:
    """(all cases, training items, validation items): the validation cases' structures when there are any (their
    indices after ``cases``'), else a seeded fraction of ``cases``' (``split_items``)."""
    all_cases = list(cases) + list(validation_cases)
    if not validation_cases:
        return (all_cases, *split_items(cases, val_fraction, seed))
    train_items = [(c, s) for c, case in enumerate(cases) for s in range(len(case.structures))]
    val_items = [(len(cases) + c, s) for c, case in enumerate(validation_cases) for s in range(len(case.structures))]
    return all_cases, train_items, val_items
