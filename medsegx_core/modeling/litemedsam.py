"""LiteMedSAM: TinyViT image encoder, SAM's 2D prompt encoder and SAM's mask decoder (4x upscaling).

The baseline of the CVPR 2024 "MedSAM on Laptop" challenge, distilled from MedSAM (SAM ViT-B fine-tuned on over
a million medical image-mask pairs), 9.8 M parameters, trained with boxes on 256 x 256 slices. Input: (B, 3,
256, 256) in [0, 1] (``inference/slice_preprocessing.py`` makes it from a CT or MR slice); output: low-resolution
logits (B, 1, 256, 256) of the single-mask token, as the published inference uses it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .config import MaskDecoderConfig
from .mask_decoder_2d import DecoderOutput, MaskDecoder2D
from .prompt_encoder_2d import PromptEncoder2D
from .tiny_vit import TinyViT, TinyViTConfig

SAM_UPSCALING_STAGES = 2   # 64 x 64 tokens -> 256 x 256 logits


@dataclass
class LiteMedSAMConfig:
    encoder: TinyViTConfig = field(default_factory=TinyViTConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    mask_in_chans: int = 16
    name: str = "litemedsam"

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def embed_dim(self) -> int:
        return self.encoder.out_chans

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LiteMedSAMConfig":
        values = dict(data)
        values["encoder"] = TinyViTConfig(**values.get("encoder", {}))
        values["mask_decoder"] = MaskDecoderConfig(**values.get("mask_decoder", {}))
        return cls(**values)


class LiteMedSAM(nn.Module):
    def __init__(self, config: Optional[LiteMedSAMConfig] = None):
        super().__init__()
        self.config = config or LiteMedSAMConfig()
        encoder = self.config.encoder
        self.image_encoder = TinyViT(encoder)
        self.prompt_encoder = PromptEncoder2D(encoder.out_chans, encoder.embedding_grid, encoder.image_size,
                                              self.config.mask_in_chans)
        self.mask_decoder = MaskDecoder2D(encoder.out_chans, self.config.mask_decoder, SAM_UPSCALING_STAGES)
        self.eval()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) in [0, 1] -> embedding (B, 256, S/4, S/4)."""
        return self.image_encoder(image)

    def decode(self, embedding: torch.Tensor, boxes: Optional[torch.Tensor] = None,
               points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               multimask_output: bool = False) -> DecoderOutput:
        """Boxes (B, 4) ``[x_min, y_min, x_max, y_max]`` and/or points ((B, N, 2) (x, y), (B, N) labels), in
        input pixels, on an embedding from ``encode`` (1 or B of them): a new prompt re-runs only this."""
        device = embedding.device
        sparse, dense = self.prompt_encoder(None if boxes is None else boxes.to(device),
                                            None if points is None else (points[0].to(device), points[1].to(device)))
        return self.mask_decoder(embedding, self.prompt_encoder.get_dense_pe(), sparse.to(embedding.dtype),
                                 dense.to(embedding.dtype), multimask_output)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) in [0, 1], boxes (B, 4) in input pixels -> low-res logits (B, 1, S, S)."""
        return self.decode(self.encode(image), boxes).logits
