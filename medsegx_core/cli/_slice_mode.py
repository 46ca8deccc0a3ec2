"""``medsegx segment`` in MedSegX slice mode: MedSegX's 2D model on a 2D image or on slices of a volume.

Slice mode is chosen by the weights (a folder from ``medsegx weights import`` of kind medsegx2d, or a MedSegX
checkpoint file); a 2D image, ``--slice`` or ``--propagate`` ask for it and are refused with other weights.
Without ``--weights`` an installed MedSegX folder is used when the input or the options ask for slice mode.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np

from ..data.readers import SUPPORTED_2D, is_2d_image, read_image_2d, read_volume
from ..data.segments import Segment
from ..data.validation import check_image
from ..errors import InputError, WeightsError
from ._segment_options import refuse_slice_step
from ..progress import scaled
from ..prompts import Prompts


def check_slice_options(args: argparse.Namespace, choice, prompt_sets) -> None:
    """Options MedSegX slice mode cannot honour, refused before any work."""
    from ..slice_predictor import check_slice_precision

    if args.experts:
        raise WeightsError(f"--experts {args.experts}: expert packs are trained on a SegVol base; MedSegX's 2D model "
                           f"({choice.path}) carries its own experts: drop --experts")
    if args.min_confidence is not None:
        raise InputError("--min-confidence applies to the volumetric (SegVol) model; MedSegX slice mode reports no "
                         "presence confidence: drop the option")
    if args.tokenizer:
        raise InputError(f"--tokenizer {args.tokenizer}: a tokenizer is for SegVol's text tower; MedSegX's 2D model "
                         f"reads --text through the anatomy hierarchy: drop the option")
    if args.preprocessing != "canonical":
        raise InputError(f"--preprocessing {args.preprocessing} is SegVol's; MedSegX slice mode reads the slices as "
                         f"stored: drop the option")
    check_slice_precision(args.precision)
    refuse_slice_step(args, "MedSegX slice mode")


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
    predictor = SlicePredictor(load_medsegx_weights(weights), device=args.device, precision=args.precision)
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
