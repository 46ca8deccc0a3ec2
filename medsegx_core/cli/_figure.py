"""A PNG overview of segments on their volume: axial, coronal and sagittal slices through the segments' centre.

Slices are taken on the RAS+ reoriented grid (``inference/orientation.py``) and drawn in radiological
convention (patient's right on the left of the image, anterior/superior at the top), with the voxel spacing as
aspect ratio, so the figure looks the same however the file stores its axes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.atomic import atomic_output
from ..data.segments import Segment
from ..data.terminology import default_color
from ..data.volume import Volume
from ..inference.orientation import AxisReorientation


def write_figure(path, volume: Volume, segments: Sequence[Segment], overwrite: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    orientation = AxisReorientation.to_ras(volume.direction_ras, volume.shape_ijk)
    image = orientation.array_to_working(volume.array)          # (S, A, R) axes: k, j, i of the RAS grid
    spacing = np.asarray(volume.spacing)[list(orientation.source_axis)]   # mm along R, A, S
    masks = [orientation.array_to_working(s.binary_mask()) for s in segments]
    union = np.zeros(image.shape, dtype=bool)
    for mask in masks:
        union |= mask
    centre = (np.argwhere(union).mean(axis=0).round().astype(int) if union.any()
              else np.asarray(image.shape) // 2)
    low, high = np.percentile(image[::2, ::2, ::2], [1, 99])
    views = (  # (title, slicer, aspect = row mm / column mm); rows run S or A upwards, columns R leftwards
        ("axial", lambda a: a[centre[0], :, ::-1], spacing[1] / spacing[0]),
        ("coronal", lambda a: a[:, centre[1], ::-1], spacing[2] / spacing[0]),
        ("sagittal", lambda a: a[:, :, centre[2]], spacing[2] / spacing[1]),
    )
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for axis, (title, cut, aspect) in zip(axes, views):
        axis.imshow(cut(image), cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
        for index, (segment, mask) in enumerate(zip(segments, masks)):
            colour = segment.color or default_color(segment.name, index)
            overlay = np.ma.masked_equal(cut(mask).astype(np.uint8), 0)
            axis.imshow(overlay, cmap=ListedColormap([colour]), alpha=0.45, origin="lower", aspect=aspect,
                        vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(title)
        axis.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=s.color or default_color(s.name, i))
               for i, s in enumerate(segments)]
    figure.legend(handles, [s.name for s in segments], loc="lower center", ncol=max(1, len(segments)))
    figure.suptitle(Path(volume.source).name if volume.source else "segmentation")
    with atomic_output(path, overwrite) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return Path(path)
