"""Few-shot fine-tuning of ConMoAE experts (and optionally the mask decoder) on top of a frozen base model.

What trains: the experts, their gates and the context tables (and the mask decoder with ``train_decoder``),
exactly MedSegX's trainable set; the image encoder, prompt encoder and text tower stay frozen, so the base
weights are unchanged and the result is an expert pack of a few hundred thousand numbers.

Each step draws a global batch of simulated prompts (``prompt_simulation``) from the training structures. The
batch is a pure function of ``(seed, step)``, so
* a run resumed from its training-state file continues exactly as if it had not stopped, and
* under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPUs) every rank draws the same global batch
  and takes its own slice: with the same global batch, 1 or N processes follow the same loss curve (up to
  floating-point summation order and expert dropout, which is drawn per rank).
Validation (hard Dice of logit > 0, text / box / points prompts on the zoom-out view, fixed seed) runs every
``val_every`` steps on rank 0; the best state is kept and is what the pack holds.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, WeightsError
from ..modeling.conmoae import ConMoAE, ConMoAEConfig, attach_experts_to_model
from ..progress import CancelToken, ProgressCallback, check, report
from .dataset import LabelledCase, Structure
from ..weights.expert_pack import base_state, save_expert_pack, weights_sha256
from .losses import dice_bce_loss, dice_score
from .prompt_simulation import PROMPT_KINDS, PromptedSample, PromptSettings, simulate

Item = Tuple[int, int]      # (case index, structure index)
VALIDATION_KINDS = ("text", "box", "points")
MAX_DRAWS = 20              # redraws when a view misses the structure (tiny structures in the zoom-out view)


@dataclass
class FinetuneSettings:
    steps: int = 200
    batch_size: int = 2                 # global batch (split over the processes)
    lr: float = 5e-4
    weight_decay: float = 0.01
    train_decoder: bool = False
    # Which weights train (TRAINABLE_SETS); None: the experts, plus the mask decoder with ``train_decoder``.
    # The other sets ("decoder", "all") are the comparison arms of the few-shot benchmark: their result is the
    # adapted model itself, not an expert pack.
    trainable: Optional[str] = None
    val_fraction: float = 0.25          # of the (volume, structure) pairs, when no validation cases are given
    val_every: int = 25
    seed: int = 0
    n_experts: int = 4
    bottleneck: int = 16
    dropout: float = 0.1
    blocks: Optional[List[int]] = None
    prompts: PromptSettings = field(default_factory=PromptSettings)

    def conmoae_config(self) -> ConMoAEConfig:
        return ConMoAEConfig(n_experts=self.n_experts, bottleneck=self.bottleneck, dropout=self.dropout,
                             blocks=self.blocks)


@dataclass
class FinetuneResult:
    history: List[Dict] = field(default_factory=list)      # {"step", "loss"} and, at validations, "val_dice"
    initial_val_dice: Optional[float] = None
    best_val_dice: Optional[float] = None
    best_step: int = 0
    train_items: List[Item] = field(default_factory=list)
    val_items: List[Item] = field(default_factory=list)


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

    def mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor) / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# --------------------------------------------------------------------------------------------- batches
def split_items(cases: Sequence[LabelledCase], val_fraction: float, seed: int) -> Tuple[List[Item], List[Item]]:
    """Hold out a seeded fraction of the (volume, structure) pairs for validation (at least one is kept)."""
    items = [(c, s) for c, case in enumerate(cases) for s in range(len(case.structures))]
    if val_fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    held = max(1, int(round(val_fraction * len(items))))
    held = min(held, len(items) - 1)
    return [items[i] for i in sorted(order[held:])], [items[i] for i in sorted(order[:held])]


def draw_batch(cases: Sequence[LabelledCase], items: Sequence[Item], step: int, batch_size: int, seed: int,
               model_shape: Sequence[int], settings: PromptSettings) -> List[PromptedSample]:
    """The global batch of a step: one prompt kind for the whole batch (the model takes a batch of one kind)."""
    rng = np.random.default_rng([seed, step])
    kind = PROMPT_KINDS[int(rng.integers(len(PROMPT_KINDS)))]
    batch = []
    for _ in range(batch_size):
        for _ in range(MAX_DRAWS):
            c, s = items[int(rng.integers(len(items)))]
            case = cases[c]
            view = "zoom-in" if rng.random() < settings.zoom_in_probability else "zoom-out"
            sample = simulate(case.image, case.mask(case.structures[s]), case.structures[s].name, kind, view,
                              model_shape, rng, settings)
            if sample is not None:
                sample.context_rows = case.structures[s].term.context.rows()
                batch.append(sample)
                break
        else:
            raise InputError(f"could not draw a training sample from {len(items)} structure(s) in {MAX_DRAWS} "
                             f"tries: the structures are too small for the model input")
    return batch


def validation_batches(cases: Sequence[LabelledCase], items: Sequence[Item], model_shape: Sequence[int],
                       settings: PromptSettings, seed: int) -> List[List[PromptedSample]]:
    """Fixed validation samples: each held-out structure with each prompt kind on the zoom-out view."""
    batches = []
    for kind in VALIDATION_KINDS:
        rng = np.random.default_rng([seed, 7919])
        batch = []
        for c, s in items:
            case, structure = cases[c], cases[c].structures[s]
            sample = simulate(case.image, case.mask(structure), structure.name, kind, "zoom-out", model_shape,
                              rng, settings)
            if sample is not None:
                sample.context_rows = structure.term.context.rows()
                batch.append(sample)
        if batch:
            batches.append(batch)
    return batches


@dataclass
class ModelInputs:
    image: torch.Tensor
    target: torch.Tensor
    text: Optional[torch.Tensor]
    points: Optional[Tuple[torch.Tensor, torch.Tensor]]
    boxes: Optional[torch.Tensor]
    context: torch.Tensor


def collate(samples: Sequence[PromptedSample], text_embeddings: Dict[str, torch.Tensor],
            device: torch.device) -> ModelInputs:
    image = torch.from_numpy(np.stack([s.image for s in samples]))[:, None].to(device)
    target = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None].to(device)
    text = torch.stack([text_embeddings[s.name] for s in samples]).to(device) if samples[0].uses_text else None
    boxes = torch.from_numpy(np.stack([s.box for s in samples])).to(device) if samples[0].box is not None else None
    points = None
    if samples[0].points is not None:
        n = max(len(s.points) for s in samples)
        coords = torch.zeros(len(samples), n, 3)
        labels = torch.full((len(samples), n), -1, dtype=torch.long)     # -1: padding point
        for b, s in enumerate(samples):
            coords[b, :len(s.points)] = torch.from_numpy(s.points)
            labels[b, :len(s.points)] = torch.from_numpy(s.point_labels)
        points = (coords.to(device), labels.to(device))
    context = torch.tensor([s.context_rows for s in samples], dtype=torch.long)
    return ModelInputs(image, target, text, points, boxes, context)


class PromptedSegmentation(nn.Module):
    """image + prompts -> logits, through the model's own encode/decode (what DDP wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, text=None, points=None, boxes=None):
        return self.model.decode(self.model.encode_image(image), text, points=points, boxes=boxes)


