"""``medsegx segment VOLUME [--text NAME ...] [--point R A S ...] [--box ...] [--weights W] -o OUT``.

Segments structures and writes them as named segments on the volume's grid (.seg.nrrd for Slicer, .nii.gz
labelmap + .json names, or .dcm DICOM SEG, from the output's extension); one segment per ``--text``, or one for a
structure given by clicks and/or a box (with at most one text). Which model runs is ``_model_choice``'s rule (a box
without ``--weights``: LiteMedSAM slice by slice; text and clicks: SegVol's zoom-out-zoom-in). The options shared
with the Slicer batch script are declared once, in ``_segment_options``.
Points and boxes are RAS millimetres (what Slicer shows), or voxel indices (i, j, k in ITK order) with
``--ijk``. Text, points and a box may be combined. ``--weights`` takes a published SegVol checkpoint file or
folder (tokenizer files beside it, or ``--tokenizer``) or a folder made by ``medsegx weights import``.
An existing output is kept unless ``--overwrite``; the file appears only when complete.

With MedSegX's 2D weights (``medsegx weights import SAM_CHECKPOINT --trained medsegx_vit_b.pth``) it runs MedSegX
slice mode: a box on one slice (``--slice K`` to use another box on slice K) of a volume or of a 2D image (PNG,
JPEG, TIFF, a single DICOM image), and with ``--propagate`` the neighbouring slices too.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import numpy as np

from ..data.segments import Segment
from ..data.validation import check_outputs, make_output_folders
from ..data.writers import FORMATS, dicom_seg_sources, output_format, write_nifti_labelmap, write_segmentation
from ..errors import InputError, OutputError, PromptError
from ..inference.confidence import PRESENCE_WARNING_BELOW
from ..inference.preprocessing import PROFILES
from ..progress import scaled
from ..slice_predictor import box_on_slice
from ._progress import progress_bar
from .. import registry
from ._box_mode import check_options as check_box_options, check_prompts as check_box_prompts, segment_boxes
from ._model_choice import choose_model, default_litemedsam
from ._segment_options import add_shared_options, check_shared_options, prompt_sets_from_options, refuse_slice_step
from ._slice_mode import check_slice_options, read_input, segment_slices


# What may refine SegVol's zoom-out (--zoom-in): its own windows, or LiteMedSAM slice by slice
ZOOM_INS = ("segvol", "litemedsam")
LITEMEDSAM_ZOOM_IN = "litemedsam"


def run(args: argparse.Namespace) -> int:
    # Everything that can be refused cheaply is refused before the volume and the weights are read, and
    # everything the volume decides (prompts inside it, a DICOM SEG's source series) before the weights are.
    if args.labelmap and output_format(args.labelmap) != "nifti":
        raise OutputError(f"--labelmap {args.labelmap}: a labelmap is written as NIfTI; end it with .nii.gz")
    kind = args.format or output_format(args.output)
    outputs = [args.output, args.labelmap, args.figure]
    check_outputs([(args.output, kind), args.labelmap], args.overwrite, new_folders=True, others=[args.figure])
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise InputError(f"--min-confidence {args.min_confidence}: give a number between 0 and 1 (e.g. "
                         f"{PRESENCE_WARNING_BELOW}, the level below which a structure is reported as maybe absent)")
    check_shared_options(args)
    prompt_sets = prompt_sets_from_options(args, "ijk" if args.ijk else "ras")
    choice = choose_model(args, prompt_sets)
    runner = RUNNERS[choice.kind.name]
    runner.check(args, choice, prompt_sets)
    if choice.explanation:
        print(f"medsegx: {choice.explanation}", file=sys.stderr)
    volume, rgb = read_input(args, choice.kind.name == registry.MEDSEGX2D)
    for prompts in prompt_sets:
        prompts.to_voxel(volume)
        if choice.kind.name == registry.MEDSEGX2D:
            box_on_slice(volume, prompts, args.slice)
    if kind == "dicom-seg":
        dicom_seg_sources(volume, headers_only=True)
    make_output_folders(outputs)   # "-o out/x.seg.nrrd" just works

    bar, update = progress_bar("segment")
    try:
        segments, notes, runtime, dropped = runner.segment(args, choice, volume, rgb, prompt_sets, update)
    finally:
        bar.close()
    if dropped:
        print(f"medsegx: warning: left out {', '.join(dropped)}: below --min-confidence {args.min_confidence}",
              file=sys.stderr)
    if not segments:
        raise PromptError(f"nothing written: every structure was below --min-confidence {args.min_confidence} "
                          f"({', '.join(dropped)}); the model does not find them in {args.volume}")
    for segment in segments:
        if not segment.mask.any():
            print(f"medsegx: warning: the segmentation of {segment.name!r} is empty", file=sys.stderr)
    written = [write_segmentation(args.output, volume, segments, overwrite=args.overwrite, format=args.format)]
    if args.labelmap:
        overlapping = sum(s.mask.astype(np.uint16) for s in segments).max() > 1
        if overlapping:
            print("medsegx: warning: segments overlap; in the labelmap a later segment wins where they do",
                  file=sys.stderr)
        written.append(write_nifti_labelmap(args.labelmap, volume, _without_overlaps(segments),
                                            overwrite=args.overwrite))
    if args.figure:
        from ..data.figure import save_overlay_figure

        written.append(save_overlay_figure(args.figure, volume, segments, overwrite=args.overwrite))
    print(f"wrote {', '.join(map(str, written))}: {'; '.join(notes)}; {runtime} ({choice.kind.title})")
    return 0


def _segment_volume(args, choice, volume, rgb, prompt_sets, update):
    """SegVol's zoom-out-zoom-in on the whole volume, one prompt set after another."""
    from ..predictor import Predictor

    update(0.0, "loading the weights")
    model = choice.kind.load(choice.path, tokenizer=args.tokenizer)
    if args.experts:   # adapter experts fine-tuned on this base (medsegx finetune); refused on another base
        from ..weights.expert_pack import apply_expert_pack

        update(0.02, "loading the expert pack")
        apply_expert_pack(model, args.experts)
    predictor = Predictor(model, device=args.device, precision=args.precision, preprocessing=args.preprocessing)
    predictor.set_volume(volume, modality=args.modality, progress=scaled(update, 0.05, 0.3))
    slices = _litemedsam_zoom_in(args, volume, update) if args.zoom_in == LITEMEDSAM_ZOOM_IN else None
    segments, notes, dropped = [], [], []
    share = 0.7 / len(prompt_sets)
    for index, prompts in enumerate(prompt_sets):
        step = scaled(update, 0.3 + index * share, 0.3 + (index + 1) * share)
        if slices is None:
            result = predictor.segment(prompts, progress=step)
            how = f"{result.windows} windows"
        else:   # the zoom-out says where, LiteMedSAM segments each slice of its largest blob from that slice's box
            result = predictor.coarse_mask(prompts, progress=scaled(step, 0.0, 0.3))
            zoomed = slices.segment_region(result.mask, result.name, progress=scaled(step, 0.3, 1.0))
            result.mask = zoomed.mask
            how = f"zoom-out + LiteMedSAM on {len(zoomed.slices)} slices"
            for note in zoomed.notes:   # (the zoom-out's own notes reach stderr through the progress bar, as above)
                print(f"medsegx: note: {note}", file=sys.stderr)
        name = args.name or result.name or "segment"
        if args.min_confidence is not None and result.confidence < args.min_confidence:
            dropped.append(f"{name!r} (confidence {result.confidence:.2f})")
            continue
        segments.append(Segment(name=name, mask=result.mask))
        notes.append(f"{name!r} {int(result.mask.sum())} voxels ({how}, confidence {result.confidence:.2f})")
    runtime = result.runtime if slices is None else f"{result.runtime}; zoom-in {slices.runner.describe()}"
    return segments, notes, runtime, dropped


