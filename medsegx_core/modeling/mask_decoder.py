"""SegVol's 3D mask decoder: two-way transformer, 3D upscaling, hypernetwork masks, text-similarity branch."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .common import MLP
from .config import MaskDecoderConfig, SegVolConfig
from .transformer import TwoWayTransformer


def add_sam_decoder_parts(decoder: nn.Module, dim: int, config: MaskDecoderConfig,
                          upscaling: Callable[[], nn.Module], mask_width: int) -> None:
    """The parts SAM-style decoders share (SegVol's 3D one, MedSegX's keep-resolution 2D one), registered on
    ``decoder`` under the checkpoints' names and in SAM's order (which is also the order their random
    initialisation draws in): two-way transformer, IoU and mask tokens, ``upscaling()``, one hypernetwork MLP per
    mask token (to ``mask_width`` channels), IoU head."""
    decoder.num_mask_tokens = config.num_multimask_outputs + 1
    decoder.transformer = TwoWayTransformer(config.transformer_depth, dim, config.transformer_heads,
                                            config.transformer_mlp_dim, config.attention_downsample_rate)
    decoder.iou_token = nn.Embedding(1, dim)
    decoder.mask_tokens = nn.Embedding(decoder.num_mask_tokens, dim)
    decoder.output_upscaling = upscaling()
    decoder.output_hypernetworks_mlps = nn.ModuleList(
        MLP(dim, dim, mask_width, 3) for _ in range(decoder.num_mask_tokens))
    decoder.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, decoder.num_mask_tokens,
                                      config.iou_head_depth)


class MaskDecoder3D(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.embed_dim
        upscaled_grid = tuple(2 * g for g in config.embedding_grid)
        # The LayerNorm normalises the whole (C/4, 2d, 2h, 2w) block with position-wise affine parameters:
        # this is what the published weights hold, and it ties the decoder to the configured window size.
        add_sam_decoder_parts(self, dim, config.mask_decoder, lambda: nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            nn.LayerNorm((dim // 4, *upscaled_grid)),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        ), mask_width=dim // 8)
        self.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        text_embedding: Optional[torch.Tensor] = None,
        multimask_output: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns low-resolution mask logits (B, M, 4d, 4h, 4w) and IoU predictions (B, M); M = 1 unless
        ``multimask_output`` (then the 3 extra masks)."""
        masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                             dense_prompt_embeddings, text_embedding)
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                      text_embedding=None) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens.to(sparse_prompt_embeddings.dtype), sparse_prompt_embeddings], dim=1)

        # One image embedding may serve a batch of prompts (several texts or clicks on one window).
        if image_embeddings.shape[0] != batch:
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1, -1)
        _, channels, d, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, channels, d, h, w)
        upscaled = self.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                                for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        _, up_channels, ud, uh, uw = upscaled.shape
        upscaled_flat = upscaled.reshape(batch, up_channels, ud * uh * uw)
        masks = (hyper_in @ upscaled_flat).reshape(batch, -1, ud, uh, uw)

        if text_embedding is not None:
            # Text-similarity branch: the projected text vector matched against every upscaled voxel feature.
            text_down = self.txt_align_upscaled_embedding(text_embedding).unsqueeze(1)
            similarity = (text_down @ upscaled_flat).reshape(batch, 1, ud, uh, uw)
            masks = masks + similarity
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