# ---------------------------------------------------------------------------------------------- trainer
# Parameter-name prefixes of each trainable set. The frozen text tower never trains (FROZEN_ALWAYS).
TRAINABLE_SETS: Dict[str, Tuple[str, ...]] = {
    "experts": ("conmoae.",),                        # MedSegX's ConMoAE: experts, gates, context tables
    "experts+decoder": ("conmoae.", "mask_decoder."),
    "decoder": ("mask_decoder.",),
    "all": ("",),
}
FROZEN_ALWAYS = ("text_encoder.sentence_model.", "text_encoder.clip.")


def trainable_set(settings: "FinetuneSettings") -> str:
    if settings.trainable is None:
        return "experts+decoder" if settings.train_decoder else "experts"
    if settings.trainable not in TRAINABLE_SETS:
        raise InputError(f"unknown trainable set {settings.trainable!r}; choose from {', '.join(TRAINABLE_SETS)}")
    return settings.trainable


def trainable_prefixes(settings: "FinetuneSettings") -> Tuple[str, ...]:
    return TRAINABLE_SETS[trainable_set(settings)]


def is_trainable(name: str, prefixes: Sequence[str]) -> bool:
    return name.startswith(tuple(prefixes)) and not name.startswith(FROZEN_ALWAYS)


def prepare_model(model: nn.Module, settings: FinetuneSettings) -> ConMoAE:
    """Attach experts (if the model has none yet) and freeze everything but the trainable set."""
    experts = getattr(model, "conmoae", None)
    if experts is None:
        with torch.random.fork_rng(devices=[]):     # the experts' initialisation is part of what --seed fixes
            torch.manual_seed(settings.seed)
            experts = attach_experts_to_model(model, settings.conmoae_config())
    prefixes = trainable_prefixes(settings)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_trainable(name, prefixes))
    return experts


