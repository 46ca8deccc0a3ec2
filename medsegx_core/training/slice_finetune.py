"""Few-shot fine-tuning of a slice-wise model (LiteMedSAM) through the one training loop: the ``finetune`` recipe
(``training/finetune.py``: settings, trainable sets, experts attached and the base frozen, expert packs) with
slices in place of volumes (``slice_samples``: cases read as the predictor reads them, boxes as it gives them).

The arms are the same trainable sets (``loop.TRAINABLE_SETS``): experts, experts+decoder, decoder, all (never
BatchNorm's statistics: ``LiteMedSAM.train`` keeps them). ``finetune.write_pack`` saves the expert arms as packs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..progress import CancelToken, ProgressCallback
from .finetune import FinetuneResult, FinetuneSettings, _run_record, prepare_model, trainable_prefixes
from .loop import Distributed, train_loop
from .sampling import training_items
from .slice_samples import NoTextBranch, SliceCase, SliceSampler


def finetune_slices(model: nn.Module, cases: Sequence[SliceCase], settings: FinetuneSettings,
                    validation_cases: Sequence[SliceCase] = (), state_path: Optional[Path] = None,
                    resume: bool = False, device: Optional[torch.device] = None,
                    distributed: Optional[Distributed] = None, workers: int = 0,
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> FinetuneResult:
    """Train ``model`` (LiteMedSAM) in place on slices of ``cases``; as ``finetune.finetune`` otherwise (the best
    validated state at the end, the training state at every validation)."""
    prefixes = trainable_prefixes(settings)
    prepare_model(model, settings)
    all_cases, train_items, val_items = training_items(cases, validation_cases, settings.val_fraction, settings.seed)
    sampler = SliceSampler(all_cases, model.config.image_size, settings.seed, settings.sampling, items=train_items)
    result = FinetuneResult(train_items=train_items, val_items=val_items)
    return train_loop(model, prefixes, sampler, NoTextBranch(), settings.loop_settings(settings.val_every),
                      validation=sampler.validation_samples(val_items), checkpoint=state_path, resume=resume,
                      run_record={"finetune": _run_record(settings), "samples": "slices"}, device=device,
                      distributed=distributed, workers=workers, progress=progress, cancel=cancel, result=result)
