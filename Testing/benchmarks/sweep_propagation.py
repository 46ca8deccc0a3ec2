"""Benchmark (not a test): choose LiteMedSAM's propagation settings by measurement on every shared case.

For each case (the cases of ``eval_box.py``: every shared CT patient, CHAOS MR evaluation patients 10 13 15 19 20)
one ``VolumeSlicePredictor`` holds every slice embedding, so each configuration re-runs only the decoder. For each
configuration (margin around the previous slice's mask, in model pixels; the stop rule's minimum share of the
largest slice's area) it scores, per structure, the 3D box and the propagated slice box (as ``eval_box.py``
defines them), each also after keeping the largest 3D connected component, and a click refinement: after the 3D
box of the first configuration, one positive click at the centre of the largest missed region (or, when nothing is missed, one negative click
in the largest wrong region) on the slice where the mask is worst, handled as the predictor does (the click joins
that slice's box in the decoder). It prints the mean Dice per (modality, configuration) and per organ, with the
filled box for reference.

    OMP_NUM_THREADS=2 python Testing/benchmarks/sweep_propagation.py [--margins 3 0 6] [--fractions 0.1 0]
        [--shares 0,0.5,1 1] [--cases ...] [--json rows.json]

``--shares``: each propagated slice decodes the grown box at these shares of the margin and keeps the mask with the
highest predicted IoU (the predictor's ``margin_shares``); "1" is the margin alone.

Nothing here is trained: the settings are chosen on these patients and the choice is reported as such.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import (add_case_options, case_structures, filled_box, read_case,  # noqa: E402
                      selected_cases, tight_box_ijk, widest_slice_box)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())[1:]
    return (labelled == 1 + int(np.argmax(sizes))).astype(mask.dtype)


def refinement_click(mask: np.ndarray, truth: np.ndarray):
    """(PointPrompt kwargs) the click a user would make on the worst slice: positive at the centre of the largest
    missed region, else negative at the centre of the largest wrong region; None if the mask is perfect."""
    errors = [(int((mask[k] != truth[k]).sum()), k) for k in range(mask.shape[0])]
    count, k = max(errors)
    if count == 0:
        return None
    missed = truth[k] & ~mask[k].astype(bool)
    wrong = mask[k].astype(bool) & ~truth[k]
    positive = missed.sum() >= wrong.sum()
    region = missed if positive else wrong
    labelled, n = ndimage.label(region)
    biggest = labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))
    distance = ndimage.distance_transform_edt(biggest)
    j, i = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return dict(position=(float(i), float(j), float(k)), positive=bool(positive), space="ijk")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margins", type=float, nargs="+", default=[3.0, 0.0, 6.0],
                        help="the first margin and fraction are also the configuration the click is measured on")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.0])
    parser.add_argument("--shares", nargs="+", default=["0,0.5,1", "1"],
                        help="margin shares to choose among by predicted IoU, each a comma list ('1': the margin "
                             "alone)")
    parser.add_argument("--starts", nargs="+", default=["middle"], help="3D box start rules to compare (middle, widest)")
    add_case_options(parser)
    args = parser.parse_args(argv)

    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", file=sys.stderr, flush=True)

    model = load_litemedsam()
    configs = [(m, f, tuple(float(v) for v in shares.split(","))) for shares in args.shares
               for m in args.margins for f in args.fractions]
    starts = list(args.starts)
    rows: List[Dict] = []
    for case in selected_cases(args.data, args.cases):
        volume, labels = read_case(args.data, case)
        predictor = VolumeSlicePredictor(model, device="cpu", precision="fp32", cache_megabytes=2400)
        predictor.set_volume(volume, modality=case.modality)
        axis = predictor.orientation.source_axis[2]
        for organ, value in case_structures(args.data, case):
            truth = labels == value
            if not truth.any():
                continue
            lo, hi = tight_box_ijk(truth)
            _, flat_lo, flat_hi = widest_slice_box(truth, axis)
            filled = dice(filled_box(truth), truth)
            for margin, fraction, shares in configs:
                predictor.margin = predictor.open_margin = margin
                predictor.min_area_fraction = fraction
                predictor.margin_shares = shares
                by_start = {}
                for start in starts:
                    predictor.start = start
                    predictor._last_propagation = None      # the start rule is not part of its key
                    by_start[start] = predictor.segment(Prompts(box=BoxPrompt(lo, hi, space="ijk"))).mask
                box3d = by_start[starts[0]]
                flat = predictor.segment(Prompts(box=BoxPrompt(flat_lo, flat_hi, space="ijk")), propagate=True).mask
                click = refinement_click(box3d, truth) if (margin, fraction, shares) == configs[0] else None
                clicked = box3d if click is None else predictor.segment(
                    Prompts(box=BoxPrompt(lo, hi, space="ijk"), points=(PointPrompt(**click),))).mask
                rows.append(dict(case=case.key, modality=case.modality, organ=organ, margin=margin, fraction=fraction,
                                 shares=",".join(f"{v:g}" for v in shares),
                                 filled=filled, box3d=dice(box3d, truth), flat=dice(flat, truth),
                                 box3d_lcc=dice(largest_component(box3d), truth),
                                 flat_lcc=dice(largest_component(flat), truth),
                                 clicked=dice(clicked, truth) if (margin, fraction, shares) == configs[0]
                                 else float("nan"),
                                 click_positive=None if click is None else click["positive"],
                                 **{f"box3d_{start}": dice(mask, truth) for start, mask in by_start.items()}))
            best = max((r for r in rows if r["case"] == case.key and r["organ"] == organ), key=lambda r: r["box3d"])
            log(f"{case.key} {organ}: filled {filled:.3f}, best 3D {best['box3d']:.3f} at margin {best['margin']:g} "
                f"fraction {best['fraction']:g} shares {best['shares']}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        del predictor
    print(tables(rows, configs))
    return 0


def cell(values) -> str:
    values = [v for v in values if not np.isnan(v)]
    return f"{np.mean(values):.3f}" if values else "-"


def tables(rows: List[Dict], configs: List[Tuple[float, float, Tuple[float, ...]]]) -> str:
    keys = ("box3d", "box3d_lcc", "flat", "flat_lcc", "clicked", "filled")
    out = ["| modality | margin | shares | min area | n | 3D box | 3D + LCC | slice box | slice + LCC | 3D + 1 click "
           "| filled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    labels = [(margin, fraction, ",".join(f"{v:g}" for v in shares)) for margin, fraction, shares in configs]
    for modality in sorted({r["modality"] for r in rows}):
        for margin, fraction, shares in labels:
            group = [r for r in rows if (r["modality"], r["margin"], r["fraction"], r["shares"])
                     == (modality, margin, fraction, shares)]
            if group:
                cells = " | ".join(f"{np.nanmean([r[k] for r in group]):.3f}" if not all(np.isnan(r[k]) for r in group)
                                   else "-" for k in keys)
                out.append(f"| {modality} | {margin:g} | {shares} | {fraction:g} | {len(group)} | {cells} |")
    out += ["", "| modality | organ | margin | shares | min area | n | 3D box | slice box | 3D + 1 click | filled "
            "| 3D > filled |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for modality, organ in sorted({(r["modality"], r["organ"]) for r in rows}):
        for margin, fraction, shares in labels:
            group = [r for r in rows if (r["modality"], r["organ"], r["margin"], r["fraction"], r["shares"])
                     == (modality, organ, margin, fraction, shares)]
            if group:
                beats = sum(r["box3d"] > r["filled"] for r in group)
                out.append(f"| {modality} | {organ} | {margin:g} | {shares} | {fraction:g} | {len(group)} "
                           f"| {np.mean([r['box3d'] for r in group]):.3f} | {np.mean([r['flat'] for r in group]):.3f} "
                           f"| {cell([r['clicked'] for r in group])} | {np.mean([r['filled'] for r in group]):.3f} "
                           f"| {beats}/{len(group)} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
