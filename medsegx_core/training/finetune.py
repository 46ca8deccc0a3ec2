"""Few-shot fine-tuning of ConMoAE experts (and optionally the mask decoder) on top of a frozen base model: the
"fine-tune adapter experts" recipe of the one training loop (``training/loop.py``).

What trains: the experts, their gates and the context tables (and the mask decoder with ``train_decoder``),
exactly MedSegX's trainable set; the image encoder, prompt encoder and text tower stay frozen, so the base
weights are unchanged and the result is an expert pack of a few hundred thousand numbers. The other trainable sets
("decoder", "all") are the comparison arms of the few-shot benchmark: their result is the adapted model itself,
not an expert pack.

Samples come from the loop's sampler (``sampling.Sampler``, a pure function of (seed, step, index)) over the
training (volume, structure) pairs; validation (hard Dice of text / box / points prompts on the zoom-out view)
holds out a seeded fraction of the pairs, or runs on separate validation volumes, every ``val_every`` steps, and the
best validated state is what the pack holds. ``medsegx finetune`` reads these settings from a recipe
(``resources/recipes/finetune_experts.json`` by default); ``FinetuneSettings()``'s defaults are that recipe's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import InputError
from ..modeling.conmoae import ConMoAE, ConMoAEConfig, attach_experts_to_model
from ..progress import CancelToken, ProgressCallback
from ..weights.expert_pack import base_state, save_expert_pack, weights_sha256
from .batch import SentenceTable
from .dataset import LabelledCase
from .loop import TRAINABLE_SETS, Distributed, LoopSettings, TrainingResult, set_trainable, train_loop
from .sampling import Item, Sampler, SamplingSettings, training_items

# The sampler of fine-tuning: the user's structures all count the same (the starter's emphasis on the organs the
# benchmarks measure would drown a new structure).
FINETUNE_SAMPLING = SamplingSettings(key_structure_weight=1.0)


@dataclass
class FinetuneSettings:
    steps: int = 200
    batch_size: int = 2                 # global batch (split over the processes)
    lr: float = 5e-4
    experts_lr: Optional[float] = None  # the experts' own peak rate when the decoder trains too (None: lr)
    warmup: int = 0
    weight_decay: float = 0.01
    train_decoder: bool = False
    # Which weights train (loop.TRAINABLE_SETS); None: the experts, plus the mask decoder with ``train_decoder``.
    trainable: Optional[str] = None
    val_fraction: float = 0.25          # of the (volume, structure) pairs, when no validation cases are given
    val_every: int = 25
    seed: int = 0
    n_experts: int = 4
    bottleneck: int = 16
    dropout: float = 0.1
    blocks: Optional[List[int]] = None
    sampling: SamplingSettings = FINETUNE_SAMPLING
    stop_after: Optional[int] = None    # stop after this step (the schedule still spans ``steps``)
    recipe: Optional[Dict] = None       # the recipe that gave these settings (recorded in the pack)

    def conmoae_config(self) -> ConMoAEConfig:
        return ConMoAEConfig(n_experts=self.n_experts, bottleneck=self.bottleneck, dropout=self.dropout,
                             blocks=self.blocks)

    def loop_settings(self, checkpoint_every: int = 0) -> LoopSettings:
        return LoopSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup=self.warmup,
                            weight_decay=self.weight_decay, seed=self.seed, val_every=self.val_every,
                            checkpoint_every=checkpoint_every, stop_after=self.stop_after,
                            experts_lr=self.experts_lr)


@dataclass
class FinetuneResult(TrainingResult):
    train_items: List[Item] = field(default_factory=list)
    val_items: List[Item] = field(default_factory=list)


def trainable_set(settings: FinetuneSettings) -> str:
    if settings.trainable is None:
        return "experts+decoder" if settings.train_decoder else "experts"
    if settings.trainable not in TRAINABLE_SETS:
        raise InputError(f"unknown trainable set {settings.trainable!r}; choose from {', '.join(TRAINABLE_SETS)}")
    return settings.trainable


def trainable_prefixes(settings: FinetuneSettings) -> Tuple[str, ...]:
    return TRAINABLE_SETS[trainable_set(settings)]


def prepare_model(model: nn.Module, settings: FinetuneSettings) -> ConMoAE:
    """Attach experts (if the model has none yet) and freeze everything but the trainable set."""
    experts = getattr(model, "conmoae", None)
    if experts is None:
        with torch.random.fork_rng(devices=[]):     # the experts' initialisation is part of what --seed fixes
            torch.manual_seed(settings.seed)
            experts = attach_experts_to_model(model, settings.conmoae_config())
    set_trainable(model, trainable_prefixes(settings))
    return experts


def _run_record(settings: FinetuneSettings) -> Dict:
    """What decides the result beyond the loop's own settings (a training state resumes only with the same)."""
    loop_fields = {"steps", "batch_size", "lr", "experts_lr", "warmup", "weight_decay", "seed", "val_every",
                   "stop_after", "recipe"}
    record = {k: v for k, v in asdict(settings).items() if k not in loop_fields}
    record["trainable"] = trainable_set(settings)
    return json.loads(json.dumps(record))


