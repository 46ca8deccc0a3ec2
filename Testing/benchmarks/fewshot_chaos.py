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
filled-box baseline.

Every arm follows one fine-tuning recipe (``--recipe``, default ``abdominal_mr_experts``: steps, batch, seed,
sampling, expert sizes; the recipe's own trainable set and learning rate are its arm's); the other arms differ in
what trains and their learning rate (ARM_LR). The learning rates were chosen with ``--select-lr``, which never
looks at the evaluation patients: each arm trains on adaptation patients 01 02 03 05 and is validated on 08
(hard Dice of text, box and point prompts on fixed samples) at each rate of a small grid. The k = --save-k arm of
the recipe is written as an expert pack (recording the recipe) with --save-pack.

    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_chaos.py [--weights DIR] [--k 1 3 5]
        [--arms zero-shot experts decoder all] [--seeds 0] [--save-pack FILE --save-k 5] [--json F]
    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_chaos.py --select-lr [--arms experts decoder]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
ARMS = ("zero-shot", "experts+decoder", "experts", "decoder", "all")
DEFAULT_RECIPE = "abdominal_mr_experts"
# Learning rate per arm, chosen by --select-lr on the adaptation patients (never the evaluation ones): the
# best validation Dice of LR_GRID (the experts' best, 5e-2, is a hundred times the rate of before: their residual
# is scaled by 0.1 (ConMoAEConfig.scale) and starts where the base left it, so small steps change nothing).
ARM_LR = {"experts+decoder": 6e-4, "experts": 5e-2, "decoder": 6e-4, "all": 3e-4}
# MedSegX's arm trains the experts at their own rate (the experts arm's) and the decoder at the decoder arm's:
# one shared rate leaves either the experts still or the decoder overshooting. --select-lr then sweeps the
# decoder part's rate with the experts' fixed.
ARM_EXPERTS_LR = {"experts+decoder": 5e-2}
LR_GRID = {"experts": (5e-4, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1), "experts+decoder": (3e-4, 6e-4, 1e-3, 3e-3),
           "decoder": (2e-4, 6e-4, 2e-3), "all": (1e-4, 3e-4, 1e-3)}


def main(argv=None) -> int:
    import numpy as np
    import torch

    from medsegx_core.cli.finetune import settings_from_recipe
    from medsegx_core.predictor import Predictor
    from medsegx_core.training.finetune import base_sha256, finetune, write_pack
    from medsegx_core.training.starter_data import CHAOS_ADAPTATION_PATIENTS, CHAOS_CASES, load_case
    from medsegx_core.training.starter_eval import FILLED_BOX, EVALUATION_KINDS, evaluate, select_volumes
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.store import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=starter_weights_dir())
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE,
                        help="the fine-tuning recipe every arm follows (its own arm: its trainable set and rate)")
    parser.add_argument("--k", type=int, nargs="*", default=[1, 3, 5])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the recipe's seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--select-lr", action="store_true",
                        help="choose each arm's rate on the adaptation patients (train 01 02 03 05, validate 08)")
    parser.add_argument("--save-pack", type=Path, help="write the recipe's arm at k = --save-k (first seed) here")
    parser.add_argument("--save-k", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1
    if any(not 1 <= k <= len(CHAOS_ADAPTATION_PATIENTS) for k in args.k):
        print(f"--k must be between 1 and {len(CHAOS_ADAPTATION_PATIENTS)}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    protocol = settings_from_recipe(args.recipe)
    recipe_arm = protocol.trainable
    learning_rates = {**ARM_LR, recipe_arm: protocol.lr}
    experts_rates = {**ARM_EXPERTS_LR, recipe_arm: protocol.experts_lr}
    seeds = args.seeds if args.seeds is not None else [protocol.seed]
    by_patient = {spec.patient: spec for spec in CHAOS_CASES}
    adaptation = [load_case(args.data, by_patient[f"chaos-{nn}"]).labelled for nn in CHAOS_ADAPTATION_PATIENTS]
    arms = [arm for arm in args.arms if arm != "zero-shot"]

    def arm_settings(arm, lr, seed=protocol.seed, val_every=protocol.steps):
        """The recipe with another trainable set and rate (recorded as the recipe only where it is the recipe)."""
        experts_lr = experts_rates.get(arm)
        return replace(protocol, trainable=arm, lr=lr, experts_lr=experts_lr, seed=seed, val_fraction=0.0,
                       val_every=val_every, recipe=protocol.recipe if (arm, lr, experts_lr) == (
                           recipe_arm, protocol.lr, protocol.experts_lr) else None)

    if args.select_lr:
        return select_learning_rates(adaptation, arms, arm_settings, args.weights, load_model, finetune)
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
    for seed in seeds:
        for k in args.k:
            for arm in arms:
                model = load_model(args.weights)
                settings = arm_settings(arm, learning_rates[arm], seed)
                base = base_sha256(model)     # before fine-tuning: a decoder arm changes what it hashes
                began = time.perf_counter()
                run = finetune(model, adaptation[:k], settings)
                rates = f"lr {settings.lr:g}" + (f" experts {settings.experts_lr:g}" if settings.experts_lr else "")
                print(f"[{time.perf_counter() - start:.0f} s] k={k} {arm} seed {seed} {rates}: "
                      f"{settings.steps} steps in {time.perf_counter() - began:.0f} s, last-20 loss "
                      f"{np.mean([h['loss'] for h in run.history[-20:]]):.3f}", file=sys.stderr, flush=True)
                if arm == recipe_arm and args.save_pack and k == args.save_k and seed == seeds[0]:
                    write_pack(args.save_pack, model, settings, base, adaptation[:k], run, overwrite=True)
                    print(f"wrote {args.save_pack}", file=sys.stderr)
                results += score(model, arm, k, seed)
    print(f"weights: {args.weights} | recipe {protocol.recipe['name']} v{protocol.recipe['version']} | "
          f"{len(results)} rows in {time.perf_counter() - start:.0f} s | steps {protocol.steps}, batch "
          f"{protocol.batch_size}, seeds {seeds}, lr {learning_rates}, experts' own lr {experts_rates}")
    print(fewshot_table(results, [FILLED_BOX] + list(EVALUATION_KINDS)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def select_learning_rates(adaptation, arms, arm_settings, weights, load_model, finetune) -> int:
    """Each arm at each rate of LR_GRID: train on the first four adaptation patients, validate on the fifth."""
    train, validation = adaptation[:-1], adaptation[-1:]
    print("| arm | lr | validation Dice before | best | at step |\n|---|---|---|---|---|")
    for arm in arms:
        for lr in LR_GRID[arm]:
            settings = arm_settings(arm, lr, val_every=50)
            run = finetune(load_model(weights), train, settings, validation_cases=validation)
            print(f"| {arm} | {lr:g} | {run.initial_val_dice:.3f} | {run.best_val_dice:.3f} | {run.best_step} |",
                  flush=True)
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
