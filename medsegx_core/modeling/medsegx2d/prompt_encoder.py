"""SAM's 2D prompt encoder, used by MedSegX with a box only.

A box ``[x_min, y_min, x_max, y_max]`` (inclusive pixel indices in the model's input frame) becomes two corner
tokens: random-Fourier features of the corner centres (``+0.5``, divided by the input size, x pairs with the
Gaussian matrix's first row) plus a learned corner embedding. The dense prompt is ``no_mask_embed`` everywhere.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ...errors import PromptError
from ..prompt_encoder import LayerNorm2d, PositionEmbeddingRandom3D
from .config import MedSegX2DConfig

BOX_CORNER_EMBEDDINGS = (2, 3)   # SAM's point_embeddings: 0/1 negative/positive point, 2/3 box corners


class PositionEmbeddingRandom2D(PositionEmbeddingRandom3D):
    """The same Fourier features on 2D coordinates (x, y) in [0, 1]^2; Gaussian matrix (2, D/2)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__(num_pos_feats, scale)
        self.positional_encoding_gaussian_matrix = scale * torch.randn((2, num_pos_feats))

    def dense(self, grid: Tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        """(D, h, w) encoding of the cell centres of an h x w grid, coordinates (x, y)."""
        h, w = grid
        ones = torch.ones(grid, device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        along_y = (ones.cumsum(dim=0) - 0.5) / h
        along_x = (ones.cumsum(dim=1) - 0.5) / w
        return self._encode(torch.stack([along_x, along_y], dim=-1)).permute(2, 0, 1)

    def from_pixel_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """(B, N, 2) pixel (x, y) -> (B, N, D); ``image_size`` is (h, w) of the model input."""
        h, w = image_size
        coords = coords.float().clone()
        coords[..., 0] = coords[..., 0] / w
        coords[..., 1] = coords[..., 1] / h
        return self._encode(coords)


class PromptEncoder2D(nn.Module):
    def __init__(self, config: MedSegX2DConfig):
        super().__init__()
        dim, grid = config.out_chans, config.token_grid
        self.input_size = (config.image_size, config.image_size)
        self.embedding_grid = (grid, grid)
        self.pe_layer = PositionEmbeddingRandom2D(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.no_mask_embed = nn.Embedding(1, dim)
        # SAM's mask-prompt branch: kept so that SAM/MedSegX checkpoints load as they are; MedSegX never uses it.
        quarter = config.mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2), LayerNorm2d(quarter), nn.GELU(),
            nn.Conv2d(quarter, config.mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(config.mask_in_chans),
            nn.GELU(), nn.Conv2d(config.mask_in_chans, dim, kernel_size=1),
        )

    def get_dense_pe(self) -> torch.Tensor:
        """(1, D, g, g) positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(self.embedding_grid).unsqueeze(0)

    def forward(self, boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """boxes (B, 4) ``[x_min, y_min, x_max, y_max]`` in input pixels -> sparse (B, 2, D), dense (B, D, g, g)."""
        if boxes is None or boxes.ndim != 2 or boxes.shape[-1] != 4:
            shape = None if boxes is None else tuple(boxes.shape)
            raise PromptError(f"MedSegX needs one box [x_min, y_min, x_max, y_max] per image (got {shape})")
        corners = self.pe_layer.from_pixel_coords((boxes.float() + 0.5).reshape(-1, 2, 2), self.input_size)
        first, second = (self.point_embeddings[i].weight for i in BOX_CORNER_EMBEDDINGS)
        sparse = torch.stack([corners[:, 0] + first[0], corners[:, 1] + second[0]], dim=1)
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(boxes.shape[0], -1, *self.embedding_grid)
        return sparse, dense
