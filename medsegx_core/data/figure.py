"""A PNG of segments over their image: axial, coronal and sagittal planes through the segmentation's centre.

The volume is shown in patient orientation whatever its storage order (axes permuted and flipped to RAS+ with
``orientation.AxisReorientation``, no resampling), in radiological convention (the patient's right
on the left of axial and coronal views, superior up), with each plane's pixel extent in millimetres so that
anisotropic voxels keep their true proportions. Segments use the colours the segmentation writers give them
(``segments.complete``), with a legend. Written through ``atomic.atomic_output`` (temporary name, then rename).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .orientation import AxisReorientation
from .atomic import atomic_output
from .segments import Segment, complete
from .volume import Volume

CT_WINDOW = (-160.0, 240.0)      # HU: soft-tissue window (level 40, width 400)
PERCENTILES = (0.5, 99.5)        # display range of non-CT images
FILL_ALPHA = 0.4


def display_range(volume: Volume, array: np.ndarray) -> Tuple[float, float]:
    """Soft-tissue window for CT in HU, else robust percentiles of the image."""
    if (volume.modality or "").upper() == "CT" or float(array.min()) < -500:
        return CT_WINDOW
    low, high = np.percentile(array, PERCENTILES)
    return float(low), float(max(high, low + 1e-6))


def segmentation_centre(masks_ras: Sequence[np.ndarray], shape: Sequence[int]) -> Tuple[int, int, int]:
    """(k, j, i) of the centre of mass of all segments (the volume's centre when all are empty)."""
    union = np.zeros(tuple(shape), dtype=bool)
    for mask in masks_ras:
        union |= mask
    if not union.any():
        return tuple(n // 2 for n in shape)
    return tuple(int(round(c)) for c in np.argwhere(union).mean(axis=0))


def _planes(centre_kji):
    """(title, slicer, horizontal axis letters, vertical axis letters) of each view on a RAS+ (S, A, R) array."""
    k, j, i = centre_kji
    return (
        ("axial", lambda a: a[k], (2, 1), ("L", "R"), ("P", "A")),       # rows: A, columns: R
        ("coronal", lambda a: a[:, j, :], (2, 0), ("L", "R"), ("I", "S")),  # rows: S, columns: R
        ("sagittal", lambda a: a[:, :, i], (1, 0), ("P", "A"), ("I", "S")),  # rows: S, columns: A
    )


def save_overlay_figure(path: Union[str, Path], volume: Volume, segments: Sequence[Segment],
                        title: Optional[str] = None, overwrite: bool = False, dpi: int = 110) -> Path:
    """Write the three-plane overlay PNG of ``segments`` (on ``volume``'s grid) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI, the Slicer worker thread)
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not str(path).lower().endswith(".png"):
        raise InputError(f"{path}: the figure is written as PNG; give a file name ending in .png")
    segments = complete(segments, volume.array.shape)
    orientation = AxisReorientation.to_ras(volume.direction_ras, volume.shape_ijk)
    image = orientation.array_to_working(volume.array).astype(np.float32)
    masks = [np.ascontiguousarray(orientation.array_to_working(s.binary_mask())) for s in segments]
    spacing_ijk = np.asarray(volume.spacing, dtype=float)[list(orientation.source_axis)]
    spacing_kji = spacing_ijk[::-1]
    low, high = display_range(volume, image)
    centre = segmentation_centre(masks, image.shape)

    figure, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    for axis, (name, cut, (col_axis, row_axis), (left, right), (bottom, top)) in zip(axes, _planes(centre)):
        plane = cut(image)
        extent = (0, plane.shape[1] * spacing_kji[col_axis], 0, plane.shape[0] * spacing_kji[row_axis])
        axis.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                    interpolation="nearest")
        for segment, mask in zip(segments, masks):
            inside = cut(mask)
            if inside.any():
                colour = ListedColormap([segment.color])
                axis.imshow(np.ma.masked_where(~inside, inside), cmap=colour, alpha=FILL_ALPHA, origin="lower",
                            extent=extent, interpolation="nearest", vmin=0, vmax=1)
                if min(inside.shape) >= 2:   # a one-slice image (a 2D picture) has no outline across it
                    axis.contour(inside.astype(float), levels=[0.5], colors=[segment.color], linewidths=1.0,
                                 origin="lower", extent=extent)
        if name in ("axial", "coronal"):
            axis.invert_xaxis()   # radiological convention: the patient's right on the viewer's left
            left, right = right, left
        axis.set_title(f"{name} (slice {centre[{'axial': 0, 'coronal': 1, 'sagittal': 2}[name]]})")
        axis.set_xlabel(f"{left}  <->  {right}   (mm)")
        axis.set_ylabel(f"{bottom}  <->  {top}   (mm)")
    figure.legend(handles=[Patch(facecolor=s.color, edgecolor=s.color, label=s.name) for s in segments],
                  loc="lower center", ncol=min(len(segments), 6), frameon=False)
    figure.suptitle(title or Path(volume.source or "volume").name)
    figure.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_output(path, overwrite) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    plt.close(figure)
    return Path(path)
