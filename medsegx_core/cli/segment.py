"""``medsegx segment VOLUME [--text NAME] [--point R A S ...] [--box ...] --weights W -o OUT``.

Segments one structure with SegVol's zoom-out-zoom-in and writes it as a named segment on the volume's grid
(.seg.nrrd for Slicer, .nii.gz labelmap + .json names, or .dcm DICOM SEG, from the output's extension).
Points and boxes are RAS millimetres (what Slicer shows), or voxel indices (i, j, k in ITK order) with
``--ijk``. Text, points and a box may be combined. ``--weights`` takes a published SegVol checkpoint file or
folder (tokenizer files beside it, or ``--tokenizer``) or a folder made by ``medsegx weights import``.
An existing output is kept unless ``--overwrite``; the file appears only when complete.
"""
from __future__ import annotations

import argparse
import sys

from ..data.atomic import check_writable
from ..data.hierarchy import resolve_term
from ..data.readers import read_volume
from ..data.segments import Segment
from ..data.writers import FORMATS, output_format, write_segmentation
from ..inference.device import DEVICES, PRECISIONS
from ..inference.preprocessing import PROFILES
from ..progress import scaled
from ..prompts import BoxPrompt, PointPrompt, Prompts
from .weights import _progress_bar


def _prompts(args) -> Prompts:
    space = "ijk" if args.ijk else "ras"
    points = [PointPrompt(tuple(p), positive=True, space=space) for p in args.point or []]
    points += [PointPrompt(tuple(p), positive=False, space=space) for p in args.negative_point or []]
    box = None if args.box is None else BoxPrompt(tuple(args.box[:3]), tuple(args.box[3:]), space=space)
    return Prompts(text=args.text, points=tuple(points), box=box)


def run(args: argparse.Namespace) -> int:
    from ..predictor import Predictor
    from ..weights.store import load_model

    # Everything that can be refused cheaply is refused before the volume and the weights are read.
    check_writable(args.output, args.overwrite)
    if args.format is None:
        output_format(args.output)
    prompts = _prompts(args)
    if prompts.text:
        resolve_term(prompts.text)
    volume = read_volume(args.volume, series_uid=args.series_uid)
    prompts.to_voxel(volume)

    bar, update = _progress_bar("segment")
    try:
        update(0.0, "loading the weights")
        model = load_model(args.weights, tokenizer=args.tokenizer)
        predictor = Predictor(model, device=args.device, precision=args.precision,
                              preprocessing=args.preprocessing)
        predictor.set_volume(volume, modality=args.modality, progress=scaled(update, 0.05, 0.3))
        result = predictor.segment(prompts, progress=scaled(update, 0.3, 1.0))
    finally:
        bar.close()
    name = args.name or result.name or "segment"
    voxels = int(result.mask.sum())
    if voxels == 0:
        print(f"medsegx: warning: the segmentation of {name!r} is empty", file=sys.stderr)
    out = write_segmentation(args.output, volume, [Segment(name=name, mask=result.mask)],
                             overwrite=args.overwrite, format=args.format)
    millilitres = voxels * float(volume.spacing[0] * volume.spacing[1] * volume.spacing[2]) / 1000.0
    print(f"wrote {out}: {name!r}, {voxels} voxels ({millilitres:.1f} mL), {result.windows} zoom-in windows, "
          f"{result.runtime}")
    return 0


def _triples(value_count: int):
    return dict(nargs=value_count, type=float)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="segment a structure from text, points and/or a box (SegVol zoom-out-zoom-in)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("volume", help="CT/MRI volume (NIfTI, NRRD, MHA, .mgz, or a DICOM folder)")
    parser.add_argument("--text", help="structure name, e.g. 'liver' (see 'medsegx categories')")
    parser.add_argument("--point", action="append", metavar=("R", "A", "S"), **_triples(3),
                        help="a positive click (repeatable); RAS mm, or i j k with --ijk")
    parser.add_argument("--negative-point", action="append", metavar=("R", "A", "S"), **_triples(3),
                        help="a negative click (repeatable)")
    parser.add_argument("--box", metavar=("R1", "A1", "S1", "R2", "A2", "S2"), **_triples(6),
                        help="two opposite corners of a box")
    parser.add_argument("--ijk", action="store_true",
                        help="points and box are voxel indices (i, j, k in ITK order), not RAS mm")
    parser.add_argument("--weights", required=True,
                        help="published checkpoint file or folder, or a folder from 'medsegx weights import'")
    parser.add_argument("--tokenizer", help="folder of tokenizer files when they are not beside the weights")
    parser.add_argument("--preprocessing", choices=PROFILES, default="canonical",
                        help="canonical (default): reorient to RAS+ first, so storage order does not matter; "
                             "official: exactly SegVol's (voxel order as stored)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16/fp16 where the hardware is fast at it; fp32 for exact results")
    parser.add_argument("--modality", help="CT, MRI, ... (default: from the file); used by adapter experts")
    parser.add_argument("--name", help="segment name (default: the structure's name)")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .seg.nrrd (Slicer), .nii.gz (labelmap + .json names), .dcm (DICOM SEG)")
    parser.add_argument("--format", choices=FORMATS, help="output type when the extension does not say it")
    parser.add_argument("--series-uid", help="which DICOM series, when the folder holds several")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)
