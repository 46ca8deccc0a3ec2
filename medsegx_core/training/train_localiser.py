"""Training the text localiser (``modeling/slice_localiser.py``) on cached slice embeddings.

```python
cases = cached_cases(data_dir, cache_dir, litemedsam, specs, VOCABULARY)   # training/localiser_data.py
localiser, log = train_localiser(cases, recipe)                            # recipe: LocaliserRecipe
save_localiser(folder, localiser, recipe, provenance)                      # safetensors + config.json
```

The encoder stays frozen and its embeddings come from the disk cache, so a step costs the head's forward and
backward only (CPU minutes for the whole run). Each batch draws its slices case by case (each training case as
likely as another, then a slice of it), so a 34-slice MR patient weighs as much as a 112-slice CT. Augmentation
on the embedding grid: a random shift of a few cells (the body lies elsewhere in another field of view) and the
head's channel dropout. Never a left-right flip: the side is what tells the kidneys apart.

Loss: binary cross-entropy on each cell's covered share plus a soft Dice per structure present in the batch, both
over the structures each slice's case teaches only (``known``).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ..errors import InputError
from ..modeling.slice_localiser import SliceLocaliser, SliceLocaliserConfig
from ..progress import CancelToken, ProgressCallback, check, report
from .localiser_data import VARIANTS, CaseSlices

DEFAULT_RECIPE = "text_localiser"            # resources/recipes/text_localiser.json
TRAINER = "medsegx train-localiser"


@dataclass
class LocaliserRecipe:
    steps: int = 800
    batch: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    max_shift: int = 4                    # cells (4 model pixels each)
    dice_weight: float = 1.0
    seed: int = 0
    hidden: int = 64
    dropout: float = 0.1
    held_out_patients: Tuple[str, ...] = ()
    variants: Tuple[str, ...] = ("native",)     # localiser_data.VARIANTS of each case to train on

    @classmethod
    def from_file(cls, name_or_path) -> Tuple["LocaliserRecipe", dict]:
        """(the recipe, its record) from a recipe file in the shipped format (``training/recipes.py``: trainer
        TRAINER, options named as the fields with dashes), by path or by shipped name."""
        from .recipes import load_recipe

        fields = list(cls.__dataclass_fields__)
        recipe = load_recipe(str(name_or_path), TRAINER, [name.replace("_", "-") for name in fields])
        values = {key.replace("-", "_"): value for key, value in recipe.options.items()}
        for name in ("held_out_patients", "variants"):
            if name in values:
                values[name] = tuple(values[name])
        unknown = sorted(set(values.get("variants", ())) - set(VARIANTS))
        if unknown:
            raise InputError(f"recipe {name_or_path}: unknown variants {', '.join(unknown)}; "
                             f"known: {', '.join(VARIANTS)}")
        return cls(**values), recipe.record()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["held_out_patients"] = list(self.held_out_patients)
        data["variants"] = list(self.variants)
        return data


@dataclass
class TrainingLog:
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    cases: List[str] = field(default_factory=list)


def shifted(array: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(..., H, W) moved by (dy, dx) cells, zeros coming in (not wrapped around)."""
    out = torch.zeros_like(array)
    height, width = array.shape[-2:]
    ys, yd = (slice(0, height - dy), slice(dy, height)) if dy >= 0 else (slice(-dy, height), slice(0, height + dy))
    xs, xd = (slice(0, width - dx), slice(dx, width)) if dx >= 0 else (slice(-dx, width), slice(0, width + dx))
    out[..., yd, xd] = array[..., ys, xs]
    return out


def draw_batch(cases: Sequence[CaseSlices], recipe: LocaliserRecipe, generator: np.random.Generator):
    """(embeddings (B, C, G, G) float32, targets (B, V, G, G) float32 shares, known (B, V) bool)."""
    embeddings, targets, known = [], [], []
    for _ in range(recipe.batch):
        case = cases[int(generator.integers(len(cases)))]
        index = int(generator.integers(len(case.slices)))
        embedding = torch.from_numpy(np.asarray(case.embeddings[index], dtype=np.float32))
        target = torch.from_numpy(case.targets[index].astype(np.float32) / 255.0)
        if recipe.max_shift:
            dy, dx = (int(v) for v in generator.integers(-recipe.max_shift, recipe.max_shift + 1, size=2))
            embedding, target = shifted(embedding, dy, dx), shifted(target, dy, dx)
        embeddings.append(embedding)
        targets.append(target)
        known.append(torch.from_numpy(np.asarray(case.known, dtype=bool)))
    return torch.stack(embeddings), torch.stack(targets), torch.stack(known)


