"""The fine-tuning loss: Dice + binary cross-entropy on mask logits, 1:1 as MedSegX and SegVol train.

MONAI's ``DiceCELoss`` with ``sigmoid=True`` on one channel is exactly this (soft Dice on sigmoid(logits) per
sample, plus BCE-with-logits), so it is reused rather than re-written. ``dice_score`` is the hard Dice used for
validation (logit > 0, as inference thresholds sigmoid > 0.5).
"""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss


def dice_bce_loss() -> DiceCELoss:
    """logits (B, 1, D, H, W), target (B, 1, D, H, W) in {0, 1} -> scalar (mean over the batch)."""
    return DiceCELoss(sigmoid=True, lambda_dice=1.0, lambda_ce=1.0, smooth_nr=1e-5, smooth_dr=1e-5)


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample (B,): 2|A∩B| / (|A|+|B|), 1 when both are empty."""
    predicted = (logits > 0).flatten(1).float()
    truth = (target > 0.5).flatten(1).float()
    overlap = (predicted * truth).sum(1)
    total = predicted.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))
