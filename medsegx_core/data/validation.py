"""One set of rules for what MedSegX accepts, called by every entry point so that the rules cannot drift apart.

The command line (``info``, ``segment``, ``convert``, ``finetune``), the Slicer batch script, the Slicer Logic
and fine-tuning's data loading all check their inputs here (prompts are checked by ``prompts.py``):

- ``check_layout``: one 3D scalar volume (not 2D, a single slice or voxel, 4D, RGB/vector, complex), decided
  from the header before the voxels are read where a reader can;
- ``check_volume``: a volume in memory (read by ours, or loaded by Slicer) has that layout and finite voxels;
- ``check_image``: a volume to segment or train on is also not blank (one value everywhere);
- ``check_outputs``: the files a run will write are all different (a NIfTI labelmap's ``.json`` sidecar
  included), of a known type, and can be created without replacing anything (unless ``overwrite``),
  all checked before any work is done.

Each refusal is a ``MedSegXError`` whose one-line message starts with the file (or node) it is about.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, OutputError
from .atomic import check_writable
from .output_names import FORMATS, output_format, sidecar_path

PathLike = Union[str, os.PathLike]


# ---- volumes -------------------------------------------------------------------------------------------------------
def layout_problem(size: Sequence[int], components: int = 1, pixel_type: str = "") -> Optional[str]:
    """Why an image of this size/pixel type is not one 3D scalar volume (``None`` when it is)."""
    size = [int(s) for s in size]
    if "complex" in pixel_type.lower():
        return f"complex-valued voxels ({pixel_type}); a real scalar volume is needed"
    if components > 1:
        return (f"{components} values per voxel (an RGB or vector image); a single-channel (grey-level) volume "
                f"is needed")
    if len(size) == 4 and size[3] == 1:
        size = size[:3]  # one time point stored as 4D: still a 3D volume
    if len(size) > 3:
        return (f"a {len(size)}D image (size {_size(size)}); a single 3D volume is needed, extract one time point "
                f"or channel first")
    if len(size) < 3 or min(size) < 2:
        extended = sum(1 for s in size if s > 1)
        what = ("a single voxel", "a single line of voxels", "a 2D image")[min(extended, 2)]
        if extended == 2 and len(size) == 3:
            what = "a single slice"
        return (f"{what} (size {_size(size)}); a 3D volume with at least 2 voxels along each axis is needed")
    return None


def check_layout(name, size: Sequence[int], components: int = 1, pixel_type: str = "") -> None:
    """``InputError`` naming ``name`` (a path or a node label) when the image is not one 3D scalar volume."""
    problem = layout_problem(size, components, pixel_type)
    if problem:
        raise InputError(f"{name}: {problem}")


def count_nonfinite(array: np.ndarray) -> int:
    """How many voxels are NaN or infinite (0 for integer arrays, without a pass over them)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(name, nonfinite: int) -> None:
    if nonfinite:
        several = nonfinite > 1
        raise InputError(f"{name}: {nonfinite} voxel{'s are' if several else ' is'} NaN or infinite; replace "
                         f"{'them' if several else 'it'} with a finite value (e.g. the background intensity) and "
                         f"save the volume again")


def check_volume(volume, name=None):
    """A volume in memory (``data.volume.Volume``) is one 3D scalar volume with finite voxels; returns it."""
    name = name or volume.source or "the volume"
    array = np.asarray(volume.array)
    check_layout(name, array.shape[::-1], 1, str(array.dtype))
    check_finite(name, count_nonfinite(array))
    return volume


def blank_value(array: np.ndarray) -> Optional[float]:
    """The one value of a blank (constant) array, else ``None``."""
    if array.size == 0:
        return 0.0
    low, high = array.min(), array.max()
    return float(low) if low == high else None


def check_image(volume, name=None):
    """``check_volume`` plus: an image to segment or train on must not be blank. Returns the volume."""
    check_volume(volume, name)
    value = blank_value(np.asarray(volume.array))
    if value is not None:
        raise InputError(f"{name or volume.source or 'the volume'}: every voxel is {value:g} (a blank image); "
                         f"there is nothing to segment, check that this is the scan you meant")
    return volume


# ---- outputs -------------------------------------------------------------------------------------------------------
def check_outputs(paths: Iterable[Union[None, PathLike, Tuple[PathLike, Optional[str]]]], overwrite: bool = False,
                  new_folders: bool = False, formats: Optional[Sequence[str]] = None,
                  others: Iterable[Optional[PathLike]] = ()) -> List[Path]:
    """Refuse, before any work, outputs that collide, have an unknown type, or cannot be created; returns them.

    ``paths``: the segmentation files the run writes, each a path (its type from its name) or ``(path, type)``
    (a type chosen with ``--format``); ``None`` entries are skipped; a NIfTI output's sidecar is added.
    ``others``: further files it writes (a figure, a history), checked for collisions and writability only.
    ``formats``: the output types this entry point writes (default: all of ``output_names.FORMATS``).
    ``new_folders``: a missing parent folder is accepted when it can be created; ``make_output_folders``
    creates it just before writing, so a run refused later leaves no empty folder behind.
    """
    entries = [p if isinstance(p, tuple) else (p, None) for p in paths if p is not None]
    outputs = [Path(p).expanduser() for p, _ in entries]
    allowed = tuple(formats or FORMATS)
    files: List[Path] = []
    for path, (_, kind) in zip(outputs, entries):
        kind = kind or output_format(path)
        if kind not in allowed:
            raise OutputError(f"{path}: this command writes {' or '.join(_EXTENSIONS[k] for k in allowed)} "
                              f"files; change the name's ending")
        files.append(path)
        if kind == "nifti":
            files.append(sidecar_path(path))  # the names and colours of the labels
    files += [Path(p).expanduser() for p in others if p is not None]
    seen = {}
    for path in files:
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            first = seen[key]
            also = "" if first == path else f" (the label names of {first})"
            raise OutputError(f"{path}: named twice among the outputs{also}; give each output its own name")
        seen[key] = path
    for path in files:
        if new_folders and not path.parent.exists():
            ancestor = next(a for a in path.parents if a.exists())
            if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
                raise OutputError(f"{path}: cannot create the folder {path.parent} ({ancestor} is not a writable "
                                  f"folder); choose another output folder")
        else:
            check_writable(path, overwrite)
    return outputs


def make_output_folders(paths: Iterable[Optional[PathLike]]) -> None:
    """Create the missing parent folders of outputs accepted by ``check_outputs(..., new_folders=True)``."""
    for path in paths:
        if path is not None:
            folder = Path(path).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None


_EXTENSIONS = {"seg.nrrd": ".seg.nrrd", "nifti": ".nii.gz", "dicom-seg": ".dcm"}


def _size(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


__all__ = ["layout_problem", "check_layout", "count_nonfinite", "check_finite", "check_volume", "blank_value",
           "check_image", "check_outputs", "make_output_folders"]
