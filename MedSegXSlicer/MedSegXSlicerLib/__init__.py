"""The Qt-free half of the MedSegX Slicer module: Logic, MRML <-> engine conversion, engine session, worker
thread, dependency installation.

Nothing in this package imports ``qt``, ``ctk`` or ``slicer.ScriptedLoadableModule`` unguarded, so it runs in
Slicer's Python console, in batch mode (``--no-main-window``), and on plain Python with the PyPI ``slicer-core``
package (how CI tests it on real MRML). ``medsegx_core`` (and torch) are imported lazily, on first use, so the
module loads in Slicer before its dependencies are installed.
"""
from .logic import MedSegXSlicerLogic

__all__ = ["MedSegXSlicerLogic"]
