"""Colour and terminology of a new segment, from its structure name.

A colour from a fixed palette chosen by the name's hash, so the same name always gets the same colour and
neighbouring segments rarely share one.
"""
from __future__ import annotations

import zlib
from typing import Optional, Tuple

# Distinct, medium-saturation colours that read well over greyscale CT/MR (0-1 RGB).
PALETTE = (
    (0.90, 0.49, 0.35), (0.35, 0.70, 0.90), (0.55, 0.82, 0.40), (0.95, 0.80, 0.30), (0.75, 0.45, 0.85),
    (0.30, 0.80, 0.70), (0.95, 0.55, 0.70), (0.60, 0.60, 0.95), (0.85, 0.65, 0.45), (0.45, 0.90, 0.55),
)


def palette_color(name: str) -> Tuple[float, float, float]:
    return PALETTE[zlib.crc32(name.strip().lower().encode("utf-8")) % len(PALETTE)]


def segment_appearance(name: str) -> Tuple[Tuple[float, float, float], Optional[str]]:
    """``(rgb 0-1, Slicer terminology entry string or None)`` for a segment named ``name``."""
    return palette_color(name), None
