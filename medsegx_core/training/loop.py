"""The one training loop: training the base model (``train_starter``) and fine-tuning adapter experts
(``finetune``, ``medsegx finetune``) are two recipes of it.

A step: the global batch of the step (``sampling.Sampler``, a pure function of (seed, step, index)) -> this
process's slice -> ``batch.PromptedSegmentation`` (low-resolution logits) -> ``losses.dice_bce_loss`` against the
area-averaged target -> backward -> gradient clipping -> AdamW on the trainable parameters only, at the learning
rate of ``learning_rate`` (linear warm-up, cosine decay). Around it:

* progress (``progress(fraction, "step i/n loss ...")``) and a cancel token checked before every step;
* validation every ``val_every`` steps (hard Dice of fixed samples, ``losses.dice_score``); with ``keep_best`` the
  best validated trainable state is what the model holds at the end;
* checkpoints every ``checkpoint_every`` steps (and at the last step): the trainable tensors, AdamW's moments, the
  best state and the history in one safetensors file (no pickle), written to a temporary name and renamed. Resuming
  from it continues exactly as if the run had not stopped: samples depend only on the step, and dropout is seeded
  per (seed, step, rank);
* DDP under ``torchrun`` (``Distributed``; gloo on CPU, NCCL on GPUs): every rank steps its slice of the same
  global batch, so 1 or N processes follow the same loss curve (up to floating-point summation order).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, WeightsError
from ..progress import CancelToken, ProgressCallback, check, report
from .batch import Batch, PromptedSegmentation, SentenceTable, collate
from .losses import dice_bce_loss, dice_score, lowres_target
from .prompt_simulation import PromptedSample
from .sampling import Sampler

CHECKPOINT_FORMAT = "medsegx-training-state/1"

EXPERTS_PREFIX = "conmoae."
# Parameter-name prefixes of each trainable set. The frozen text tower never trains (FROZEN_ALWAYS).
TRAINABLE_SETS: Dict[str, Tuple[str, ...]] = {
    "experts": (EXPERTS_PREFIX,),                    # MedSegX's ConMoAE: experts, gates, context tables
    "experts+decoder": (EXPERTS_PREFIX, "mask_decoder."),
    "decoder": ("mask_decoder.",),
    "all": ("",),
}
FROZEN_ALWAYS = ("text_encoder.sentence_model.", "text_encoder.clip.")


# ------------------------------------------------------------------------------------------ distribution
@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        """Join the process group that ``torchrun`` describes in the environment (single process otherwise)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def device_for(self, device: torch.device) -> torch.device:
        """One GPU per process under torchrun; the CPU is shared."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.rank % torch.cuda.device_count())
        return device

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class LoopSettings:
    steps: int
    batch_size: int                     # global batch (split over the processes)
    lr: float
    warmup: int = 0                     # linear warm-up steps
    final_lr_fraction: float = 0.05     # the cosine decays to this share of ``lr``
    weight_decay: float = 0.01
    clip_norm: Optional[float] = 1.0    # gradient clipping (total norm); None: none
    seed: int = 0
    val_every: int = 0                  # 0: no validation
    keep_best: bool = True              # end with the best validated state (when there is validation)
    checkpoint_every: int = 0           # 0: only at the last step (when a checkpoint path is given)
    stop_after: Optional[int] = None    # stop after this step; the schedule still spans ``steps``
    # Peak rate of the ConMoAE parameters when they train with others (None: ``lr``). Their residual is scaled by
    # ConMoAEConfig.scale, so on a trained base they move usefully only at far larger steps than a decoder.
    experts_lr: Optional[float] = None

    def run_record(self) -> Dict:
        """What decides the weights (a checkpoint may only be resumed by a run with the same record)."""
        record = asdict(self)
        for where in ("checkpoint_every", "stop_after"):
            record.pop(where)
        if record["experts_lr"] is None:    # as recorded before the option existed
            record.pop("experts_lr")
        return record

    def parameter_groups(self, model: nn.Module, parameters: Sequence[nn.Parameter]) -> List[Dict]:
        """AdamW's groups, each with its peak rate (``peak_lr``): the experts' own when ``experts_lr`` is set."""
        if self.experts_lr is None:
            return [{"params": list(parameters), "peak_lr": self.lr}]
        experts = {id(p) for name, p in model.named_parameters() if name.startswith(EXPERTS_PREFIX)}
        groups = ({"params": [p for p in parameters if id(p) not in experts], "peak_lr": self.lr},
                  {"params": [p for p in parameters if id(p) in experts], "peak_lr": self.experts_lr})
        return [group for group in groups if group["params"]]


def learning_rate(step: int, steps: int, peak: float, warmup: int, final_fraction: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction`` of the peak at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return peak * (final_fraction + (1.0 - final_fraction) * cosine)


@dataclass
class TrainingResult:
    history: List[Dict] = field(default_factory=list)   # {"step", "loss", "lr"} and, at validations, "val_dice"
    steps_done: int = 0
    elapsed_s: float = 0.0
    initial_val_dice: Optional[float] = None
    best_val_dice: Optional[float] = None
    best_step: int = 0

    @property
    def losses(self) -> List[float]:
        return [record["loss"] for record in self.history]


# ---------------------------------------------------------------------------------------- trainable sets
def is_trainable(name: str, prefixes: Sequence[str]) -> bool:
    return name.startswith(tuple(prefixes)) and not name.startswith(FROZEN_ALWAYS)


def set_trainable(model: nn.Module, prefixes: Sequence[str]) -> List[nn.Parameter]:
    """Freeze everything but the parameters under ``prefixes`` (never the text tower); the trainable ones."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(name, prefixes))
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of the trainable parameters, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- batches
class StepBatches(torch.utils.data.Dataset):
    """Step -> this process's collated slice of that step's global batch; a DataLoader with workers draws the
    same batches as the main process would (each sample is seeded by its step and index)."""

    def __init__(self, sampler: Sampler, batch_size: int, distributed: "Distributed"):
        per_rank = batch_size // distributed.world_size
        self.sampler = sampler
        self.indices = range(distributed.rank * per_rank, (distributed.rank + 1) * per_rank)

    def __len__(self) -> int:
        return 2**62     # indexed by step; the loop asks only for its own range

    def __getitem__(self, step: int) -> Batch:
        return collate(self.sampler.batch(step, self.indices))


