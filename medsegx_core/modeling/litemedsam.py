"""LiteMedSAM: TinyViT image encoder, SAM's 2D prompt encoder and SAM's mask decoder (4x upscaling).

The baseline of the CVPR 2024 "MedSAM on Laptop" challenge, distilled from MedSAM (SAM ViT-B fine-tuned on over
a million medical image-mask pairs), 9.8 M parameters, trained with boxes on 256 x 256 slices. Input: (B, 3,
256, 256) in [0, 1] (``inference/slice_preprocessing.py`` makes it from a CT or MR slice); output: low-resolution
logits (B, 1, 256, 256) of the single-mask token, as the published inference uses it.

ConMoAE adapter experts attach to the TinyViT blocks of stages 1-3 (``attach_experts_to_model`` finds
``image_encoder.transformer_blocks``). The training loop (``training/loop.py``) steps volumetric models; LiteMedSAM
speaks its contract with slices as volumes one slice deep: ``encode_image`` (B, 1, 1, S, S), ``decode_with_details``
with the loop's (B, 6) boxes, ``upsample_logits`` (``training/slice_samples.py`` draws such samples).
BatchNorm keeps the checkpoint's statistics in training mode too (``train``): a fine-tuning batch of a few slices
would replace them with its own and change the frozen base.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

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
    def volume_shape(self) -> Tuple[int, int, int]:
        """The model input as the training loop's volumes: one slice of S x S."""
        return (1, self.encoder.image_size, self.encoder.image_size)

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

    def train(self, mode: bool = True) -> "LiteMedSAM":
        """Training mode for everything but BatchNorm, which keeps the checkpoint's running statistics (it
        normalises with them and never updates them, as in inference)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                module.eval()
        return self

    # ---- the training loop's volumetric contract (slices as volumes one slice deep) -------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, S, S) grey slices in [0, 1] (the model input's first channel) -> embedding (B, 256, S/4,
        S/4); the grey is copied to the 3 channels, as ``inference.slice_preprocessing.litemedsam_input`` does."""
        if images.ndim != 5 or tuple(images.shape[1:]) != (1, *self.config.volume_shape):
            raise ValueError(f"LiteMedSAM training input has shape {tuple(images.shape)}; it takes (B, 1, "
                             f"{', '.join(map(str, self.config.volume_shape))}) slices")
        return self.encode(images[:, :, 0].expand(-1, 3, -1, -1))

    def decode_with_details(self, embedding: torch.Tensor, text_embedding: Optional[torch.Tensor] = None,
                            points=None, boxes: Optional[torch.Tensor] = None) -> "SliceDecoderOutput":
        """The loop's decode: boxes (B, 6) ``[d0, h0, w0, d1, h1, w1]`` (d unused) -> low-res logits (B, 1, 1, S,
        S). LiteMedSAM has no text branch (a structure's name only routes the experts) and takes boxes alone
        (its clicks were never trained)."""
        if text_embedding is not None or points is not None or boxes is None:
            raise ValueError("LiteMedSAM trains with a box alone (no text embedding, no clicks)")
        xyxy = boxes[:, [2, 1, 5, 4]]
        output = self.decode(embedding, xyxy)
        return SliceDecoderOutput(output.logits[:, :, None], output.iou_pred)

    def upsample_logits(self, logits_lowres: torch.Tensor,
                        output_size: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
        """The low-res logits are already at the input's size (256 x 256); resized only for another size."""
        size = tuple(output_size or self.config.volume_shape)
        if tuple(logits_lowres.shape[2:]) == size:
            return logits_lowres
        return F.interpolate(logits_lowres, size=size, mode="trilinear", align_corners=False)


@dataclass
class SliceDecoderOutput:
    logits_lowres: torch.Tensor     # (B, 1, 1, S, S)
    iou_pred: torch.Tensor          # (B, 1)
