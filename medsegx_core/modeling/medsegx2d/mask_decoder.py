"""MedSegX's keep-resolution mask decoder: SAM's decoder whose upscaling returns to the input resolution.

SAM upsamples the 16x16 image tokens 4x (to 64x64) and its masks are later interpolated; MedSegX upsamples 16x with
four 2x transposed convolutions (width D -> D/4 -> D/8 -> D/16 -> D/32, LayerNorm2d after the first three, GELU
after all four), so the logits come out at 256x256 directly. The two-way transformer is the one of our 3D
decoder (it works on any flattened grid).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..mask_decoder import add_sam_decoder_parts
from ..prompt_encoder import LayerNorm2d
from .config import MedSegX2DConfig

UPSCALING_STAGES = 4   # 16 -> 32 -> 64 -> 128 -> 256


@dataclass
class DecoderOutput:
    logits: torch.Tensor        # (B, 3, S, S) masks of tokens 1..3 (multimask) or (B, 1, S, S) of token 0
    iou_pred: torch.Tensor      # (B, 3) or (B, 1)
    iou_all: torch.Tensor       # (B, 4) IoU head output for every mask token
    tokens: torch.Tensor        # (B, 7, D) two-way transformer token output
    image_tokens: torch.Tensor  # (B, g*g, D) its image-side output


def keep_resolution_upscaling(dim: int) -> nn.Sequential:
    """Indices 0..10 as in the checkpoint: ConvT, LayerNorm2d, GELU (x3), then ConvT, GELU."""
    layers = []
    width = dim
    for stage in range(UPSCALING_STAGES):
        out = dim // 4 if stage == 0 else width // 2
        layers.append(nn.ConvTranspose2d(width, out, kernel_size=2, stride=2))
        if stage < UPSCALING_STAGES - 1:
            layers.append(LayerNorm2d(out))
        layers.append(nn.GELU())
        width = out
    return nn.Sequential(*layers)


class MaskDecoderKeepResolution(nn.Module):
    def __init__(self, config: MedSegX2DConfig):
        super().__init__()
        dim = config.out_chans
        add_sam_decoder_parts(self, dim, config.mask_decoder, lambda: keep_resolution_upscaling(dim),
                              mask_width=dim // 2 ** (UPSCALING_STAGES + 1))

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, multimask_output: bool = True) -> DecoderOutput:
        """image_embeddings (1 or B, D, g, g); image_pe (1, D, g, g); sparse (B, N, D); dense (B, D, g, g)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings.expand(batch, -1, -1, -1) + dense_prompt_embeddings
        _, channels, height, width = src.shape
        hs, image_tokens = self.transformer(src, image_pe.expand(batch, -1, -1, -1), tokens)

        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, channels, height, width))
        hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, up_channels, up_h, up_w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, up_channels, up_h * up_w)).reshape(batch, -1, up_h, up_w)
        iou_all = self.iou_prediction_head(hs[:, 0])
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return DecoderOutput(masks[:, selected], iou_all[:, selected], iou_all, hs, image_tokens)
