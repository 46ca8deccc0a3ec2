"""Which modality an image is, for the experts' routing: the user's choice, else the file's, else its intensities.

One rule for every model that routes by modality (the SegVol ``Predictor``, MedSegX's ``SlicePredictor``,
LiteMedSAM's ``VolumeSlicePredictor``) and for the training cases (``training.dataset.load_case``), so that a
volume is routed at inference as its like was labelled in training:

* a user's explicit choice (``--modality``, the Slicer field) must name a modality of the hierarchy: anything
  else is a PromptError (a typo would otherwise route silently through the "unknown" row no expert learned);
* a modality the file records (DICOM Modality) is taken when the hierarchy knows it; a code it has no row for
  (PT, US, ...) is the "unknown" row, never an error: the user did not type it;
* neither: guessed from the intensities (``guess_modality``), except for pictures (colours, 8-bit grey), whose
  values say nothing about Hounsfield units.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .hierarchy import Modality, load_hierarchy, resolve_modality


def check_modality_choice(chosen: Optional[str]) -> Optional[Modality]:
    """A user's explicit modality (``--modality``, the Slicer field) -> its Modality, None when none was given; a
    name the hierarchy does not know is a PromptError. For entry points that check their inputs before any work."""
    return load_hierarchy().resolve_modality(chosen, strict=True) if chosen else None


def routing_modality(volume, chosen: Optional[str] = None, picture: bool = False) -> Modality:
    """The modality that routes the experts for ``volume`` (a ``Volume``: its ``modality`` is the file's, its
    ``array`` the intensities): ``chosen`` (a user's explicit choice; PromptError when the hierarchy does not
    know it), else the file's, else guessed from the intensities (``picture``: a colour or 8-bit picture, never
    guessed: the "unknown" row)."""
    if chosen:
        return check_modality_choice(chosen)
    hierarchy = load_hierarchy()
    if volume.modality:
        return hierarchy.resolve_modality(volume.modality)
    return hierarchy.unknown_modality if picture else guess_modality(volume.array)


def guess_modality(array: np.ndarray) -> Modality:
    """A guess from intensities alone, for when the file says nothing: CT if the values look like Hounsfield
    units (air near -1000 and soft tissue/bone above 0), MRI if they are non-negative, else unknown."""
    values = np.asarray(array)
    if values.size == 0:
        return load_hierarchy().unknown_modality
    sample = values.ravel()[:: max(1, values.size // 200_000)].astype(np.float64)
    low, high = np.percentile(sample, [1, 99])
    if sample.min() >= -3100 and low <= -500 and high >= 0 and sample.max() <= 5000:
        return resolve_modality("CT")
    if high > 0 and low >= -0.05 * high:    # (almost) non-negative: bias-corrected MRI may dip slightly below 0
        return resolve_modality("MRI")
    return load_hierarchy().unknown_modality