def _litemedsam_zoom_in(args, volume, update):
    """LiteMedSAM's slice-wise predictor on the volume, as the zoom-in of SegVol's zoom-out (--zoom-in litemedsam)."""
    update(0.3, "loading LiteMedSAM for the zoom-in")
    litemedsam = default_litemedsam()
    slices = litemedsam.kind.predictor(litemedsam.kind.load(litemedsam.path), device=args.device,
                                       slice_step=args.slice_step)
    slices.set_volume(volume, modality=args.modality)
    return slices


class _Runner:
    """How the command line runs one kind: its option checks (before any reading) and its segmentation."""

    def __init__(self, check, segment):
        self.check, self.segment = check, segment


def _check_volume(args, choice, prompt_sets) -> None:
    if args.zoom_in == LITEMEDSAM_ZOOM_IN:
        default_litemedsam()        # installed? (else a clear error before anything is read)
    else:                           # the fast mode is LiteMedSAM's
        refuse_slice_step(args, choice.kind.title)


def _refuse_zoom_in(args, title: str) -> None:
    """--zoom-in chooses what refines SegVol's zoom-out; another model runs the prompt on its own."""
    if args.zoom_in == "segvol":
        raise InputError(f"--zoom-in segvol refines SegVol's zoom-out, and {title} runs this prompt: drop the option "
                         f"(or give --weights for SegVol)")


