"""The options ``medsegx segment`` and the Slicer batch script (``MedSegXSlicer/medsegx_batch.py``) share: one
declaration, one set of early checks, one way from the options to the prompt sets, so the two command lines take
the same prompts, weights, expert packs, devices, precisions and modalities with the same words.

Each command adds its own input and output options (``medsegx segment VOLUME -o OUT`` with its output formats;
the batch script ``--input``/``--output`` with a .seg.nrrd) and what only it can do (``--ijk``, ``--slice``,
``--preprocessing``, ``--min-confidence``, ...).
"""
from __future__ import annotations

import argparse
from typing import List

from ..inference.choices import DEVICES, PRECISIONS


def add_shared_options(parser: argparse.ArgumentParser, coordinates: str = "RAS mm") -> None:
    """The prompts (``--text``, ``--point``, ``--negative-point``, ``--box``, ``--propagate``, ``--name``), the
    model (``--weights``, ``--tokenizer``, ``--experts``, ``--device``, ``--precision``, ``--modality``), which
    DICOM series and ``--overwrite``. ``coordinates``: how the command reads points and boxes (for the help)."""
    parser.add_argument("--series-uid", help="which DICOM series, when the folder holds several")
    parser.add_argument("--text", action="append",
                        help="structure name, e.g. 'liver' (see 'medsegx categories'); repeat it or give a comma "
                             "list ('liver, spleen') for several structures (one segment each)")
    parser.add_argument("--point", action="append", nargs=3, type=float, metavar=("R", "A", "S"),
                        help=f"a positive click ({coordinates}; repeatable)")
    parser.add_argument("--negative-point", action="append", nargs=3, type=float, metavar=("R", "A", "S"),
                        help=f"a negative click ({coordinates}; repeatable)")
    parser.add_argument("--box", nargs=6, type=float, metavar=("R1", "A1", "S1", "R2", "A2", "S2"),
                        help=f"two opposite corners of a box ({coordinates}); without --weights LiteMedSAM "
                             f"segments the axial slices it spans")
    parser.add_argument("--propagate", action="store_true",
                        help="with --box and a slice-wise model (LiteMedSAM, MedSegX slice mode): from the box's "
                             "slice (a 3D box's middle one) follow the structure up and down until it ends")
    parser.add_argument("--slice-step", type=int, default=1, metavar="N",
                        help="LiteMedSAM's fast mode for a 3D box or a text: decode every N-th slice (2-8) and "
                             "interpolate the slices between where their masks agree (2: about 60%% of the slices "
                             "encoded, 0.01-0.02 lower Dice; the LiteMedSAM model card); 1 (default): every slice")
    parser.add_argument("--name", help="segment name (default: the structure's name)")
    parser.add_argument("--weights",
                        help="published checkpoint file or folder, or a folder from 'medsegx weights import' "
                             "(default: $MEDSEGX_WEIGHTS; else LiteMedSAM for a box, and for text and clicks "
                             "installed official weights, else the bundled starter model)")
    parser.add_argument("--tokenizer", help="folder of tokenizer files when they are not beside the weights")
    parser.add_argument("--experts", metavar="PACK",
                        help="expert pack to load on top of SegVol-style weights: a .safetensors file from 'medsegx "
                             "finetune', the name of a bundled pack (e.g. abdominal_mr, for the starter model), or "
                             "'none' to leave out the weights' own experts")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when present, else CPU")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16/fp16 where the hardware is fast at it (fp32 where a model is not measured "
                             "in them); fp32 for exact results; bf16 on a CPU with AMX or AVX512_BF16 runs "
                             "LiteMedSAM's encoder in OpenVINO's bf16 (2.5x its fp32, masks that differ)")
    parser.add_argument("--modality", help="CT, MRI, ... (default: from the file, else guessed from the "
                                           "intensities); routes the adapter experts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def check_shared_options(args: argparse.Namespace) -> None:
    """What the shared options alone can refuse, before anything is read: a modality the hierarchy does not know
    (a user's explicit choice is strict: ``data.modality.routing_modality``), ``--propagate`` without a box."""
    from ..data.modality import check_modality_choice
    from ..errors import PromptError
    from ..inference.slice_interpolation import check_slice_step

    check_modality_choice(args.modality)
    check_slice_step(args.slice_step)
    if args.propagate and args.box is None:
        raise PromptError("--propagate follows a box from its slice (a 3D box's middle one): give --box")


def refuse_slice_step(args: argparse.Namespace, title: str) -> None:
    """``--slice-step`` is LiteMedSAM's fast mode; a model that runs the prompt otherwise refuses it."""
    from ..errors import InputError

    if getattr(args, "slice_step", 1) != 1:
        raise InputError(f"--slice-step {args.slice_step}: the fast mode is LiteMedSAM's (a box, or a text the text "
                         f"localiser finds), and {title} runs this prompt: drop the option")


def prompt_sets_from_options(args: argparse.Namespace, space: str = "ras") -> List:
    """One ``Prompts`` per structure: each ``--text`` alone, or one set holding the clicks and the box
    (``prompts.prompt_sets``). The structures are resolved here (the hierarchy's list rule), so an unknown one is
    refused before any reading. ``space``: "ras" (mm) or "ijk" (voxel indices) for the points and the box."""
    from ..data.hierarchy import resolve_structures
    from ..prompts import BoxPrompt, PointPrompt, prompt_sets

    points = [PointPrompt(tuple(p), positive=True, space=space) for p in args.point or []]
    points += [PointPrompt(tuple(p), positive=False, space=space) for p in args.negative_point or []]
    box = None if args.box is None else BoxPrompt(tuple(args.box[:3]), tuple(args.box[3:]), space=space)
    texts = [term.name for term in resolve_structures(args.text)] or [None]
    return prompt_sets(texts, points, box, args.name)
