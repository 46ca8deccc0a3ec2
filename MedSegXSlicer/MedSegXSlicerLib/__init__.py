"""The Qt-free half of the MedSegX Slicer module: the Logic (logic.py) and the jobs it hands each action to
(model_choice.py, segmentation.py, model_downloads.py, expert_training.py), one file per model the Slicer side runs
(segvol_mode.py, box_mode.py for LiteMedSAM, slice_mode.py for MedSegX 2D), MRML <-> engine conversion, the
engine sessions, the worker thread, dependency installation.

Nothing in this package imports ``qt``, ``ctk`` or ``slicer.ScriptedLoadableModule`` unguarded, so it runs in
Slicer's Python console, in batch mode (``--no-main-window``), and on plain Python with the PyPI ``slicer-core``
package (how CI tests it on real MRML). ``medsegx_core`` (and torch) are imported lazily, on first use, so the
module loads in Slicer before its dependencies are installed.
"""
from .logic import MedSegXSlicerLogic

__all__ = ["MedSegXSlicerLogic"]