def _as_is(batch):
    """Batches come collated (a module-level function: worker processes may need to pickle it)."""
    return batch


def _batches(dataset: StepBatches, start: int, stop: int, workers: int, pin_memory: bool):
    if workers <= 0:
        return (dataset[step] for step in range(start, stop))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, stop),
                                            num_workers=workers, collate_fn=_as_is, prefetch_factor=8,
                                            pin_memory=pin_memory))


def _dropout_seed(seed: int, step: int, rank: int) -> int:
    """Dropout (the experts') is seeded per step and rank, so a resumed run draws what the straight run drew."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


# ------------------------------------------------------------------------------------------------- loop
def evaluate(module: PromptedSegmentation, samples: Sequence[PromptedSample], device: torch.device,
             chunk: int = 8) -> float:
    """Mean hard Dice of the (full-resolution) logits of ``samples`` (eval mode: no dropout)."""
    model = module.model
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for first in range(0, len(samples), chunk):
            part = samples[first:first + chunk]
            images = torch.from_numpy(np.stack([s.image for s in part]))[:, None].to(device)
            targets = torch.from_numpy(np.stack([s.mask for s in part]))[:, None].to(device)
            logits = model.upsample_logits(module(images, part), tuple(targets.shape[2:]))
            scores.append(dice_score(logits, targets).cpu())
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


def train_loop(model: nn.Module, prefixes: Sequence[str], sampler: Sampler, texts: Optional[SentenceTable],
               settings: LoopSettings, validation: Sequence[PromptedSample] = (),
               checkpoint: Optional[Path] = None, resume: bool = False, run_record: Optional[Mapping] = None,
               device: Optional[torch.device] = None, distributed: Optional[Distributed] = None, workers: int = 0,
               on_checkpoint: Optional[Callable[[TrainingResult], None]] = None,
               progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
               result: Optional[TrainingResult] = None) -> TrainingResult:
    """Train the parameters under ``prefixes`` of ``model`` in place (the rest frozen) and return the history.

    ``checkpoint``: the training-state file, written every ``settings.checkpoint_every`` steps and at the last
    step (rank 0); with ``resume`` a run continues from it (refused when it was written by a run with another
    ``run_record`` or settings). ``on_checkpoint(result)`` is called after each checkpoint (e.g. to save the
    weights so far). ``result``: an object to fill in (a subclass carrying more fields)."""
    device = device or torch.device("cpu")
    distributed = distributed or Distributed()
    if settings.batch_size % distributed.world_size:
        raise InputError(f"--batch-size {settings.batch_size} is the global batch; it must be a multiple of the "
                         f"{distributed.world_size} processes")
    result = result if result is not None else TrainingResult()
    record = {"loop": settings.run_record(), **(run_record or {})}
    model.to(device)
    parameters = set_trainable(model, prefixes)
    if not parameters:
        raise InputError(f"nothing to train: the model has no parameter under {', '.join(prefixes)}")
    optimiser = torch.optim.AdamW(settings.parameter_groups(model, parameters), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    module = PromptedSegmentation(model, texts)
    step_module: nn.Module = module
    if distributed.world_size > 1:
        # A box-only slice leaves the text projection unused, a text-only one the dense prompt marks.
        step_module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    loss_function = dice_bce_loss()

    start, best = 0, None
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        start, best = load_checkpoint(Path(checkpoint), model, optimiser, result, record)
    if distributed.is_main and validation and result.initial_val_dice is None:
        result.initial_val_dice = evaluate(module, validation, device)

    stop = settings.steps if settings.stop_after is None else min(settings.steps, settings.stop_after)
    batches = _batches(StepBatches(sampler, settings.batch_size, distributed), start, stop, workers,
                       pin_memory=device.type == "cuda")
    began = time.monotonic() - result.elapsed_s
    model.train()
    for step in range(start, stop):
        check(cancel)
        batch = next(batches).to(device)
        torch.manual_seed(_dropout_seed(settings.seed, step, distributed.rank))
        lr = learning_rate(step, settings.steps, settings.lr, settings.warmup, settings.final_lr_fraction)
        for group in optimiser.param_groups:
            group["lr"] = lr * group.get("peak_lr", settings.lr) / settings.lr    # one schedule, each group's peak
        optimiser.zero_grad(set_to_none=True)
        logits = step_module(batch.images, batch.samples)
        loss = loss_function(logits, lowres_target(batch.targets, logits))
        loss.backward()
        if settings.clip_norm:
            torch.nn.utils.clip_grad_norm_(parameters, settings.clip_norm)
        optimiser.step()
        entry = {"step": step + 1, "loss": distributed.mean(float(loss.detach())), "lr": lr}
        last = step + 1 == stop
        if distributed.is_main and validation and settings.val_every and (
                last or (step + 1) % settings.val_every == 0):
            entry["val_dice"] = evaluate(module, validation, device)
            if result.best_val_dice is None or entry["val_dice"] > result.best_val_dice:
                result.best_val_dice, result.best_step = entry["val_dice"], step + 1
                best = trainable_state(model)
        result.history.append(entry)
        result.steps_done, result.elapsed_s = step + 1, time.monotonic() - began
        if checkpoint is not None and distributed.is_main and (
                last or (settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0)):
            save_checkpoint(Path(checkpoint), model, optimiser, result, record, best)
            if on_checkpoint is not None:
                on_checkpoint(result)
        recent = np.mean([h["loss"] for h in result.history[-20:]])
        report(progress, (step + 1) / settings.steps, f"step {step + 1}/{settings.steps} loss {recent:.4f}"
               + (f" val Dice {entry['val_dice']:.3f}" if "val_dice" in entry else ""))
    distributed.barrier()
    if settings.keep_best and best is not None:
        model.load_state_dict(best, strict=False)
    model.eval()
    return result


# ------------------------------------------------------------------------------------------ checkpoints
def _flat(record: Mapping, prefix: str = "") -> Dict:
    """{"loop.lr": ...}: a nested record's leaves by dotted name (to name what differs)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _loop_fields(result: TrainingResult) -> Dict:
    """The loop's own fields of a result (a subclass may carry more, which its caller rebuilds)."""
    return {f.name: getattr(result, f.name) for f in fields(TrainingResult)}