def finetune(model: nn.Module, cases: Sequence[LabelledCase], settings: FinetuneSettings,
             validation_cases: Sequence[LabelledCase] = (), state_path: Optional[Path] = None,
             resume: bool = False, device: Optional[torch.device] = None, distributed: Optional[Distributed] = None,
             workers: int = 0, progress: Optional[ProgressCallback] = None,
             cancel: Optional[CancelToken] = None) -> FinetuneResult:
    """Train in place; on return the model holds the best validated state (or the last one when there is no
    validation). ``state_path``: the training state, written at every validation (for ``resume``)."""
    prefixes = trainable_prefixes(settings)
    prepare_model(model, settings)
    all_cases, train_items, val_items = training_items(cases, validation_cases, settings.val_fraction, settings.seed)
    model_shape = tuple(model.config.image_size)
    sampler = Sampler(all_cases, model_shape, settings.seed, settings.sampling, items=train_items)
    texts = SentenceTable.for_model(model, [s.name for case in all_cases for s in case.structures])
    result = FinetuneResult(train_items=train_items, val_items=val_items)
    return train_loop(model, prefixes, sampler, texts, settings.loop_settings(checkpoint_every=settings.val_every),
                      validation=sampler.validation_samples(val_items), checkpoint=state_path, resume=resume,
                      run_record={"finetune": _run_record(settings)}, device=device, distributed=distributed,
                      workers=workers, progress=progress, cancel=cancel, result=result)


def structures_record(cases: Sequence[LabelledCase]) -> List[Dict]:
    seen: Dict[str, Dict] = {}
    for case in cases:
        for structure in case.structures:
            seen.setdefault(structure.name, {"name": structure.name, "path": list(structure.term.path),
                                             "context": list(structure.term.context.rows())})
    return list(seen.values())


def write_pack(path: Path, model: nn.Module, settings: FinetuneSettings, base_sha256: str,
               cases: Sequence[LabelledCase], result: FinetuneResult, overwrite: bool = False) -> Path:
    """The trained experts (and decoder) as an expert pack, with the settings, the recipe and the validation."""
    if trainable_set(settings) not in ("experts", "experts+decoder"):
        raise InputError(f"an expert pack holds experts (and optionally the decoder); a '{settings.trainable}' "
                         f"fine-tune changes the base model itself and is not saved as a pack")
    extra = {"trained_with": "medsegx_core.training.finetune", "recipe": settings.recipe,
             "settings": json.loads(json.dumps(asdict(replace(settings, recipe=None)))),
             "best_val_dice": result.best_val_dice, "initial_val_dice": result.initial_val_dice,
             "best_step": result.best_step, "steps_done": result.steps_done,
             "model_config": model.config.to_dict() if hasattr(model.config, "to_dict") else None}
    return save_expert_pack(path, model, trainable_prefixes(settings), base_sha256,
                            structures_record(cases), extra, overwrite=overwrite)


def base_sha256(model: nn.Module) -> str:
    return weights_sha256(base_state(model))
