"""medsegx_core: the engine of the MedSegX 3D Slicer extension (no Slicer, Qt or VTK imports).

Promptable volumetric segmentation in the SegVol style (text, points, boxes; zoom-out-zoom-in) with
MedSegX's hierarchy-routed adapter experts (ConMoAE). See DESIGN.md beside this file for the layout.
"""
__version__ = "0.1.0"
