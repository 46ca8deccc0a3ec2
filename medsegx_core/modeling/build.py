"""SegVol's builder: a configuration (or a preset name) -> a SegVol with freshly initialised weights.

Which builder a model kind uses is the model registry's business (``medsegx_core.registry``: SegVol, MedSegX 2D,
LiteMedSAM); this module builds the one kind it names.
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch

from ..errors import WeightsError
from .config import SegVolConfig, preset
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .segvol import SegVol
from .text_encoder import TEXT_ENCODERS, build_text_encoder


def build_segvol(config: SegVolConfig, empty: bool = False) -> SegVol:
    with torch.device("meta") if empty else contextlib.nullcontext():
        parts = dict(image_encoder=ImageEncoderViT3D(config), prompt_encoder=PromptEncoder3D(config),
                     mask_decoder=MaskDecoder3D(config))
    text_class = TEXT_ENCODERS.get(config.text_encoder.kind)
    with torch.device("meta") if empty and getattr(text_class, "can_build_on_meta", False) \
            else contextlib.nullcontext():
        text_encoder = build_text_encoder(config)
    return SegVol(config, text_encoder=text_encoder, **parts)


def build_model(config_or_preset: Union[SegVolConfig, str], tokenizer=None, empty: bool = False) -> SegVol:
    """Build a model (random weights, eval mode). ``tokenizer``: a tokenizer or a folder of tokenizer files.

    ``empty=True`` builds on the meta device (no memory, no random initialisation: 3 s saved for the official
    widths) for a caller that then adopts every tensor from a checkpoint (``weights.checkpoints.load_state``)
    and calls ``model.restore_buffers()``; parts that read package weights are still built for real."""
    config = preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
    if config.architecture != "segvol":
        raise WeightsError(f"model config {config.name!r}: architecture {config.architecture!r} is not SegVol's; "
                           f"other model kinds are built through medsegx_core.registry")
    model = build_segvol(config, empty)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return model.eval()
