"""SAM's 2D prompt encoder, shared by MedSegX's 2D model and LiteMedSAM.

Points and box corners become sparse tokens: random Fourier features of the pixel centre ((x, y) + 0.5,
normalised by the model input's width and height) plus a learned code (0 negative click, 1 positive click,
2 / 3 box corners); clicks without a box get SAM's padding point (label -1, ``not_a_point_embed``). The dense
prompt is ``no_mask_embed`` everywhere: the mask-input branch is kept only so that SAM-family checkpoints load
as they are (neither model feeds it a mask).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import PromptError
from .common import LayerNorm2d
from .prompt_encoder import PositionEmbeddingRandom3D, cached_dense_pe

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
    def __init__(self, embed_dim: int, embedding_grid: int, input_size: int, mask_in_chans: int = 16):
        super().__init__()
        self.input_size = (input_size, input_size)
        self.embedding_grid = (embedding_grid, embedding_grid)
        self.pe_layer = PositionEmbeddingRandom2D(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        quarter = mask_in_chans // 4
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2), LayerNorm2d(quarter), nn.GELU(),
            nn.Conv2d(quarter, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans),
            nn.GELU(), nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )

    def get_dense_pe(self) -> torch.Tensor:
        """(1, D, g, g) positional encoding of the image-embedding grid (see ``cached_dense_pe``)."""
        return cached_dense_pe(self, self.embedding_grid)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords.float() + 0.5      # pixel index -> pixel centre
        if pad:
            coords = torch.cat([coords, coords.new_zeros((coords.shape[0], 1, 2))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        embedding = self.pe_layer.from_pixel_coords(coords, self.input_size)
        padding = (labels == -1).unsqueeze(-1)
        embedding = torch.where(padding, self.not_a_point_embed.weight.to(embedding.dtype), embedding)
        embedding = embedding + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        return embedding + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = self.pe_layer.from_pixel_coords((boxes.float() + 0.5).reshape(-1, 2, 2), self.input_size)
        first, second = (self.point_embeddings[i].weight for i in BOX_CORNER_EMBEDDINGS)
        return torch.stack([corners[:, 0] + first[0], corners[:, 1] + second[0]], dim=1)

    def forward(self, boxes: Optional[torch.Tensor],
                points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """boxes (B, 4) ``[x_min, y_min, x_max, y_max]`` and/or points ((B, N, 2) (x, y), (B, N) labels 1/0), in
        input pixels -> sparse (B, N', D) ordered [points (+ padding point)] [box corners], dense (B, D, g, g)."""
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise PromptError(f"a 2D SAM-family model needs one box [x_min, y_min, x_max, y_max] per image (got "
                              f"{tuple(boxes.shape)})")
        if boxes is None and points is None:
            raise PromptError("a 2D SAM-family model needs a box or clicks")
        parts = []
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        dtype = self.no_mask_embed.weight.dtype
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, *self.embedding_grid)
        return sparse.to(dtype), dense
