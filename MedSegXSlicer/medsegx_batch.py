"""Batch segmentation through the MedSegX Slicer Logic: read a volume, segment, save a .seg.nrrd, exit.

Inside Slicer (no window)::

    Slicer --no-main-window --python-script MedSegXSlicer/medsegx_batch.py \\
        --input ct.nii.gz --text "liver, spleen, left kidney" --output organs.seg.nrrd [--weights DIR] [--device cpu]

On plain Python with the PyPI package slicer-core (same MRML code, no Slicer application)::

    python MedSegXSlicer/medsegx_batch.py --input dicom_folder/ --point 12.5 -30 40 --box 0 -60 20 40 0 70 \\
        --output out.seg.nrrd

The volume is read by the engine's readers, exactly as ``medsegx segment`` reads it (NIfTI, NRRD, MetaImage,
FreeSurfer, a DICOM folder or one file of the series) and refused by the same rules (truncated files, NaN voxels,
2D or blank images, ...); it then becomes a volume node and goes through the Logic as in Slicer. Several
structures (``--text`` repeated, or a comma list) become one named segment each, from one encoding of the
volume. Points and boxes are RAS millimetres (what Slicer shows); a box runs LiteMedSAM slice by slice unless
``--weights`` (or ``$MEDSEGX_WEIGHTS``) or a SegVol pack in ``--experts`` say otherwise, as in the module (a
LiteMedSAM pack goes with the box). Progress lines go to
stdout. Exit codes: 0 written, 1 user error (bad input, prompt, weights, output; one line on stderr naming the file), 2 internal error
(traceback), 130 cancelled (Ctrl+C; nothing is written). The output is checked before any work, written to a
temporary name in the destination folder and renamed; an existing output is kept unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # MedSegXSlicerLib beside this script

# 0 written, 1 user error and 130 cancelled are medsegx's own codes (medsegx_core.cli); 2 is for a bug here
EXIT_OK, EXIT_USER_ERROR, EXIT_INTERNAL_ERROR = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from medsegx_core.cli._segment_options import add_shared_options

    parser = argparse.ArgumentParser(prog="medsegx_batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True,
                        help="volume: NIfTI, NRRD, MetaImage, .mgz, a DICOM folder or one file of the series")
    parser.add_argument("--output", required=True, help="segmentation to write (.seg.nrrd)")
    add_shared_options(parser)   # the prompts, weights and run options of 'medsegx segment', declared once
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


def engine_factories(args):
    """The Logic's model loader and Predictor factory with this run's tokenizer, expert pack and precision."""
    def load(spec):
        from medsegx_core.weights.expert_pack import apply_expert_pack, pack_choice_for
        from medsegx_core.weights.store import load_model

        weights = spec[0] if isinstance(spec, tuple) else spec
        model = load_model(weights, tokenizer=args.tokenizer)
        # SegVol's part of --experts (a LiteMedSAM pack goes with the boxes: box_engine_factories); refused
        # (WeightsError) when fine-tuned on other SegVol weights
        apply_expert_pack(model, pack_choice_for(args.experts, "SegVol"))
        return model

    def make_predictor(model, device):
        from medsegx_core.predictor import Predictor

        return Predictor(model, device=device, precision=args.precision)

    return load, make_predictor


def litemedsam_pack(args) -> bool:
    """``--experts`` names a pack fine-tuned on LiteMedSAM (it then rides on the boxes' LiteMedSAM)."""
    from MedSegXSlicerLib import box_mode
    from medsegx_core.weights.expert_pack import chosen_pack_base_model

    return chosen_pack_base_model(args.experts) == box_mode.MODEL_NAME


def box_engine_factories(args):
    """LiteMedSAM's loader and predictor factory for boxes, with this run's precision and LiteMedSAM pack."""
    from MedSegXSlicerLib import box_mode

    def load(spec):
        from medsegx_core.weights.expert_pack import pack_choice_for

        weights = spec[0] if isinstance(spec, tuple) else spec
        return box_mode.load_model((weights, pack_choice_for(args.experts, box_mode.MODEL_NAME)))

    def make_predictor(model, device):
        from medsegx_core import registry

        return registry.kind_named(registry.LITEMEDSAM).predictor(model, device=device, precision=args.precision)

    return load, make_predictor


def _save_atomically(segmentation_node, output: Path, overwrite: bool) -> None:
    """Write under a temporary name in the destination folder, then rename over the target."""
    import slicer

    from medsegx_core.data.atomic import atomic_output
    from medsegx_core.errors import OutputError

    with atomic_output(output, overwrite) as temp:
        if not slicer.util.saveNode(segmentation_node, str(temp)):
            raise OutputError(f"{output}: Slicer could not write the segmentation; check that the folder is "
                              f"writable and has space")


def run(args: argparse.Namespace) -> list:
    """Read, segment, save; returns the segment names. Raises MedSegXError for user errors."""
    import slicer

    from MedSegXSlicerLib import MedSegXSlicerLogic, standalone
    from MedSegXSlicerLib.session import SessionStore
    from medsegx_core.cli._segment_options import check_shared_options, prompt_sets_from_options
    from medsegx_core.data.readers import read_volume
    from medsegx_core.data.validation import check_image, check_outputs
    from medsegx_core.progress import CancelToken

    # Everything that can be refused is refused before the weights are read, as 'medsegx segment' does.
    output = check_outputs([args.output], args.overwrite, formats=("seg.nrrd",))[0]
    check_shared_options(args)
    prompt_sets = prompt_sets_from_options(args)   # the engine's prompt rules, as 'medsegx segment' applies them
    volume = check_image(read_volume(Path(args.input).expanduser(), series_uid=args.series_uid))
    for prompts in prompt_sets:
        prompts.to_voxel(volume)  # the engine's prompt rules, on the prompts as given (RAS mm)

    standalone.ensure_application()
    scene = slicer.mrmlScene
    name = Path(volume.source).name.split(".")[0] or "volume"
    volume_node = slicer.util.addVolumeFromArray(volume.array, ijkToRAS=volume.ijk_to_ras, name=name)
    if volume.modality:   # the file's modality, where Slicer's DICOM reader records it (not a user's choice)
        volume_node.SetAttribute("DICOM.Modality", volume.modality)
    positive = _points_node(scene, "positive points", args.point, "positive") if args.point else None
    negative = _points_node(scene, "negative points", args.negative_point, "negative") if args.negative_point \
        else None
    roi = _box_node(scene, args.box) if args.box else None
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} MedSegX")
    segmentation_node.CreateDefaultDisplayNodes()

    logic = MedSegXSlicerLogic(weightsPath=args.weights, device=args.device)
    logic.sessions = SessionStore(*engine_factories(args))
    logic.boxSessions = SessionStore(*box_engine_factories(args))
    # a SegVol pack (or "none") sends the box to SegVol too; a LiteMedSAM pack rides on the boxes' LiteMedSAM
    logic.useLiteMedSAMForBoxes = not args.experts or litemedsam_pack(args)
    logic.sliceStep = args.slice_step                # LiteMedSAM's fast mode (--slice-step), checked as the CLI does
    cancel = CancelToken()
    try:
        for prompts in prompt_sets:  # one engine session: the volume is encoded once for all structures
            logic.segment(volume_node, segmentation_node, text=prompts.text, pointsNode=positive,
                          negativePointsNode=negative, roiNode=roi, segmentName=args.name,
                          modality=args.modality, progress=_print_progress, cancel=cancel,
                          propagate=args.propagate)
    except KeyboardInterrupt:
        cancel.cancel()  # the engine stops at its next check
        raise
    finally:
        # Let the worker thread end before the interpreter does (torch aborts the process if a thread is still
        # inside it at exit), after an error or an interruption too.
        logic.cleanup(timeout_s=120.0)
    _save_atomically(segmentation_node, output, args.overwrite)
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def _print_progress(fraction: float, message: str) -> None:
    """Progress goes to stdout: stderr carries only the outcome (one line) and warnings."""
    print(f"[{fraction * 100:5.1f}%] {message}", flush=True)


def main(argv=None) -> int:
    from medsegx_core.cli import exit_code_of

    args = build_parser().parse_args(argv)

    def segment_and_report() -> int:
        names = run(args)
        listing = ", ".join(repr(n) for n in names)
        print(f"medsegx_batch: wrote segment{'s' if len(names) > 1 else ''} {listing} to {args.output}",
              file=sys.stderr)
        return EXIT_OK

    # the same outcomes and wording as 'medsegx segment', plus a distinct code for a bug
    return exit_code_of("medsegx_batch", segment_and_report, internal_error=EXIT_INTERNAL_ERROR)


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
