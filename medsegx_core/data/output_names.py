"""What an output file's name means: its segmentation format, and the label-names sidecar of a NIfTI labelmap.

Naming rules only (no I/O), so that the writers and the output checks of ``validation.py`` share them without
importing each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import OutputError

PathLike = Union[str, Path]

FORMATS = ("seg.nrrd", "nifti", "dicom-seg")


def output_format(path: PathLike) -> str:
    """The output type a file name asks for: ``seg.nrrd``, ``nifti`` or ``dicom-seg``."""
    name = Path(path).name.lower()
    if name.endswith(".nrrd"):
        return "seg.nrrd"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".dcm"):
        return "dicom-seg"
    raise OutputError(f"{path}: unknown output type; end the name with .seg.nrrd (Slicer segmentation), "
                      f".nii.gz (labelmap + .json names) or .dcm (DICOM SEG)")


def sidecar_path(labelmap_path: PathLike) -> Path:
    """``labels.nii.gz`` -> ``labels.json`` (the convention of the shared data and of TotalSegmentator)."""
    path = Path(labelmap_path)
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json")
