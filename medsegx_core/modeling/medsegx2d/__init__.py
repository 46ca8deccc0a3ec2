"""MedSegX's own 2D model (SAM ViT image encoder with ConMoAE in every block, box prompts, keep-resolution
decoder), rebuilt from its description to reproduce the official forward pass and evaluation number for number.

It proves that our model-agnostic ConMoAE (``modeling/conmoae.py``) expresses MedSegX's arithmetic exactly, and
it can run MedSegX's released 2D weights (loaded by ``weights/medsegx2d.py``). See
``Testing/engine/test_medsegx_parity.py``.
"""
from .config import MedSegX2DConfig
from .evaluation import SliceEvaluation, box_from_label, context_from_task_folder, evaluate_slice, medsegdb_slice
from .model import MedSegX2D

__all__ = ["MedSegX2D", "MedSegX2DConfig", "SliceEvaluation", "box_from_label", "context_from_task_folder",
           "evaluate_slice", "medsegdb_slice"]