def trainable_state(model: nn.Module, prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_trainable(k, prefixes)}


def evaluate(model: nn.Module, experts: ConMoAE, batches: Sequence[Sequence[PromptedSample]],
             text_embeddings: Dict[str, torch.Tensor], device: torch.device) -> float:
    """Mean hard Dice over the validation samples (eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for batch in batches:
            inputs = collate(batch, text_embeddings, device)
            with experts.context(inputs.context):
                logits = model.decode(model.encode_image(inputs.image), inputs.text, points=inputs.points,
                                      boxes=inputs.boxes)
            scores.append(dice_score(logits, inputs.target).cpu())
    model.train(was_training)
    return float(torch.cat(scores).mean()) if scores else float("nan")


def finetune(model: nn.Module, cases: Sequence[LabelledCase], settings: FinetuneSettings,
             validation_cases: Sequence[LabelledCase] = (), state_path: Optional[Path] = None,
             resume: bool = False, device: Optional[torch.device] = None, distributed: Optional[Distributed] = None,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> FinetuneResult:
    """Train the experts in place; on return the model holds the best validated state (or the last one when
    there is no validation). ``state_path``: training state written at every validation (for ``resume``)."""
    device = device or torch.device("cpu")
    distributed = distributed or Distributed()
    if settings.batch_size % distributed.world_size:
        raise InputError(f"--batch-size {settings.batch_size} is the global batch; it must be a multiple of the "
                         f"{distributed.world_size} processes")
    model.to(device)
    experts = prepare_model(model, settings)
    prefixes = trainable_prefixes(settings)
    model_shape = tuple(model.config.image_size)

    all_cases = list(cases) + list(validation_cases)
    if validation_cases:
        train_items = [(c, s) for c, case in enumerate(cases) for s in range(len(case.structures))]
        val_items = [(len(cases) + c, s) for c, case in enumerate(validation_cases)
                     for s in range(len(case.structures))]
    else:
        train_items, val_items = split_items(cases, settings.val_fraction, settings.seed)
    result = FinetuneResult(train_items=train_items, val_items=val_items)

    names = sorted({s.name for case in all_cases for s in case.structures})
    with torch.no_grad():
        text_embeddings = {name: emb for name, emb in zip(names, model.encode_text(names).detach().cpu())}
    val_batches = validation_batches(all_cases, val_items, model_shape, settings.prompts, settings.seed)

    parameters = [p for n, p in model.named_parameters() if is_trainable(n, prefixes)]
    optimiser = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    step_module: nn.Module = PromptedSegmentation(model)
    if distributed.world_size > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=prefixes != TRAINABLE_SETS["experts"])   # a box-only step leaves text layers unused
    loss_function = dice_bce_loss()

    start = 0
    best = None
    if resume and state_path is not None and Path(state_path).is_file():
        start, best = _load_training_state(Path(state_path), model, optimiser, result, prefixes)
    if distributed.is_main and val_batches and result.initial_val_dice is None:
        result.initial_val_dice = evaluate(model, experts, val_batches, text_embeddings, device)

    model.train()
    per_rank = settings.batch_size // distributed.world_size
    for step in range(start, settings.steps):
        check(cancel)
        batch = draw_batch(all_cases, train_items, step, settings.batch_size, settings.seed, model_shape,
                           settings.prompts)
        mine = batch[distributed.rank * per_rank:(distributed.rank + 1) * per_rank]
        inputs = collate(mine, text_embeddings, device)
        torch.manual_seed(settings.seed * 1_000_003 + step * 101 + distributed.rank)   # expert dropout
        optimiser.zero_grad(set_to_none=True)
        with experts.context(inputs.context):
            logits = step_module(inputs.image, inputs.text, inputs.points, inputs.boxes)
        loss = loss_function(logits, inputs.target)
        loss.backward()
        optimiser.step()
        record = {"step": step + 1, "loss": distributed.mean(float(loss.detach()))}
        last = step + 1 == settings.steps
        if (last or (step + 1) % settings.val_every == 0) and distributed.is_main:
            if val_batches:
                record["val_dice"] = evaluate(model, experts, val_batches, text_embeddings, device)
                if result.best_val_dice is None or record["val_dice"] > result.best_val_dice:
                    result.best_val_dice, result.best_step = record["val_dice"], step + 1
                    best = trainable_state(model, prefixes)
        result.history.append(record)
        if (last or (step + 1) % settings.val_every == 0) and distributed.is_main and state_path is not None:
            _save_training_state(Path(state_path), model, optimiser, result, prefixes, step + 1, best, settings)
        report(progress, (step + 1) / settings.steps, f"step {step + 1}/{settings.steps} loss {record['loss']:.4f}"
               + (f" val Dice {record['val_dice']:.3f}" if "val_dice" in record else ""))
    distributed.barrier()
    if best is not None:
        model.load_state_dict(best, strict=False)
    model.eval()
    return result


def structures_record(cases: Sequence[LabelledCase]) -> List[Dict]:
    seen: Dict[str, Dict] = {}
    for case in cases:
        for structure in case.structures:
            seen.setdefault(structure.name, {"name": structure.name, "path": list(structure.term.path),
                                             "context": list(structure.term.context.rows())})
    return list(seen.values())


def write_pack(path: Path, model: nn.Module, settings: FinetuneSettings, base_sha256: str,
               cases: Sequence[LabelledCase], result: FinetuneResult, overwrite: bool = False) -> Path:
    extra = {"settings": _settings_record(settings), "best_val_dice": result.best_val_dice,
             "initial_val_dice": result.initial_val_dice, "best_step": result.best_step,
             "model_config": model.config.to_dict() if hasattr(model.config, "to_dict") else None}
    if trainable_set(settings) not in ("experts", "experts+decoder"):
        raise InputError(f"an expert pack holds experts (and optionally the decoder); a '{settings.trainable}' "
                         f"fine-tune changes the base model itself and is not saved as a pack")
    return save_expert_pack(path, model, trainable_prefixes(settings), base_sha256,
                            structures_record(cases), extra, overwrite=overwrite)


def base_sha256(model: nn.Module) -> str:
    return weights_sha256(base_state(model))


# ------------------------------------------------------------------------------------- training state
def _settings_record(settings: FinetuneSettings) -> Dict:
    return json.loads(json.dumps(asdict(settings)))


def _save_training_state(path: Path, model, optimiser, result: FinetuneResult, prefixes, step: int,
                         best: Optional[Dict[str, torch.Tensor]], settings: FinetuneSettings) -> None:
    """Trainable tensors, AdamW moments and the best state as safetensors; counters as metadata (no pickle)."""
    from safetensors.torch import save_file

    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in trainable_state(model, prefixes).items()}
    if best is not None:
        tensors.update({f"best/{k}": v.cpu().contiguous() for k, v in best.items()})
    optimiser_state = optimiser.state_dict()
    for index, state in optimiser_state["state"].items():
        for key, value in state.items():
            tensors[f"optim/{index}/{key}"] = torch.as_tensor(value).cpu().contiguous()
    metadata = {"step": str(step), "param_groups": json.dumps(optimiser_state["param_groups"]),
                "result": json.dumps({k: v for k, v in asdict(result).items()}),
                "settings": json.dumps(_settings_record(settings))}
    temp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(temp), metadata=metadata)
    os.replace(temp, path)


def _load_training_state(path: Path, model, optimiser, result: FinetuneResult, prefixes
                         ) -> Tuple[int, Optional[Dict[str, torch.Tensor]]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if "step" not in metadata:
        raise WeightsError(f"{path}: not a medsegx fine-tuning state file")
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    own = trainable_state(model, prefixes)
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
    saved = json.loads(metadata["result"])
    for key, value in saved.items():
        if key in ("train_items", "val_items"):
            continue
        setattr(result, key, value)
    best = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    return int(metadata["step"]), best
