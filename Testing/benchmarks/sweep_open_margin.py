"""Benchmark (not a test): the margin of LiteMedSAM's open propagation (a box on one slice, ``propagate=True``),
chosen by measurement on every shared case.

For each case of ``eval_box.py`` (every shared CT patient and the chest CT crop's structures, CHAOS MR evaluation
patients 10 13 15 19 20) one ``VolumeSlicePredictor`` holds the slice embeddings, and each structure's box on its
widest slice (``eval_box.widest_slice_box``) is propagated under every configuration: an open margin (model pixels)
and the margin shares the decoder's IoU head chooses among (``margin_shares``). Only the decoder re-runs per
configuration. Prints the mean Dice per (modality, configuration) and per (modality, organ); ``--json`` keeps the
rows. Nothing here is trained: the defaults (``volume_slice_predictor.OPEN_MARGINS``) were chosen on these
patients, and the model card says so.

    OMP_NUM_THREADS=2 python Testing/benchmarks/sweep_open_margin.py [--configs 3:0,0.5,1 6:0,0.5,1] [--cases ...]
        [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import add_case_options, cases_on_predictors, widest_slice_box  # noqa: E402


def parse_config(text: str) -> Tuple[float, Tuple[float, ...]]:
    margin, _, shares = text.partition(":")
    try:
        return float(margin), tuple(float(v) for v in (shares or "1").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MARGIN:SHARES, e.g. 6:0,0.5,1") from None


def label(config: Tuple[float, Tuple[float, ...]]) -> str:
    return f"{config[0]:g}:{','.join(f'{v:g}' for v in config[1])}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=parse_config,
                        default=[parse_config("3:0,0.5,1"), parse_config("6:0,0.5,1")],
                        help="MARGIN:SHARES, the shares a comma list (default: 3 and 6, each with shares 0,0.5,1)")
    add_case_options(parser)
    args = parser.parse_args(argv)
    configs = args.configs

    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = load_litemedsam()
    rows: List[Dict] = []
    cases = cases_on_predictors(args.data, args.cases, model, device="cpu", precision="fp32", cache_megabytes=2400)
    for case, predictor, structures in cases:
        axis = predictor.orientation.source_axis[2]
        for organ, truth in structures:
            _, low, high = widest_slice_box(truth, axis)
            row = dict(case=case.key, modality=case.modality, organ=organ)
            for config in configs:
                predictor.open_margin, predictor.margin_shares = config   # both in the kept propagation's key
                mask = predictor.segment(Prompts(box=BoxPrompt(low, high, space="ijk")), propagate=True).mask
                row[label(config)] = dice(mask, truth)
            rows.append(row)
            print(f"[{time.perf_counter() - started:6.0f} s] {case.key} {organ}: "
                  + ", ".join(f"{label(c)} {row[label(c)]:.3f}" for c in configs), file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(table(rows, [label(c) for c in configs]))
    return 0


def table(rows: List[Dict], labels: List[str]) -> str:
    out = ["| modality | structure | n | " + " | ".join(f"margin {lab}" for lab in labels) + " |",
           "|---|---|---|" + "---|" * len(labels)]
    for modality in sorted({r["modality"] for r in rows}):
        group = [r for r in rows if r["modality"] == modality]
        for organ in ["(all)"] + sorted({r["organ"] for r in group}):
            chosen = group if organ == "(all)" else [r for r in group if r["organ"] == organ]
            out.append(f"| {modality} | {organ} | {len(chosen)} | "
                       + " | ".join(f"{np.mean([r[lab] for r in chosen]):.3f}" for lab in labels) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
