"""``medsegx segment`` in MedSegX slice mode: MedSegX's 2D model on a 2D image or on slices of a volume.

Slice mode is chosen by the weights (a folder from ``medsegx weights import`` of kind medsegx2d, or a MedSegX
checkpoint file); a 2D image, ``--slice`` or ``--propagate`` ask for it and are refused with other weights.
Without ``--weights`` an installed MedSegX folder is used when the input or the options ask for slice mode.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..data.readers import SUPPORTED_2D, is_2d_image, read_image_2d, read_volume
from ..data.segments import Segment
from ..data.validation import check_image
from ..errors import InputError, WeightsError
from ..progress import scaled
from ..prompts import Prompts


def asks_for_slices(args: argparse.Namespace) -> bool:
    return args.slice is not None or args.propagate or is_2d_image(args.volume)


def slice_weights(args: argparse.Namespace) -> Optional[Path]:
    """The MedSegX weights to run in slice mode, or None for SegVol's volumetric mode; a WeightsError when the
    input or options ask for one mode and the weights are of the other kind."""
    chosen = _slice_weights(args)
    if chosen is not None and args.experts:
        raise WeightsError(f"--experts {args.experts}: expert packs are trained on a SegVol base; MedSegX's 2D model "
                           f"({chosen}) carries its own experts: drop --experts")
    return chosen


def _slice_weights(args: argparse.Namespace) -> Optional[Path]:
    from ..weights.hub import weights_dir
    from ..weights.medsegx2d import is_medsegx_checkpoint
    from ..weights.store import MEDSEGX2D_KIND, weights_kind

    wanted = asks_for_slices(args)
    if args.weights:
        path = Path(args.weights).expanduser()
        if path.exists() and is_medsegx_checkpoint(path):
            return path
        if wanted:
            reason = (f"{args.volume} is a 2D image" if is_2d_image(args.volume)
                      else "--slice/--propagate are MedSegX slice mode")
            raise WeightsError(f"{reason}, but the weights {path} are not MedSegX's 2D model (SegVol segments "
                               f"volumes); give --weights a folder from 'medsegx weights import SAM_CHECKPOINT "
                               f"--trained medsegx_vit_b.pth'")
        return None
    if not wanted:
        return None
    installed = sorted(p for p in weights_dir().iterdir() if weights_kind(p) == MEDSEGX2D_KIND) \
        if weights_dir().is_dir() else []
    if not installed:
        what = args.volume if is_2d_image(args.volume) else "--slice/--propagate"
        raise WeightsError(f"slice mode ({what}) needs MedSegX's 2D model and none is installed in "
                           f"{weights_dir()}; import it with 'medsegx weights import SAM_CHECKPOINT --trained "
                           f"medsegx_vit_b.pth' or give --weights")
    print(f"medsegx: using the MedSegX weights installed in {installed[0]}", file=sys.stderr)
    return installed[0]


def read_input(args: argparse.Namespace, slices: bool):
    """(volume, colours or None): a 2D image as a one-slice volume in slice mode, else a checked volume."""
    if slices and is_2d_image(args.volume):
        return read_image_2d(args.volume)
    if not slices and is_2d_image(args.volume):
        raise InputError(f"{args.volume}: a 2D image ({SUPPORTED_2D}); SegVol segments volumes: use MedSegX "
                         f"weights (--weights FOLDER from 'medsegx weights import') for 2D images")
    return check_image(read_volume(args.volume, series_uid=args.series_uid)), None


def segment_slices(args: argparse.Namespace, weights: Path, volume, rgb, prompt_sets: List[Prompts], update
                   ) -> Tuple[List[Segment], List[str], str]:
    """Each prompt set on its slice (and the neighbouring ones with --propagate) -> segments, notes, runtime."""
    from ..slice_predictor import SlicePredictor
    from ..weights.medsegx2d import load_medsegx_weights

    update(0.0, "loading the MedSegX weights")
    predictor = SlicePredictor(load_medsegx_weights(weights), device=args.device)
    predictor.set_volume(volume, modality=args.modality, rgb=rgb)
    segments, notes = [], []
    share = 0.9 / len(prompt_sets)
    runtime = ""
    for index, prompts in enumerate(prompt_sets):
        result = predictor.segment(prompts, slice_index=args.slice, propagate=args.propagate,
                                   progress=scaled(update, 0.1 + index * share, 0.1 + (index + 1) * share))
        name = args.name or result.name or "segment"
        segments.append(Segment(name=name, mask=result.mask))
        filled = result.slice_indices
        where = f"slices {filled[0]}..{filled[-1]}" if len(filled) > 1 else f"slice {result.slices[0].slice_index}"
        notes.append(f"{name!r} {int(np.count_nonzero(result.mask))} voxels on {where} (MedSegX slice mode, "
                     f"{predictor.intensity}, modality {predictor.modality.name})")
        for note in result.notes:
            print(f"medsegx: note: {note}", file=sys.stderr)
        runtime = result.runtime
    return segments, notes, runtime