def save_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, result: TrainingResult,
                    record: Mapping, best: Optional[Dict[str, torch.Tensor]]) -> Path:
    """Trainable tensors, AdamW's state and the best state as safetensors, counters and history as metadata (no
    pickle); written to a temporary name in the same folder and renamed."""
    from safetensors.torch import save_file

    tensors = {f"param/{k}": v.cpu().contiguous() for k, v in trainable_state(model).items()}
    if best is not None:
        tensors.update({f"best/{k}": v.detach().cpu().contiguous() for k, v in best.items()})
    optimiser_state = optimiser.state_dict()
    for index, state in optimiser_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(result.steps_done),
                "param_groups": json.dumps(optimiser_state["param_groups"]),
                "result": json.dumps(_loop_fields(result)), "run": json.dumps(record, sort_keys=True)}
    temp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temp), metadata=metadata)
    os.replace(temp, path)
    return path


def load_checkpoint(path: Path, model: nn.Module, optimiser: torch.optim.Optimizer, result: TrainingResult,
                    record: Mapping) -> Tuple[int, Optional[Dict[str, torch.Tensor]]]:
    """Restore what ``save_checkpoint`` wrote into ``model``, ``optimiser`` and ``result``; (step, best state)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:      # safetensors raises its own error types for a damaged file
        raise WeightsError(f"{path}: cannot read the training state ({exc}); remove it or drop --resume") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path}: not a medsegx training state ({CHECKPOINT_FORMAT})")
    saved_record = _flat(json.loads(metadata["run"]))
    expected = _flat(json.loads(json.dumps(record)))
    if saved_record != expected:
        differing = sorted(k for k in set(saved_record) | set(expected) if saved_record.get(k) != expected.get(k))
        raise WeightsError(f"{path}: this training state was written by a run with other settings "
                           f"({', '.join(differing)}); resume with the same recipe and options, or remove it")
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    own = trainable_state(model)
    if set(params) != set(own) or any(own[k].shape != v.shape for k, v in params.items()):
        raise WeightsError(f"{path}: this training state is for another model or trainable set; remove it or "
                           f"drop --resume")
    model.load_state_dict(params, strict=False)
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    for key, value in json.loads(metadata["result"]).items():
        setattr(result, key, value)
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return int(metadata["step"]), best