def localiser_loss(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                   dice_weight: float = 1.0) -> torch.Tensor:
    """BCE over the known structures of each slice + soft Dice per structure present among them."""
    weight = known[:, :, None, None].float().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weight, reduction="sum")
    bce = bce / weight.sum().clamp(min=1.0)
    probabilities = torch.sigmoid(logits) * weight
    wanted = targets * weight
    intersection = (probabilities * wanted).sum(dim=(0, 2, 3))
    totals = probabilities.sum(dim=(0, 2, 3)) + wanted.sum(dim=(0, 2, 3))
    present = wanted.sum(dim=(0, 2, 3)) > 0
    if not present.any():
        return bce
    dice = 1.0 - (2 * intersection[present] + 1.0) / (totals[present] + 1.0)
    return bce + dice_weight * dice.mean()


def train_localiser(cases: Sequence[CaseSlices], recipe: LocaliserRecipe, structures: Sequence[str],
                    progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None
                    ) -> Tuple[SliceLocaliser, TrainingLog]:
    """A localiser trained on the cases of patients not held out by the recipe."""
    training = [c for c in cases if c.patient not in set(recipe.held_out_patients)]
    if not training:
        raise InputError("no training case left after holding out " + ", ".join(recipe.held_out_patients))
    torch.manual_seed(recipe.seed)
    generator = np.random.default_rng(recipe.seed)
    config = SliceLocaliserConfig(tuple(structures), embed_dim=int(training[0].embeddings.shape[1]),
                                  hidden=recipe.hidden, dropout=recipe.dropout)
    localiser = SliceLocaliser(config)
    optimiser = torch.optim.AdamW(localiser.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    warm_up = max(1, recipe.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / warm_up) * 0.5 * (
        1.0 + np.cos(np.pi * min(1.0, step / max(1, recipe.steps)))))
    log = TrainingLog(cases=[c.key for c in training])
    started = time.perf_counter()
    localiser.train()
    for step in range(recipe.steps):
        check(cancel)
        embeddings, targets, known = draw_batch(training, recipe, generator)
        loss = localiser_loss(localiser(embeddings), targets, known, recipe.dice_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        log.losses.append(float(loss.detach()))
        if step % 20 == 0 or step == recipe.steps - 1:
            recent = float(np.mean(log.losses[-20:]))
            report(progress, (step + 1) / recipe.steps, f"step {step + 1}/{recipe.steps}, loss {recent:.4f}")
    localiser.eval()
    log.seconds = time.perf_counter() - started
    return localiser, log


def samples_hash(cases: Sequence[CaseSlices]) -> str:
    """sha256 over the training samples (targets and a strided sample of the embeddings), case by case."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(case.key.encode())
        digest.update(np.ascontiguousarray(case.targets).tobytes())
        digest.update(np.ascontiguousarray(case.embeddings[:, ::16, ::8, ::8]).tobytes())
    return digest.hexdigest()


def coarse_dice(localiser, case: CaseSlices, threshold: float = 0.5) -> Dict[str, float]:
    """Dice of the localiser's cells against the target cells (share > 0.5) over a case's sampled slices, per
    structure the case labels (present in it)."""
    with torch.inference_mode():
        probabilities = torch.cat([torch.sigmoid(localiser(torch.from_numpy(np.asarray(case.embeddings[i:i + 8],
                                                                                       dtype=np.float32))))
                                   for i in range(0, len(case.slices), 8)]).numpy()
    scores = {}
    for index, name in enumerate(localiser.config.structures):
        truth = case.targets[:, index] > 127
        if not case.known[index] or not truth.any():
            continue
        found = probabilities[:, index] > threshold
        scores[name] = float(2 * (found & truth).sum() / max(found.sum() + truth.sum(), 1))
    return scores


__all__ = ["LocaliserRecipe", "train_localiser", "localiser_loss", "draw_batch", "shifted", "TrainingLog",
           "samples_hash", "coarse_dice", "DEFAULT_RECIPE"]
