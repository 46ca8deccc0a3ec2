"""Colour and terminology of a new segment, from its structure name.

Known structures ("liver", "left kidney", ...) take the standard colour and SNOMED CT terminology of Slicer's
"3D Slicer General Anatomy list" from the engine's table (``medsegx_core.data.terminology``, shared with the file
writers, so a structure looks the same in Slicer and in a .seg.nrrd written by the command line). Other names get
the engine's palette colour for the segment's position and no terminology (Slicer then shows the plain name).
"""
from __future__ import annotations

from typing import Optional, Tuple

from medsegx_core.data.terminology import default_color, lookup


def segment_appearance(name: str, index: int) -> Tuple[Tuple[float, float, float], Optional[str]]:
    """``(rgb 0-1, Slicer TerminologyEntry tag or None)`` for a segment named ``name`` at position ``index``."""
    known = lookup(name)
    if known is None:
        return tuple(default_color(name, index)), None
    terminology, color = known
    return tuple(color), terminology.to_slicer_string()
