"""Benchmark (not a test): few-shot adaptation to a new domain (CHAOS abdominal T2-SPIR MR), measured the way MedSegX
measures it. The base model stays as it is; each arm fine-tunes one set of weights on k labelled CHAOS patients
with the same data, steps, batch and seed, and is scored on five other CHAOS patients:

* zero-shot: the base model as shipped (no adaptation);
* experts+decoder: MedSegX's recipe (ConMoAE adapter experts, gates and context tables, and the mask decoder;
  the image encoder frozen);
* experts: the ConMoAE part alone;
* decoder: the mask decoder only;
* all: every weight except the frozen text tower.

Adaptation patients: the first k of 01 02 03 05 08; evaluation patients: 10 13 15 19 20
(``training.starter_data``). Prompts: box, point and text per organ (``training.starter_eval``), with the
filled-box baseline. The k = --save-k arm named by --save-arm (default MedSegX's, experts+decoder) is written as
an expert pack when --save-pack is given.

    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_chaos.py [--weights DIR] [--k 1 3 5]
        [--arms zero-shot experts decoder all] [--steps 300] [--seeds 0] [--save-pack FILE --save-k 5] [--json F]
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
ARMS = ("zero-shot", "experts+decoder", "experts", "decoder", "all")
# Learning rate per arm: adapters start from a small residual and take a larger step than weights that already
# carry the base model's knowledge (set once, before any evaluation on the evaluation patients).
ARM_LR = {"experts+decoder": 3e-4, "experts": 5e-4, "decoder": 2e-4, "all": 1e-4}


def main(argv=None) -> int:
    import numpy as np
    import torch

    from medsegx_core.predictor import Predictor
    from dataclasses import replace

    from medsegx_core.training.finetune import FINETUNE_SAMPLING, FinetuneSettings, base_sha256, finetune, write_pack
    from medsegx_core.training.starter_data import CHAOS_ADAPTATION_PATIENTS, CHAOS_CASES, load_case
    from medsegx_core.training.starter_eval import FILLED_BOX, EVALUATION_KINDS, evaluate, select_volumes
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.store import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=starter_weights_dir())
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--k", type=int, nargs="*", default=[1, 3, 5])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--zoom-in-share", type=float, default=0.5, help="share of zoom-in training windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-pack", type=Path, help="write the --save-arm arm of k = --save-k (first seed) here")
    parser.add_argument("--save-k", type=int, default=5)
    parser.add_argument("--save-arm", default="experts+decoder", choices=("experts+decoder", "experts"))
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1
    if any(not 1 <= k <= len(CHAOS_ADAPTATION_PATIENTS) for k in args.k):
        print(f"--k must be between 1 and {len(CHAOS_ADAPTATION_PATIENTS)}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    by_patient = {spec.patient: spec for spec in CHAOS_CASES}
    adaptation = [load_case(args.data, by_patient[f"chaos-{nn}"]).labelled for nn in CHAOS_ADAPTATION_PATIENTS]
    volumes = select_volumes(["chaos"])
    record = json.loads((args.weights / "config.json").read_text(encoding="utf-8"))

    def score(model, arm, k, seed):
        predictor = Predictor(model, device="cpu")
        rows = evaluate(predictor, args.data, volumes=volumes, kinds=EVALUATION_KINDS, source=record.get("source"))
        return [dict(asdict(row), arm=arm, k=k, seed=seed) for row in rows]

    results = []
    start = time.perf_counter()
    if "zero-shot" in args.arms:
        results += score(load_model(args.weights), "zero-shot", 0, None)
    for seed in args.seeds:
        for k in args.k:
            for arm in [a for a in args.arms if a != "zero-shot"]:
                model = load_model(args.weights)
                settings = FinetuneSettings(steps=args.steps, batch_size=args.batch_size, lr=ARM_LR[arm], seed=seed,
                                            trainable=arm, val_fraction=0.0, val_every=args.steps,
                                            sampling=replace(FINETUNE_SAMPLING,
                                                             zoom_in_probability=args.zoom_in_share))
                base = base_sha256(model)     # before fine-tuning: a decoder arm changes what it hashes
                began = time.perf_counter()
                run = finetune(model, adaptation[:k], settings)
                print(f"[{time.perf_counter() - start:.0f} s] k={k} {arm} seed {seed}: {args.steps} steps in "
                      f"{time.perf_counter() - began:.0f} s, last-20 loss "
                      f"{np.mean([h['loss'] for h in run.history[-20:]]):.3f}", file=sys.stderr, flush=True)
                if arm == args.save_arm and args.save_pack and k == args.save_k and seed == args.seeds[0]:
                    write_pack(args.save_pack, model, settings, base, adaptation[:k], run, overwrite=True)
                    print(f"wrote {args.save_pack}", file=sys.stderr)
                results += score(model, arm, k, seed)
    print(f"weights: {args.weights} | {len(results)} rows in {time.perf_counter() - start:.0f} s | steps "
          f"{args.steps}, batch {args.batch_size}, seeds {args.seeds}, lr {ARM_LR}")
    print(fewshot_table(results, [FILLED_BOX] + list(EVALUATION_KINDS)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def fewshot_table(rows, kinds) -> str:
    """Mean Dice over the evaluation patients (and seeds) per arm, k, organ and prompt kind."""
    import numpy as np

    cells = {}
    for row in rows:
        if row["kind"] == "filled box" and row["arm"] != "zero-shot":
            continue        # the baseline does not depend on the arm: shown once, in the zero-shot rows
        cells.setdefault((row["arm"], row["k"], row["structure"]), {}).setdefault(row["kind"], []).append(
            row["dice"])
    lines = ["| arm | k | organ | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    order = {arm: i for i, arm in enumerate(ARMS)}
    for (arm, k, organ), by_kind in sorted(cells.items(), key=lambda item: (order[item[0][0]], item[0][1:])):
        values = " | ".join(f"{np.mean(by_kind[kind]):.3f}" if kind in by_kind else "-" for kind in kinds)
        lines.append(f"| {arm} | {k} | {organ} | {values} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
