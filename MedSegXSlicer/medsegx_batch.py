"""Batch segmentation through the MedSegX Slicer Logic: load a volume, segment, save a .seg.nrrd, exit.

Inside Slicer (no window)::

    Slicer --no-main-window --python-script MedSegXSlicer/medsegx_batch.py \\
        --input ct.nii.gz --text liver --output liver.seg.nrrd [--weights DIR] [--device cpu]

On plain Python with the PyPI package slicer-core (same MRML code, no Slicer application)::

    python MedSegXSlicer/medsegx_batch.py --input ct.nii.gz --point 12.5 -30 40 --box 0 -60 20 40 0 70 \\
        --output out.seg.nrrd

Points and boxes are RAS millimetres (what Slicer shows). Exit codes: 0 written, 1 user error (bad input, prompt,
weights; one line on stderr), 2 internal error (traceback), 130 cancelled (Ctrl+C). The output is written to a
temporary name in the destination folder and renamed; an existing output is kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # MedSegXSlicerLib beside this script

EXIT_OK, EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_CANCELLED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsegx_batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="volume file Slicer can load (.nii.gz, .nrrd, .mha, ...)")
    parser.add_argument("--output", required=True, help="segmentation to write (.seg.nrrd)")
    parser.add_argument("--text", help="structure name, e.g. liver, 'left kidney'")
    parser.add_argument("--point", nargs=3, type=float, action="append", default=[], metavar=("R", "A", "S"),
                        help="positive click in RAS mm (repeatable)")
    parser.add_argument("--negative-point", nargs=3, type=float, action="append", default=[],
                        metavar=("R", "A", "S"), help="negative click in RAS mm (repeatable)")
    parser.add_argument("--box", nargs=6, type=float, metavar=("R1", "A1", "S1", "R2", "A2", "S2"),
                        help="two opposite corners of a RAS-aligned box in mm")
    parser.add_argument("--weights", help="weights folder or checkpoint (default: $MEDSEGX_WEIGHTS or "
                                          "~/.medsegx/weights/segvol)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--name", help="segment name (default: the structure name)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def _points_node(scene, name, points, label):
    from MedSegXSlicerLib import mrml_conversion

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    mrml_conversion.mark_points_node(node, label)
    for n, ras in enumerate(points):
        node.AddControlPoint(list(ras), f"{label[0]}{n + 1}")
    return node


def _box_node(scene, corners):
    import numpy as np

    a, b = np.asarray(corners[:3]), np.asarray(corners[3:])
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    node.SetCenter(*((a + b) / 2.0))
    node.SetSize(*np.abs(b - a))
    return node


def _check_output(output: Path, overwrite: bool) -> None:
    """Refuse a bad output before any work (an existing file is the user's earlier result)."""
    from medsegx_core.errors import OutputError

    if not output.name.endswith(".seg.nrrd"):
        raise OutputError(f"output {output} must end with .seg.nrrd (a Slicer segmentation file)")
    if output.exists() and not overwrite:
        raise OutputError(f"output {output} already exists: choose another --output or pass --overwrite")
    if not output.parent.is_dir():
        raise OutputError(f"output folder {output.parent} does not exist: create it first")


def _save_atomically(segmentation_node, output: Path) -> None:
    """Write under a temporary name in the destination folder, then rename over the target."""
    import slicer

    from medsegx_core.errors import OutputError

    handle, temp_name = tempfile.mkstemp(prefix=f".{output.name[:-9]}.", suffix=".seg.nrrd", dir=output.parent)
    os.close(handle)
    try:
        if not slicer.util.saveNode(segmentation_node, temp_name):
            raise OutputError(f"Slicer could not write {output}: check the folder is writable and has space")
        os.replace(temp_name, output)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def run(args: argparse.Namespace) -> str:
    """Load, segment, save; returns the segment name. Raises MedSegXError for user errors."""
    import slicer

    from MedSegXSlicerLib import MedSegXSlicerLogic, standalone
    from medsegx_core.errors import InputError
    from medsegx_core.progress import CancelToken

    output = Path(args.output).expanduser()
    _check_output(output, args.overwrite)
    standalone.ensure_application()
    scene = slicer.mrmlScene
    source = Path(args.input).expanduser()
    if not source.exists():
        raise InputError(f"input {source}: no such file")
    try:
        volume_node = slicer.util.loadVolume(str(source))
    except RuntimeError as exc:  # slicer.util raises RuntimeError when the reader fails
        raise InputError(f"input {source}: Slicer could not load it as a volume ({exc})") from exc
    positive = _points_node(scene, "positive points", args.point, "positive") if args.point else None
    negative = _points_node(scene, "negative points", args.negative_point, "negative") if args.negative_point \
        else None
    roi = _box_node(scene, args.box) if args.box else None
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} MedSegX")
    segmentation_node.CreateDefaultDisplayNodes()

    logic = MedSegXSlicerLogic(weightsPath=args.weights, device=args.device)
    cancel = CancelToken()
    try:
        segment_id = logic.segment(volume_node, segmentation_node, text=args.text, pointsNode=positive,
                                   negativePointsNode=negative, roiNode=roi, segmentName=args.name,
                                   progress=_print_progress, cancel=cancel)
    except KeyboardInterrupt:
        # Stop the engine at its next check and let the worker thread end before the interpreter does
        # (torch aborts the process if a thread is still inside it at exit).
        cancel.cancel()
        logic.cleanup(timeout_s=120.0)
        raise
    logic.cleanup()
    _save_atomically(segmentation_node, output)
    return segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()


def _print_progress(fraction: float, message: str) -> None:
    print(f"[{fraction * 100:5.1f}%] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from medsegx_core.errors import Cancelled, MedSegXError

    args = build_parser().parse_args(argv)
    try:
        name = run(args)
    except Cancelled as exc:
        print(f"medsegx_batch: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt:
        print("medsegx_batch: interrupted; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    except MedSegXError as exc:
        print(f"medsegx_batch: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:  # noqa: BLE001 - a bug: keep the traceback, distinct exit code
        traceback.print_exc()
        return EXIT_INTERNAL_ERROR
    print(f"medsegx_batch: wrote segment {name!r} to {args.output}", file=sys.stderr)
    return EXIT_OK


def _exit(code: int) -> None:
    """Slicer keeps running after a --python-script unless told to exit; plain Python just exits."""
    from MedSegXSlicerLib.standalone import is_slicer_application

    if is_slicer_application():
        import slicer
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    try:
        exit_code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2 -> a user error here)
        exit_code = EXIT_OK if exc.code in (0, None) else EXIT_USER_ERROR
    _exit(exit_code)
