"""``medsegx convert LABELMAP --reference VOLUME [--names ...] -o OUT``: a labelmap to named segments.

The labelmap must lie on the reference's grid (no silent resampling). Names come from ``--names`` (a JSON map,
TotalSegmentator's class map with ``--names-key``, our NIfTI sidecar, a Slicer colour table, or an inline list),
else from the sidecar beside the labelmap (``labels.nii.gz`` -> ``labels.json``), else ``label N``. The output
type follows ``-o``'s extension (.seg.nrrd, .nii.gz + .json, .dcm DICOM SEG) or ``--format``. An existing output is
kept unless ``--overwrite``; the file appears only when complete.
"""
from __future__ import annotations

import sys

from ..data.readers import read_labelmap, read_volume
from ..data.segments import read_label_names, segments_from_labelmap
from ..data.validation import check_image, check_outputs
from ..data.writers import FORMATS, dicom_seg_sources, output_format, sidecar_path, write_segmentation
from ..errors import InputError


def _names(args):
    if args.names:
        return read_label_names(args.names, args.names_key)
    sidecar = sidecar_path(args.labelmap)
    if sidecar.is_file():
        print(f"medsegx: label names from {sidecar}", file=sys.stderr)
        return read_label_names(str(sidecar), args.names_key)
    print("medsegx: no --names and no sidecar: segments are named 'label N'", file=sys.stderr)
    return {}, {}


def run(args) -> int:
    # refuse a bad output before any reading: it should cost nothing
    kind = args.format or output_format(args.output)
    check_outputs([(args.output, kind)], args.overwrite)
    reference = check_image(read_volume(args.reference, series_uid=args.series_uid))
    labels = read_labelmap(args.labelmap, reference)
    if kind == "dicom-seg":
        dicom_seg_sources(reference, args.source_dicom, headers_only=True)
    names, colors = _names(args)
    segments = segments_from_labelmap(labels.array, names, include_absent=args.keep_empty, colors=colors)
    if not segments:
        raise InputError(f"{args.labelmap}: the labelmap is empty (all voxels 0); nothing to convert")
    out = write_segmentation(args.output, reference, segments, overwrite=args.overwrite,
                             source_dicom=args.source_dicom, format=args.format)
    unnamed = [s.name for s in segments if s.label not in names]
    print(f"wrote {out}: {len(segments)} segments on the {' x '.join(map(str, reference.shape_ijk))} grid of "
          f"{args.reference}" + (f" ({len(unnamed)} without a name: {', '.join(unnamed[:5])})" if unnamed and names
                                 else ""))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="turn a labelmap into named segments (.seg.nrrd, NIfTI + names, DICOM SEG)",
        description=__doc__.split("\n\n", 1)[1])
    parser.add_argument("labelmap", help="integer labelmap on the reference's grid (any readable format)")
    parser.add_argument("--reference", required=True, help="the image the labelmap belongs to (file or DICOM folder)")
    parser.add_argument("--names", help="label names: a file (.json map/list, sidecar, .txt/.ctbl colour table) or "
                                        "'liver,spleen' (labels 1..N) or '1=liver,5=spleen'")
    parser.add_argument("--names-key", help="which map in a names file holding several (e.g. 'total')")
    parser.add_argument("-o", "--output", required=True,
                        help="output file: .seg.nrrd (Slicer), .nii.gz (labelmap + .json sidecar), .dcm (DICOM SEG)")
    parser.add_argument("--format", choices=FORMATS, help="output type when the extension does not say it")
    parser.add_argument("--source-dicom", help="DICOM series folder a DICOM SEG references (default: --reference)")
    parser.add_argument("--series-uid", help="which DICOM series of --reference, when its folder holds several")
    parser.add_argument("--keep-empty", action="store_true",
                        help="also write named labels absent from the labelmap (as empty segments)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(func=run)
