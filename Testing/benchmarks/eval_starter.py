"""Benchmark (not a test): Dice of the bundled starter model per structure with box, point and text prompts.

Held-out design (``medsegx_core.training.starter_eval``): each row says whether its patient and structure were in
the weights' training data, read from the weights' own training record (config.json "source"); "trained" rows are
NOT held-out figures. Every structure also gets the "filled box" row, the trivial baseline a box prompt must
beat. Groups: "base" (the CT and MR volumes of the base model's design), "chaos" (the five CHAOS T2-SPIR
evaluation patients of the few-shot design, never trained on by the base model).

Each prompt goes through the real ``Predictor`` (zoom-out-zoom-in, default device and precision) on the whole
volume: box = the structure's tight voxel box, point = one click at its most interior voxel, text = its name.
Usage (a few minutes on 2 CPU threads)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/eval_starter.py [--weights DIR] [--kinds box point text]
        [--groups base chaos] [--volumes KEY ...] [--experts PACK] [--zoom-in model|on|off] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))


def main(argv=None) -> int:
    import torch

    from medsegx_core.predictor import Predictor
    from medsegx_core.training.starter_eval import (EVALUATION_GROUPS, EVALUATION_KINDS, dice_table, evaluate,
                                                    select_volumes, summary_table)
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.store import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=starter_weights_dir())
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--kinds", nargs="*", default=list(EVALUATION_KINDS), choices=EVALUATION_KINDS)
    parser.add_argument("--structures", nargs="*", default=None, help="only these (raw or canonical names)")
    parser.add_argument("--groups", nargs="*", default=None, choices=EVALUATION_GROUPS,
                        help="evaluation volume groups (default: all)")
    parser.add_argument("--volumes", nargs="*", default=None, help="only volumes whose key contains one of these")
    parser.add_argument("--experts", type=Path, help="load this expert pack on top of the weights first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--zoom-in", choices=("model", "on", "off"), default="model",
                        help="zoom-in refinement: as the weights' config says (the shipped starter: off), or "
                             "forced (a training checkpoint's config keeps SegVol's default, on)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--idle-windows-cost", action="store_true",
                        help="zoom-in on, canonical preprocessing, once skipping idle windows (the default) and "
                             "once not: Dice per row side by side and the time of each (issue 16)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model = load_model(args.weights, verify=True)
    if args.experts:
        from medsegx_core.weights.expert_pack import load_expert_pack
        load_expert_pack(model, args.experts)       # refused when trained on another base
    record = json.loads((args.weights / "config.json").read_text(encoding="utf-8")) if args.weights.is_dir() else {}
    zoom_in = {"model": None, "on": True, "off": False}[args.zoom_in]
    if args.idle_windows_cost:
        return idle_windows_cost(model, args, record)
    predictor = Predictor(model, device="cpu", precision=args.precision, zoom_in=zoom_in)
    start = time.perf_counter()
    rows = evaluate(predictor, args.data, volumes=select_volumes(args.groups, args.volumes), kinds=args.kinds,
                    structures=args.structures, source=record.get("source"))
    print(f"weights: {args.weights} | runtime: {predictor.runtime.describe()} | "
          f"{len(rows)} segmentations in {time.perf_counter() - start:.0f} s "
          f"(mean {sum(r.seconds for r in rows) / max(len(rows), 1):.2f} s each)")
    print(dice_table(rows))
    print()
    print(summary_table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    return 0


def idle_windows_cost(model, args, record) -> int:
    """The Dice cost of skipping idle zoom-in windows: the same rows with and without, zoom-in forced on."""
    from medsegx_core.predictor import Predictor
    from medsegx_core.training.starter_eval import evaluate, select_volumes

    rows, seconds, windows = {}, {}, {}
    for skip in (False, True):
        predictor = Predictor(model, device="cpu", precision=args.precision, zoom_in=True, skip_idle_windows=skip)
        counted = [0, 0]
        segment = predictor.segment

        def counting(*a, **k):
            result = segment(*a, **k)
            counted[0] += result.windows
            counted[1] += result.windows_skipped
            return result

        predictor.segment = counting
        start = time.perf_counter()
        rows[skip] = evaluate(predictor, args.data, volumes=select_volumes(args.groups, args.volumes),
                              kinds=args.kinds, structures=args.structures, source=record.get("source"),
                              baseline=False)
        seconds[skip], windows[skip] = time.perf_counter() - start, counted
    print(f"weights: {args.weights} | zoom-in on, canonical preprocessing | all windows: {seconds[False]:.0f} s, "
          f"{windows[False][0]} windows | idle skipped: {seconds[True]:.0f} s, {windows[True][1]} of "
          f"{windows[True][0]} windows skipped")
    print(f"{'volume':34}{'structure':18}{'prompt':8}{'Dice all':>10}{'Dice skip':>11}{'change':>9}")
    changes = []
    for full, skipped in zip(rows[False], rows[True]):
        changes.append(skipped.dice - full.dice)
        print(f"{full.volume:34}{full.structure:18}{full.kind:8}{full.dice:>10.4f}{skipped.dice:>11.4f}"
              f"{changes[-1]:>+9.4f}")
    if changes:
        print(f"mean change {sum(changes) / len(changes):+.4f}; largest loss {min(changes):+.4f}; "
              f"largest gain {max(changes):+.4f} over {len(changes)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
