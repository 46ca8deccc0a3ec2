"""The one batch definition of the training loop: samples -> model tensors -> low-resolution logits.

* ``collate``: prompted samples (``prompt_simulation.PromptedSample``) -> a ``Batch`` of image and target tensors
  plus the samples' prompts (their arrays released, so a DataLoader worker hands the tensors over through shared
  memory instead of pickling the arrays);
* ``SentenceTable``: the frozen sentence embeddings of every structure name, computed once by the frozen text tower
  (or read from a prepared training set), and the model's trainable projection of them per batch, which is what
  ``model.encode_text`` computes without running the tower at every step;
* ``PromptedSegmentation``: the module the loop steps (and DDP wraps): one encoder pass for the batch (with each
  sample's ConMoAE context when experts are attached), one decode per group of samples with the same prompt kind and
  number of clicks (the decoder takes a batch of one prompt layout), returning the decoder's low-resolution logits.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .prompt_simulation import PromptedSample


@dataclass
class Batch:
    samples: List[PromptedSample]    # prompts, names, routing rows (image and mask released)
    images: torch.Tensor             # (B, 1, D, H, W) float32 in [0, 1]
    targets: torch.Tensor            # (B, 1, D, H, W) float32 in {0, 1}

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.samples, self.images.to(device, non_blocking=True),
                     self.targets.to(device, non_blocking=True))


def collate(samples: Sequence[PromptedSample]) -> Batch:
    images = torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
    targets = torch.from_numpy(np.stack([s.mask for s in samples]))[:, None]
    for sample in samples:
        sample.image = sample.mask = None
    return Batch(list(samples), images, targets)


def sentence_embeddings(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    """(N, width) frozen pooled embeddings of the templated names, as ``model.encode_text`` computes them before
    its trainable projection (``dim_align``)."""
    tower = model.text_encoder
    with torch.no_grad():
        tokens = tower.tokenize(list(names))
        return tower.pooled(tokens["input_ids"], tokens.get("attention_mask")).float().cpu()


class SentenceTable:
    """Frozen sentence embeddings of every structure name (templated as inference does), computed once."""

    def __init__(self, names: Sequence[str], pooled: torch.Tensor):
        self.names = list(names)
        self.index = {name: row for row, name in enumerate(self.names)}
        self.pooled = pooled.float()

    @classmethod
    def for_model(cls, model: nn.Module, names: Sequence[str]) -> "SentenceTable":
        names = sorted(set(names))
        return cls(names, sentence_embeddings(model, names))

    def embed(self, model: nn.Module, names: Sequence[str]) -> torch.Tensor:
        """(B, C): the model's projection of the frozen embeddings (= ``model.encode_text(names)``)."""
        projection = model.text_encoder.dim_align
        if self.pooled.device != projection.weight.device:
            self.pooled = self.pooled.to(projection.weight.device)
        return projection(self.pooled[[self.index[name] for name in names]].to(projection.weight.dtype))


def prompt_tensors(samples: Sequence[PromptedSample], device: torch.device):
    """(points, boxes) for ``SegVol.decode`` of samples with the same kind and number of points, or None where
    they have no such prompt."""
    first = samples[0]
    points = boxes = None
    if first.points is not None:
        coords = torch.from_numpy(np.stack([s.points for s in samples])).to(device)
        labels = torch.from_numpy(np.stack([s.point_labels for s in samples])).to(device)
        points = (coords, labels)
    if first.box is not None:
        boxes = torch.from_numpy(np.stack([s.box for s in samples])).to(device)
    return points, boxes


class PromptedSegmentation(nn.Module):
    """images + prompted samples -> low-resolution logits (B, 1, d, h, w), through the model's own encode/decode."""

    def __init__(self, model: nn.Module, texts: Optional[SentenceTable]):
        super().__init__()
        self.model = model
        self.texts = texts

    def forward(self, images: torch.Tensor, samples: Sequence[PromptedSample]) -> torch.Tensor:
        model = self.model
        experts = getattr(model, "conmoae", None)
        context = (experts.context(torch.tensor([s.context_rows for s in samples], dtype=torch.long))
                   if experts is not None else nullcontext())
        with context:
            embeddings = model.encode_image(images)
        groups: Dict[tuple, List[int]] = defaultdict(list)
        for row, sample in enumerate(samples):
            groups[(sample.kind, 0 if sample.points is None else len(sample.points))].append(row)
        logits: List[Optional[torch.Tensor]] = [None] * len(samples)
        for rows in groups.values():
            group = [samples[row] for row in rows]
            points, boxes = prompt_tensors(group, images.device)
            text = self.texts.embed(model, [s.name for s in group]) if group[0].uses_text else None
            decoded = model.decode_with_details(embeddings[rows], text, points, boxes).logits_lowres
            for row, row_logits in zip(rows, decoded):
                logits[row] = row_logits
        return torch.stack(logits)
