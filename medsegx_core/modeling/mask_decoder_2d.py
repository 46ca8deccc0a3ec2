"""SAM's 2D mask decoder with configurable upscaling, shared by LiteMedSAM and MedSegX's 2D model.

The image tokens leave the two-way transformer on the embedding grid and are upsampled by ``stages``
stride-2 transposed convolutions (width D -> D/4, then halved; LayerNorm2d after all but the last, GELU after
each): SAM and LiteMedSAM use 2 (64 x 64 tokens -> 256 x 256 logits, a 4x upscaling), MedSegX's keep-resolution
decoder 4 (16 x 16 -> 256 x 256). One hypernetwork MLP per mask token turns its token into weights over the
upscaled channels. Optional text branch (``text_branch``): a projected text vector matched against every upscaled
feature and added to the masks, as SegVol's 3D decoder does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .common import LayerNorm2d
from .config import MaskDecoderConfig
from .mask_decoder import add_sam_decoder_parts


@dataclass
class DecoderOutput:
    logits: torch.Tensor        # (B, 3, S, S) masks of tokens 1..3 (multimask) or (B, 1, S, S) of token 0
    iou_pred: torch.Tensor      # (B, 3) or (B, 1)
    iou_all: torch.Tensor       # (B, 4) IoU head output for every mask token
    tokens: torch.Tensor        # (B, N, D) two-way transformer token output
    image_tokens: torch.Tensor  # (B, g*g, D) its image-side output


def upscaling_width(dim: int, stages: int) -> int:
    """Channels after ``stages`` upscaling steps: D / 4, then halved at each further step."""
    return dim // 2 ** (stages + 1)


def sam_upscaling(dim: int, stages: int) -> nn.Sequential:
    """Indices as in SAM-family checkpoints: [ConvT, LayerNorm2d, GELU] x (stages - 1), then ConvT, GELU."""
    layers = []
    width = dim
    for stage in range(stages):
        out = dim // 4 if stage == 0 else width // 2
        layers.append(nn.ConvTranspose2d(width, out, kernel_size=2, stride=2))
        if stage < stages - 1:
            layers.append(LayerNorm2d(out))
        layers.append(nn.GELU())
        width = out
    return nn.Sequential(*layers)


class MaskDecoder2D(nn.Module):
    def __init__(self, dim: int, config: MaskDecoderConfig, upscaling_stages: int, text_branch: bool = False):
        super().__init__()
        if dim % 2 ** (upscaling_stages + 1):
            raise ValueError(f"decoder width {dim} must be a multiple of {2 ** (upscaling_stages + 1)} for "
                             f"{upscaling_stages} upscaling steps")
        mask_width = upscaling_width(dim, upscaling_stages)
        add_sam_decoder_parts(self, dim, config, lambda: sam_upscaling(dim, upscaling_stages), mask_width)
        self.txt_align_upscaled_embedding = nn.Linear(dim, mask_width) if text_branch else None

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = True,
                text_embedding: Optional[torch.Tensor] = None) -> DecoderOutput:
        """image_embeddings (1 or B, D, g, g); image_pe (1, D, g, g); sparse (B, N, D); dense (B, D, g, g);
        text_embedding (B, D) with the text branch."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1).to(sparse_prompt_embeddings.dtype),
                            sparse_prompt_embeddings], dim=1)
        src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        _, channels, height, width = src.shape
        hs, image_tokens = self.transformer(src, image_pe.expand(batch, -1, -1, -1), tokens)

        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, channels, height, width))
        hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, up_channels, up_h, up_w = upscaled.shape
        upscaled_flat = upscaled.reshape(batch, up_channels, up_h * up_w)
        masks = (hyper_in @ upscaled_flat).reshape(batch, -1, up_h, up_w)
        if text_embedding is not None:
            if self.txt_align_upscaled_embedding is None:
                raise ValueError("this decoder has no text branch (text_branch=False)")
            text_down = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)
            masks = masks + (text_down @ upscaled_flat).reshape(batch, 1, up_h, up_w)
        iou_all = self.iou_prediction_head(hs[:, 0])
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return DecoderOutput(masks[:, selected], iou_all[:, selected], iou_all, hs, image_tokens)
