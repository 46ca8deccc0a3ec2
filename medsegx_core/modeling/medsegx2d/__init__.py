"""MedSegX's own 2D model (SAM ViT image encoder with ConMoAE in every block, box prompts, keep-resolution
decoder), rebuilt from its description to reproduce the official forward pass number for number.

It proves that our model-agnostic ConMoAE (``modeling/conmoae.py``) expresses MedSegX's arithmetic exactly, and
it can run MedSegX's released 2D weights (loaded by ``weights/medsegx2d.py``). See
``Testing/engine/test_medsegx_parity.py`` (the official evaluation it compares with is
``Testing/medsegx_evaluation.py``).
"""
from .config import MedSegX2DConfig
from .model import MedSegX2D

__all__ = ["MedSegX2D", "MedSegX2DConfig"]
