"""Few-shot fine-tuning benchmark (not in CI): validation Dice before and after, on a held-out patient.

Training: the abdominal CT (``ct/totalseg_ct``: aorta, T12 vertebra, liver, spleen) and the heart crop of a second
patient (``ct/chest_ct_pulmonary_crop``: heart). Validation: the other crop of that second patient
(``ct/chest_ct_aorta_crop``: aorta and T12 vertebra), never trained on; the structures are known from the first
patient, the volume is not. Dice is the hard Dice (logit > 0) of the zoom-out view with text, box and point
prompts (``training.loop.evaluate``), single output, no oracle choice.

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_finetune.py [--base WEIGHTS] [--steps 150] [--json out.json]

Without ``--base`` the base is a randomly initialised small SegVol (no pretrained weights exist offline): the
figures then measure how much the experts (and the decoder, ``--train-decoder``, default on) learn on top of a
frozen random encoder, not a pretrained model's zero-shot quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from medsegx_core.training.dataset import load_case  # noqa: E402
from medsegx_core.training.finetune import FINETUNE_SAMPLING, FinetuneSettings, finetune  # noqa: E402


def small_random_base(seed: int):
    from medsegx_core.modeling.build import build_model
    from medsegx_core.modeling.config import ImageEncoderConfig, preset
    config = preset("tiny-minilm")
    config.name, config.image_size = "bench-32x128x128", (32, 128, 128)
    config.image_encoder = ImageEncoderConfig(hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4)
    torch.manual_seed(seed)
    return build_model(config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="weights folder/checkpoint (default: a random small model)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--experts-only", action="store_true", help="do not train the mask decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    total = json.loads((DATA / "totalsegmentator_class_map.json").read_text())["total"]
    names = ",".join(f"{k}={v}" for k, v in total.items() if v in ("aorta", "vertebrae_T12", "liver", "spleen"))
    started = time.time()
    train = [
        load_case(DATA / "ct/totalseg_ct.nii.gz", DATA / "ct/totalseg_ct_labels.nii.gz", names,
                  only=["aorta", "T12 vertebra", "liver", "spleen"]),
        load_case(DATA / "ct/chest_ct_pulmonary_crop.nii.gz", DATA / "ct/chest_ct_pulmonary_crop_labels.nii.gz",
                  str(DATA / "ct/chest_ct_pulmonary_crop_labels.json"), only=["heart"]),
    ]
    held_out = [load_case(DATA / "ct/chest_ct_aorta_crop.nii.gz", DATA / "ct/chest_ct_aorta_crop_labels.nii.gz",
                          str(DATA / "ct/chest_ct_aorta_crop_labels.json"), only=["aorta", "T12 vertebra"])]
    if args.base:
        from medsegx_core.weights.store import load_model
        model = load_model(args.base)
    else:
        model = small_random_base(args.seed)
    # Everything outside the trainable set stays as it was (a base with experts of its own, such as the starter,
    # trains those: they are not frozen).
    trainable = ("conmoae.",) if args.experts_only else ("conmoae.", "mask_decoder.")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(trainable)}
    settings = FinetuneSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                train_decoder=not args.experts_only, val_every=max(1, args.steps // 6),
                                seed=args.seed,
                                sampling=replace(FINETUNE_SAMPLING, box_jitter=4, zoom_in_probability=0.3))
    trained_at = time.time()
    result = finetune(model, train, settings, validation_cases=held_out,
                      progress=lambda f, m: print(f"  {m}", flush=True) if "val" in m else None)
    seconds = time.time() - trained_at
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items()), "a frozen base tensor changed"
    figures = {
        "base": args.base or "random small SegVol (32x128x128, width 64, 2 blocks)",
        "trained_set": "experts + context tables" + ("" if args.experts_only else " + mask decoder"),
        "train": {case.source: [s.name for s in case.structures] for case in train},
        "held_out": {case.source: [s.name for s in case.structures] for case in held_out},
        "steps": args.steps, "global_batch": args.batch_size, "lr": args.lr, "seed": args.seed,
        "val_dice_before": result.initial_val_dice, "val_dice_best": result.best_val_dice,
        "best_step": result.best_step,
        "loss_first_10": sum(r["loss"] for r in result.history[:10]) / min(10, len(result.history)),
        "loss_last_10": sum(r["loss"] for r in result.history[-10:]) / min(10, len(result.history)),
        "train_seconds": round(seconds, 1), "total_seconds": round(time.time() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
