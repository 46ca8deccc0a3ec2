"""Model registry: a configuration (or a preset name) -> a model with freshly initialised weights.

``config.architecture`` picks the builder, so later architectures register here without touching callers.
"""
from __future__ import annotations

from typing import Callable, Dict, Union

from torch import nn

from ..errors import WeightsError
from .config import SegVolConfig, preset
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .segvol import SegVol
from .text_encoder import build_text_encoder


def build_segvol(config: SegVolConfig) -> SegVol:
    return SegVol(
        config,
        image_encoder=ImageEncoderViT3D(config),
        prompt_encoder=PromptEncoder3D(config),
        mask_decoder=MaskDecoder3D(config),
        text_encoder=build_text_encoder(config),
    )


MODEL_BUILDERS: Dict[str, Callable[[SegVolConfig], nn.Module]] = {"segvol": build_segvol}


def build_model(config_or_preset: Union[SegVolConfig, str], tokenizer=None) -> SegVol:
    """Build a model (random weights, eval mode). ``tokenizer``: a tokenizer or a folder of tokenizer files."""
    config = preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
    if config.architecture not in MODEL_BUILDERS:
        raise WeightsError(f"model config {config.name!r}: unknown architecture {config.architecture!r}; "
                           f"known: {', '.join(MODEL_BUILDERS)}")
    model = MODEL_BUILDERS[config.architecture](config)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    return model.eval()
