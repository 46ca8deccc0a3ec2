"""Benchmark (not a test): the LiteMedSAM masks with the encoder runtime in bf16 (``precision="bf16"``: OpenVINO on a
CPU with AMX or AVX512_BF16, ``encoder_backends.runtime_precision``) against float32 (``precision="fp32"``, what
"auto" gives on the CPU), whole prompts on real volumes, in one run.

For every case of ``eval_box`` (or ``--cases``) and each labelled structure, two ``VolumeSlicePredictor``s on the
same volume (one per precision, each with its own embedding cache) segment

* the 3D box (the label's tight box) and the slice box (its widest slice's 2D box, propagated), as ``eval_box``;
* with ``--text``, the structure's name as a text prompt (liver, spleen, kidneys: ``eval_text``'s names), which
  also puts the bundled text localiser on bf16 embeddings;

and it prints, per prompt, the Dice between the two masks (the issue's bar: >= 0.99 against the fp32 reference on
every case), each mask's Dice against the label, and each precision's seconds (the fp32 predictor runs first on each
case, the bf16 one right after: the same load). The summary gives the smallest mask agreement per prompt type and
the seconds summed per precision. Its first lines name each predictor's encoder: without OpenVINO or without
native bf16 the bf16 predictor runs torch's bf16 autocast instead (what ``--precision bf16`` does there). Usage
(about 20 minutes on 2 threads with ``.[fast]`` installed)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/compare_encoder_precision.py [--cases chaos_10 ...] [--text]
        [--threads 2] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import (add_case_options, case_structures, read_case, selected_cases, started_benchmark,  # noqa: E402
                      tight_box_ijk, widest_slice_box)
from eval_text import ORGAN_TEXT  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def prompts_for(truth: np.ndarray, organ: str, slice_axis: int, text: bool):
    """(name, prompts, propagate) of each prompt a structure is asked with."""
    from medsegx_core.prompts import BoxPrompt, Prompts

    lo, hi = tight_box_ijk(truth)
    _, flat_lo, flat_hi = widest_slice_box(truth, slice_axis)
    asked = [("3D box", Prompts(box=BoxPrompt(lo, hi, space="ijk")), False),
             ("slice box", Prompts(box=BoxPrompt(flat_lo, flat_hi, space="ijk")), True)]
    if text and organ in ORGAN_TEXT:
        asked.append(("text", Prompts(text=ORGAN_TEXT[organ]), False))
    return asked


def run_case(model, data: Path, case, text: bool, log) -> List[Dict]:
    from medsegx_core.data.metrics import dice
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    volume, labels = read_case(data, case)
    predictors = {}
    for precision in PRECISIONS:
        predictor = VolumeSlicePredictor(model, precision=precision)
        predictor.set_volume(volume, modality=case.modality)
        predictors[precision] = predictor
    slice_axis = predictors["fp32"].orientation.source_axis[2]
    rows = []
    for organ, value in case_structures(data, case):
        truth = labels == value
        if not truth.any():
            continue
        for name, prompts, propagate in prompts_for(truth, organ, slice_axis, text):
            masks, seconds = {}, {}
            for precision, predictor in predictors.items():
                started = time.perf_counter()
                masks[precision] = predictor.segment(prompts, propagate=propagate).mask
                seconds[precision] = time.perf_counter() - started
            row = dict(case=case.key, organ=organ, prompt=name, agreement=dice(masks["bf16"], masks["fp32"]),
                       dice_fp32=dice(masks["fp32"], truth), dice_bf16=dice(masks["bf16"], truth),
                       seconds_fp32=seconds["fp32"], seconds_bf16=seconds["bf16"])
            rows.append(row)
            log(f"  {organ} {name}: masks agree {row['agreement']:.4f}; label {row['dice_fp32']:.3f} (fp32) "
                f"{row['dice_bf16']:.3f} (bf16); {row['seconds_fp32']:.1f} s / {row['seconds_bf16']:.1f} s")
    return rows


def summary(rows: List[Dict]) -> str:
    lines = ["| prompt | n | smallest agreement | mean agreement | label Dice fp32 | label Dice bf16 | s fp32 | s bf16 "
             "| fp32 / bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        group = [r for r in rows if r["prompt"] == prompt]
        worst = min(group, key=lambda r: r["agreement"])
        fp32, bf16 = sum(r["seconds_fp32"] for r in group), sum(r["seconds_bf16"] for r in group)
        lines.append(f"| {prompt} | {len(group)} | {worst['agreement']:.4f} ({worst['case']} {worst['organ']}) "
                     f"| {np.mean([r['agreement'] for r in group]):.4f} "
                     f"| {np.mean([r['dice_fp32'] for r in group]):.3f} "
                     f"| {np.mean([r['dice_bf16'] for r in group]):.3f} "
                     f"| {fp32:.0f} | {bf16:.0f} | {fp32 / max(bf16, 1e-9):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_options(parser)
    parser.add_argument("--text", action="store_true", help="also text prompts (liver, spleen, kidneys)")
    args = parser.parse_args(argv)
    log = started_benchmark(args)

    import torch

    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    model = load_litemedsam()
    for precision in PRECISIONS:
        log(f"precision {precision}: {VolumeSlicePredictor(model, precision=precision).describe_encoder()}")
    rows: List[Dict] = []
    with torch.inference_mode():
        for case in selected_cases(args.data, args.cases):
            log(f"{case.key}")
            rows.extend(run_case(model, args.data, case, args.text, log))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
