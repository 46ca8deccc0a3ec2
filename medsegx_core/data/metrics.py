"""Overlap metrics of binary masks (the one Dice of the project: evaluation, benchmarks and tests use it)."""
from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A| + |B|) of two binary arrays of one shape (any dtype; nonzero = inside); 1.0 when both are
    empty (nothing to find, nothing found)."""
    prediction, truth = np.asarray(prediction).astype(bool), np.asarray(truth).astype(bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"Dice of arrays of different shapes {prediction.shape} and {truth.shape}")
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total