def _check_boxes(args, choice, prompt_sets) -> None:
    _refuse_zoom_in(args, choice.kind.title)
    check_box_options(args, choice.kind.title, prompt_sets)
    check_box_prompts(prompt_sets, choice.kind.title)


def _check_slices(args, choice, prompt_sets) -> None:
    if args.zoom_in is not None:
        raise InputError(f"--zoom-in {args.zoom_in} refines SegVol's zoom-out; MedSegX slice mode segments the slice "
                         f"itself: drop the option")
    check_slice_options(args, choice, prompt_sets)


def _boxes(args, choice, volume, rgb, prompt_sets, update):
    return segment_boxes(args, choice, volume, prompt_sets, update)


def _slices(args, choice, volume, rgb, prompt_sets, update):
    return (*segment_slices(args, choice.path, volume, rgb, prompt_sets, update), [])


# The one place where the command line tells the kinds apart: each kind's checks and its way through a volume.
RUNNERS = {registry.SEGVOL: _Runner(_check_volume, _segment_volume),
           registry.LITEMEDSAM: _Runner(_check_boxes, _boxes),
           registry.MEDSEGX2D: _Runner(_check_slices, _slices)}


def _without_overlaps(segments: List[Segment]) -> List[Segment]:
    """Copies whose masks do not overlap (a later segment keeps the contested voxels), for one labelmap."""
    taken = np.zeros(segments[0].mask.shape, dtype=bool)
    exclusive = []
    for segment in reversed(segments):
        mask = segment.mask.astype(bool) & ~taken
        taken |= mask
        exclusive.append(Segment(name=segment.name, mask=mask.astype(np.uint8), color=segment.color))
    return exclusive[::-1]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment a structure from text, points and/or a box (SegVol zoom-out-zoom-in)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volume", help="CT/MRI volume (NIfTI, NRRD, MHA, .mgz, or a DICOM folder)")
    add_shared_options(parser, coordinates="RAS mm, or i j k with --ijk")
    parser.add_argument("--ijk", action="store_true",
                        help="points and box are voxel indices (i, j, k in ITK order), not RAS mm")
    parser.add_argument("--preprocessing", choices=PROFILES, default="canonical",
                        help="canonical (default): reorient to RAS+ first, so storage order does not matter; "
                             "official: exactly SegVol's (voxel order as stored)")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .seg.nrrd (Slicer), .nii.gz (labelmap + .json names), .dcm (DICOM SEG)")
    parser.add_argument("--format", choices=FORMATS, help="output type when the extension does not say it")
    parser.add_argument("--labelmap", help="also write the segments as one NIfTI labelmap (.nii.gz + .json names)")
    parser.add_argument("--figure", help="also write a PNG overview (axial, coronal, sagittal slices)")
    parser.add_argument("--slice", type=int, metavar="K",
                        help="MedSegX slice mode: segment slice K (k index) with the box's outline on it (default: "
                             "the slice the box is drawn on)")
    parser.add_argument("--zoom-in", choices=ZOOM_INS,
                        help="what refines SegVol's zoom-out (text or clicks without a box): segvol (default, its own "
                             "sliding windows, as published) or litemedsam (LiteMedSAM slice by slice inside the "
                             "zoom-out's largest blob: a box per slice)")
    parser.add_argument("--min-confidence", type=float, metavar="C",
                        help="leave out a structure whose presence confidence (the model's mean probability inside "
                             f"its zoom-out mask, 0-1) is below C; below {PRESENCE_WARNING_BELOW} it is always "
                             "reported as maybe not in the volume")
    parser.set_defaults(func=run)
