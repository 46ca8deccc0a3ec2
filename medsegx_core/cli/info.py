"""``medsegx info VOLUME [--json]``: what a volume is and where it lies, in RAS (Slicer) and LPS (ITK/DICOM).

Size, spacing, voxel type, intensity range, modality when the file says it, origin, axis directions, the
IJK-to-RAS matrix and the RAS bounds: enough to check by eye that two files share a grid, or why they do not.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from ..data.readers import SUPPORTED, read_volume
from ..data.validation import blank_value
from ..data.volume import Volume

# (positive, negative) letter of each RAS axis
_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))


def axis_code(direction_ras: np.ndarray) -> str:
    """Three letters naming where the i, j, k axes point (closest anatomical direction), e.g. ``"LPS"``."""
    letters = []
    for column in np.asarray(direction_ras).T:
        axis = int(np.argmax(np.abs(column)))
        letters.append(_AXIS_LETTERS[axis][0 if column[axis] > 0 else 1])
    return "".join(letters)


def describe(volume: Volume) -> dict:
    array = volume.array
    return {
        "path": volume.source,
        "modality": volume.modality,
        "size_ijk": list(volume.shape_ijk),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "voxel_type": str(array.dtype),
        "intensity_min": float(array.min()),
        "intensity_max": float(array.max()),
        "intensity_mean": round(float(array.mean(dtype=np.float64)), 4),
        "blank": blank_value(array) is not None,   # one value everywhere: a volume check_image refuses
        "axis_code": axis_code(volume.direction_ras),
        "origin_ras": _rounded(volume.origin_ras),
        "origin_lps": _rounded(volume.origin_lps),
        "direction_ras": _rounded(volume.direction_ras),
        "direction_lps": _rounded(volume.direction_lps),
        "ijk_to_ras": _rounded(volume.ijk_to_ras),
        "ras_bounds": _rounded(volume.ras_bounds()),
    }


def _rounded(values) -> list:
    return np.round(np.asarray(values, dtype=float), 6).tolist()


def _text(info: dict) -> str:
    def triple(values):
        return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"

    def columns(matrix):  # directions are written column by column: the i, j, k axes
        return ", ".join(f"{name}={triple(col)}" for name, col in zip("ijk", np.asarray(matrix).T))

    size = " x ".join(str(n) for n in info["size_ijk"])
    lo, hi = np.asarray(info["ras_bounds"])
    lines = [
        f"file:        {info['path']}",
        f"modality:    {info['modality'] or 'unknown (not stored in the file)'}",
        f"size (ijk):  {size} voxels of {info['voxel_type']}",
        f"spacing:     {' x '.join(f'{s:g}' for s in info['spacing_mm'])} mm",
        f"intensity:   {info['intensity_min']:g} .. {info['intensity_max']:g} (mean {info['intensity_mean']:g})"
        + ("   blank: 'segment' and 'finetune' refuse it" if info["blank"] else ""),
        f"axes:        {info['axis_code']} (closest anatomical directions of i, j, k)",
        f"origin RAS:  {triple(info['origin_ras'])} mm   (centre of voxel 0,0,0; Slicer)",
        f"origin LPS:  {triple(info['origin_lps'])} mm   (ITK, NRRD, DICOM)",
        f"axes RAS:    {columns(info['direction_ras'])}",
        f"axes LPS:    {columns(info['direction_lps'])}",
        "IJKToRAS:    " + "\n             ".join(" ".join(f"{v:10.4f}" for v in row) for row in info["ijk_to_ras"]),
        "RAS bounds:  " + ", ".join(f"{a} [{l:.2f}, {h:.2f}]" for a, l, h in zip("RAS", lo, hi)) + " mm",
    ]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    volume = read_volume(args.volume, series_uid=args.series_uid)
    info = describe(volume)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_text(info))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="show a volume's size, spacing, intensity range, modality and geometry (RAS and LPS)",
        description=f"Read VOLUME ({SUPPORTED}) and print its geometry in RAS (Slicer) and LPS (ITK/DICOM).")
    parser.add_argument("volume", help="image file, or DICOM series folder (or one file of the series)")
    parser.add_argument("--series-uid", help="which DICOM series, when the folder holds several")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)
