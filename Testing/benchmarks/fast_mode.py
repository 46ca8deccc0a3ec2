"""Benchmark (not a test): what LiteMedSAM's fast mode (``VolumeSlicePredictor(slice_step=n)``: decode every n-th
slice of a propagation, interpolate the slices between by signed distance) costs in Dice and saves in slices.

For each case of ``eval_box.py`` (every shared CT patient's liver, spleen and kidneys, CHAOS 10 13 15 19 20; the
chest CT crop's vessels are left out: no box propagation follows them) one predictor holds the slice embeddings,
and for each slice step it runs the 3D box (the label's tight box) and the propagated slice box (the label's box on
its widest slice, ``propagate=True``). Per prompt it records the Dice against the label, the Dice against the same
prompt at step 1 (what the fast mode changes), the slices segmented and the slices decoded: a fresh volume encodes
exactly the slices it decodes, so the ratio of decoded slices is the fast mode's saving in encoder runs, which are
about 90 % of a first prompt's time on a CPU. The filled box (the 3D box filled in) is printed beside them.

    OMP_NUM_THREADS=2 python Testing/benchmarks/fast_mode.py [--steps 1 2 3 4] [--cases chaos totalseg ...]
        [--json rows.json] [--threads 2]

Step 1 is the default predictor, so its columns are also the current figures of ``eval_box.py``'s two prompts.
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
from eval_box import (add_case_options, case_structures, filled_box, read_case,  # noqa: E402
                      selected_cases, tight_box_ijk, widest_slice_box)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4], help="slice steps; 1 comes first")
    add_case_options(parser)
    args = parser.parse_args(argv)

    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    steps = [1] + [s for s in args.steps if s != 1]
    model = load_litemedsam()
    rows: List[Dict] = []
    for case in selected_cases(args.data, args.cases):
        if case.key.startswith("chest_ct_aorta"):
            continue
        volume, labels = read_case(args.data, case)
        predictor = VolumeSlicePredictor(model, cache_megabytes=2400)
        predictor.set_volume(volume, modality=case.modality)
        axis = predictor.orientation.source_axis[2]
        for organ, value in case_structures(args.data, case):
            truth = labels == value
            if not truth.any():
                continue
            lo, hi = tight_box_ijk(truth)
            _, flat_lo, flat_hi = widest_slice_box(truth, axis)
            prompts = {"box3d": (Prompts(box=BoxPrompt(lo, hi, space="ijk")), False),
                       "slice": (Prompts(box=BoxPrompt(flat_lo, flat_hi, space="ijk")), True)}
            reference = {}
            for step in steps:
                predictor.slice_step = step
                row = dict(case=case.key, modality=case.modality, organ=organ, step=step,
                           filled=dice(filled_box(truth), truth))
                for name, (prompt, propagate) in prompts.items():
                    result = predictor.segment(prompt, propagate=propagate)
                    reference.setdefault(name, result.mask)
                    row[name] = dice(result.mask, truth)
                    row[f"{name}_vs_step1"] = dice(result.mask, reference[name])
                    row[f"{name}_slices"] = len(result.slices)
                    row[f"{name}_decoded"] = len(predictor._last_propagation[2])
                rows.append(row)
                print(f"[{time.perf_counter() - started:6.0f} s] {case.key} {organ} step {step}: 3D "
                      f"{row['box3d']:.3f} ({row['box3d_decoded']}/{row['box3d_slices']} slices decoded), slice "
                      f"{row['slice']:.3f} ({row['slice_decoded']}/{row['slice_slices']}), filled {row['filled']:.3f}",
                      file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        del predictor
    print(table(rows, steps))
    return 0


def table(rows: List[Dict], steps: List[int]) -> str:
    out = ["| modality | organ | n | step | 3D box | vs step 1 | decoded / segmented | slice box | vs step 1 "
           "| decoded / segmented | filled box |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["modality"], r["organ"]) for r in rows}) + [(m, "all") for m in
                                                                     sorted({r["modality"] for r in rows})]
    for modality, organ in groups:
        for step in steps:
            group = [r for r in rows if r["modality"] == modality and r["step"] == step
                     and organ in ("all", r["organ"])]
            if not group:
                continue
            cells = []
            for name in ("box3d", "slice"):
                decoded = sum(r[f"{name}_decoded"] for r in group)
                segmented = sum(r[f"{name}_slices"] for r in group)
                cells += [f"{np.mean([r[name] for r in group]):.3f}",
                          f"{np.mean([r[f'{name}_vs_step1'] for r in group]):.3f}",
                          f"{decoded}/{segmented} ({decoded / max(segmented, 1):.0%})"]
            out.append(f"| {modality} | {organ} | {len(group)} | {step} | " + " | ".join(cells)
                       + f" | {np.mean([r['filled'] for r in group]):.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
