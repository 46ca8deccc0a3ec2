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

from .hierarchy import Modality, guess_modality, load_hierarchy


def routing_modality(volume, chosen: Optional[str] = None, picture: bool = False) -> Modality:
    """The modality that routes the experts for ``volume`` (a ``Volume``: its ``modality`` is the file's, its
    ``array`` the intensities): ``chosen`` (a user's explicit choice; PromptError when the hierarchy does not
    know it), else the file's, else guessed from the intensities (``picture``: a colour or 8-bit picture, never
    guessed: the "unknown" row)."""
    hierarchy = load_hierarchy()
    if chosen:
        return hierarchy.resolve_modality(chosen, strict=True)
    if volume.modality:
        return hierarchy.resolve_modality(volume.modality)
    return hierarchy.unknown_modality if picture else guess_modality(volume.array)
