"""The one training loss and the one validation metric of the training loop (``training/loop.py``).

Loss: Dice + binary cross-entropy 1:1, as MedSegX and SegVol train. MONAI's ``DiceCELoss`` with ``sigmoid=True`` on
one channel is exactly this (soft Dice on sigmoid(logits) per sample plus BCE-with-logits), so it is reused rather
than re-written. It scores the decoder's *low-resolution* logits against the target averaged over the same cells:
inference upsamples those logits trilinearly to the window, so they are what the model controls, and scoring them
at their own resolution skips a 16x larger upsample + loss per sample (a third of a CPU step).

Metric: the hard Dice of the upsampled logits (logit > 0, as inference thresholds sigmoid > 0.5) against the
full-resolution target, through MONAI's ``compute_dice`` (1 when both are empty, like ``data.metrics.dice``).
"""
from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from torch.nn import functional as F


def dice_bce_loss() -> DiceCELoss:
    """logits (B, 1, D, H, W), target (B, 1, D, H, W) in [0, 1] -> scalar (mean over the batch)."""
    return DiceCELoss(sigmoid=True, lambda_dice=1.0, lambda_ce=1.0, smooth_nr=1e-5, smooth_dr=1e-5)


def lowres_target(target: torch.Tensor, logits_lowres: torch.Tensor) -> torch.Tensor:
    """The full-resolution target (B, 1, D, H, W) averaged over the cells of the low-resolution logits."""
    return F.adaptive_avg_pool3d(target, tuple(logits_lowres.shape[2:]))


def dice_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample (B,) of logits > 0 against target > 0.5, on the same grid; 1 when both are empty."""
    scores = compute_dice((logits > 0).float(), (target > 0.5).float(), include_background=True, ignore_empty=False)
    return scores.reshape(-1)
