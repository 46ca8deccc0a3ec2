"""How sure the model is that what it segmented is there: a score from its own logits, no ground truth needed.

A text prompt names a structure; the model answers with a mask even when the structure is outside the field of
view (a kidney asked for on slices above the kidneys). Such an answer is a weak, blurry blob: its voxels sit just
above the decision threshold. ``presence_confidence`` is the mean foreground probability inside the mask, read
from the same logits that made the mask; a structure that is really there is mostly segmented with
probabilities near 1. ``PRESENCE_WARNING_BELOW`` was fixed on the training volumes
(``Testing/benchmarks/absent_structures.py`` reports its hit and false-warning rates on held-out volumes).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# A result whose presence confidence is below this is reported as "may not be in this volume".
PRESENCE_WARNING_BELOW = 0.5


def presence_confidence(logits: np.ndarray, mask: np.ndarray) -> float:
    """Mean sigmoid probability over the mask's voxels (0.0 for an empty mask)."""
    inside = logits[mask.astype(bool)]
    if inside.size == 0:
        return 0.0
    # float64 accumulation: a large organ holds millions of voxels.
    return float(np.mean(1.0 / (1.0 + np.exp(-inside.astype(np.float64)))))


def absence_warning(name: Optional[str], confidence: float, threshold: float = PRESENCE_WARNING_BELOW
                    ) -> Optional[str]:
    """The warning to give for a result of this confidence, or None when it looks present."""
    if confidence >= threshold:
        return None
    what = f"'{name}'" if name else "the prompted structure"
    return (f"{what} may not be in this volume: the model's confidence in its mask is {confidence:.2f} "
            f"(below {threshold:.2f}); check the result, or drop it with --min-confidence")
