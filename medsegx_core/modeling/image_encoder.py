"""The 3D ViT image encoder: MONAI's ViT with SegVol's settings, returning a feature grid.

Parameter names are MONAI's (``patch_embedding.*``, ``blocks.N.*``, ``norm.*``), which are the names in the
published SegVol checkpoints. ``blocks`` are MONAI ``TransformerBlock``s (``x + mlp(norm2(x))``), so ConMoAE can
wrap each block's ``mlp`` without touching this file.
"""
from __future__ import annotations

import torch
from monai.networks.nets import ViT
from torch import nn

from .config import SegVolConfig


class ImageEncoderViT3D(ViT):
    """(B, 1, D, H, W) -> (B, C, D/pd, H/ph, W/pw) (the token grid, channels first)."""

    def __init__(self, config: SegVolConfig):
        enc = config.image_encoder
        super().__init__(
            in_channels=config.in_channels,
            img_size=config.image_size,
            patch_size=config.patch_size,
            hidden_size=enc.hidden_size,
            mlp_dim=enc.mlp_dim,
            num_layers=enc.num_layers,
            num_heads=enc.num_heads,
            proj_type="perceptron",     # rearrange patches to (pd ph pw c) vectors + Linear, as SegVol
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=0.0,
            spatial_dims=3,
            qkv_bias=enc.qkv_bias,
        )
        # MONAI >= 1.x creates a LayerNorm for cross-attention in every block even when cross-attention is off;
        # it is never used and absent from the published (MONAI 0.9) checkpoints, so drop its parameters.
        for block in self.blocks:
            if not block.with_cross_attention:
                block.norm_cross_attn = nn.Identity()
        self.grid = config.embedding_grid

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        tokens = self.patch_embedding(image)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        batch, _, channels = tokens.shape
        return tokens.transpose(1, 2).reshape(batch, channels, *self.grid)
