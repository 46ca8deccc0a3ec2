"""``medsegx segment`` with LiteMedSAM: each prompt set's box segmented slice by slice over the volume.

A text without a box: the text localiser gives each slice of the structure its box (a structure it does not find
is written as an empty segment, said on stderr, exit 0).

A 3D box: every slice it spans, propagated from its middle slice. A box on one slice with ``--propagate``: on until
the mask vanishes. Clicks with the box refine the slices they lie on; a text names the segment and, with an expert
pack (``--experts``, fine-tuned by ``medsegx finetune --base litemedsam``), routes its experts by the structure
(without a text: by the modality alone). A pack applies to volumes of its own modality only.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

from ..data.segments import Segment
from ..errors import InputError, PromptError
from ..progress import scaled
from ..prompts import Prompts


def check_options(args: argparse.Namespace, title: str, prompt_sets: List[Prompts] = ()) -> None:
    """Options LiteMedSAM cannot honour are refused before any work."""
    boxed = any(p.box is not None for p in prompt_sets) or not prompt_sets
    refused = [(args.min_confidence is not None and boxed,
                "--min-confidence: LiteMedSAM reports no presence confidence for a box (the text localiser does "
                "for a text alone)"),
               (args.preprocessing != "canonical", "--preprocessing official is SegVol's; LiteMedSAM always reads "
                                                   "axial slices in the radiological view"),
               (args.tokenizer is not None, "--tokenizer: LiteMedSAM has no text encoder (a text names the "
                                            "segment and routes its experts)")]
    for given, message in refused:
        if given:
            raise InputError(f"{message} ({title} runs this box); drop the option, or give --weights for SegVol")


def check_prompts(prompt_sets: List[Prompts], title: str) -> None:
    """A box in every prompt set, or a text the text localiser finds (it gives the boxes)."""
    from ..weights.localiser import unknown_texts

    boxless = [prompts for prompts in prompt_sets if prompts.box is None]
    unknown = set(unknown_texts([p.text for p in boxless if p.text]))
    for prompts in boxless:
        if not prompts.text or prompts.text in unknown:
            raise PromptError(f"{title} segments from a box (it was trained with boxes only): add --box around the "
                              f"structure, name one the text localiser finds, or give --weights for a model that "
                              f"takes text or clicks alone")


def segment_boxes(args: argparse.Namespace, choice, volume, prompt_sets: List[Prompts], update
                  ) -> Tuple[List[Segment], List[str], str, List[str]]:
    """Each prompt set -> one segment; (segments, notes, runtime, structures left out by --min-confidence)."""
    update(0.0, f"loading {choice.kind.title}")
    model = choice.kind.load(choice.path)
    if args.experts:    # fine-tuned on this base (medsegx finetune --base litemedsam); refused on another base
        from ..weights.expert_pack import apply_expert_pack

        update(0.01, "loading the expert pack")
        apply_expert_pack(model, args.experts)
    predictor = choice.kind.predictor(model, device=args.device, precision=args.precision, slice_step=args.slice_step)
    predictor.set_volume(volume, modality=args.modality, progress=scaled(update, 0.02, 0.05))
    segments, notes, dropped = [], [], []
    share = 0.95 / len(prompt_sets)
    runtime = ""
    for index, prompts in enumerate(prompt_sets):
        result = predictor.segment(prompts, propagate=args.propagate,
                                   progress=scaled(update, 0.05 + index * share, 0.05 + (index + 1) * share))
        name = args.name or result.name or "segment"
        runtime = result.runtime
        if args.min_confidence is not None and result.confidence < args.min_confidence:
            dropped.append(f"{name!r} (confidence {result.confidence:.2f})")
            continue
        segments.append(Segment(name=name, mask=result.mask))
        notes.append(f"{name!r} {result.describe()}, {predictor.window.description}")
        for note in result.notes:
            print(f"medsegx: note: {note}", file=sys.stderr)
        if result.found is False:
            print(f"medsegx: {name!r} was not found in {args.volume}: its segment is written empty",
                  file=sys.stderr)
    return segments, notes, runtime, dropped
