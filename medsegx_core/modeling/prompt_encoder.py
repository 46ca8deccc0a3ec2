"""SegVol's 3D prompt encoder: points, boxes and a text token become sparse tokens; a dense no-mask prompt.

It is SAM's prompt encoder lifted to 3D, including the quirks the published weights were trained with
(do not "fix" them, the weights depend on them):
* point/box coordinates are (d, h, w) voxel indices in model space, shifted by +0.5, and normalised with
  d / image_size[1] (256) and h / image_size[0] (32): the first two sizes are swapped;
* the dense positional grid puts the H coordinate first, then D, then W;
* points without a box get one padding point (0, 0, 0) labelled -1.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .common import LayerNorm2d
from .config import SegVolConfig


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of coordinates in [0, 1]^3: [sin(2pi (2c-1) G), cos(2pi (2c-1) G)]."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        # Always float32, also under autocast: sine arguments reach hundreds of radians (the official size swap
        # scales h by 8), where bfloat16's 8-bit mantissa would turn the encoding into noise.
        gaussian = self.positional_encoding_gaussian_matrix.float()
        with torch.autocast(device_type=coords.device.type, enabled=False):
            coords = (2 * coords.float() - 1) @ gaussian
            coords = 2 * math.pi * coords
            return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        """(C, d, h, w) encoding of the cell centres of a grid; channel order of the coordinate: (h, d, w)."""
        d, h, w = grid
        ones = torch.ones(grid, device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        along_d = (ones.cumsum(dim=0) - 0.5) / d
        along_h = (ones.cumsum(dim=1) - 0.5) / h
        along_w = (ones.cumsum(dim=2) - 0.5) / w
        encoding = self._encode(torch.stack([along_h, along_d, along_w], dim=-1))
        return encoding.permute(3, 0, 1, 2)

    def from_voxel_coords(self, coords: torch.Tensor, image_size: Tuple[int, int, int],
                          coordinates: str = "segvol") -> torch.Tensor:
        """(B, N, 3) shifted (d, h, w) voxel coordinates -> (B, N, C); see ``PromptEncoderConfig.coordinates``."""
        coords = coords.float()
        d, h, w = coords.unbind(-1)
        if coordinates == "aligned":   # the dense grid's order and scale
            normalised = torch.stack([h / image_size[1], d / image_size[0], w / image_size[2]], dim=-1)
        else:                          # SegVol's: the first two sizes swapped
            normalised = torch.stack([d / image_size[1], h / image_size[0], w / image_size[2]], dim=-1)
        return self._encode(normalised)


def cached_dense_pe(encoder: nn.Module, grid) -> torch.Tensor:
    """``encoder.pe_layer.dense(grid)`` with a batch axis, kept on the encoder until its Gaussian buffer changes (a
    checkpoint load, a move to another device): a function of that buffer alone, needed by every decoder call (once
    per zoom-in window, once per slice)."""
    matrix = encoder.pe_layer.positional_encoding_gaussian_matrix
    # An inference-mode tensor may not enter autograd (training): one entry per mode.
    try:
        version = matrix._version
    except RuntimeError:   # an inference tensor (a model loaded under inference_mode) keeps no version: it cannot change
        version = None
    key = (matrix.device, matrix.data_ptr(), version, torch.is_inference_mode_enabled())
    cached = getattr(encoder, "_dense_pe", None)
    if cached is None or cached[0] != key:
        cached = (key, encoder.pe_layer.dense(grid).unsqueeze(0))
        encoder._dense_pe = cached
    return cached[1]


class PromptEncoder3D(nn.Module):
    def __init__(self, config: SegVolConfig):
        super().__init__()
        dim = config.embed_dim
        self.embed_dim = dim
        self.image_size = config.image_size
        self.coordinates = config.prompt_encoder.coordinates
        if self.coordinates not in ("segvol", "aligned"):
            raise ValueError(f"prompt_encoder.coordinates must be 'segvol' or 'aligned', not {self.coordinates!r}")
        self.image_embedding_size = config.embedding_grid
        self.pe_layer = PositionEmbeddingRandom3D(dim // 2)
        # 0 negative point, 1 positive point, 2 box min corner, 3 box max corner
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, dim)
        mask_chans = config.prompt_encoder.mask_in_chans
        # SAM's 2D mask-input branch: never called by SegVol, kept so the published state dict loads strictly.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_chans // 4, mask_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_chans),
            nn.GELU(),
            nn.Conv2d(mask_chans, dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)
        self.dense_prompts = config.prompt_encoder.dense_prompts
        if self.dense_prompts:
            # Initialised like the other prompt embeddings (N(0, 1)): a zero start would grow only by Adam's
            # ~lr per step and per channel, thousands of steps before the marks stood out against the image
            # tokens (measured: norm 0.26 after 200 steps, against ~10 for the sparse prompt embeddings).
            self.box_cells_embed = nn.Parameter(torch.randn(dim))
            self.click_cells_embed = nn.Parameter(torch.randn(2, dim))    # 0 negative, 1 positive

    def _cell_size(self) -> torch.Tensor:
        return torch.tensor([s / g for s, g in zip(self.image_size, self.image_embedding_size)])

    def _dense_prompt_marks(self, points, boxes, batch: int) -> torch.Tensor:
        """(B, C, d, h, w): the box-cell vector where a box covers an embedding cell (any overlap), plus the
        click vectors at the cells of the clicks (padding points add nothing)."""
        grid = self.image_embedding_size
        device = self.no_mask_embed.weight.device
        dtype = self.no_mask_embed.weight.dtype
        marks = torch.zeros((batch, self.embed_dim, *grid), device=device, dtype=dtype)
        cell = self._cell_size().to(device)
        if boxes is not None:
            lo, hi = boxes[:, :3].float(), boxes[:, 3:].float() + 1.0         # voxel extents [lo, hi + 1)
            covered = []
            for axis, n in enumerate(grid):
                starts = torch.arange(n, device=device, dtype=torch.float32) * cell[axis]
                ends = starts + cell[axis]
                covered.append((starts[None] < hi[:, axis:axis + 1]) & (ends[None] > lo[:, axis:axis + 1]))
            inside = covered[0][:, :, None, None] & covered[1][:, None, :, None] & covered[2][:, None, None, :]
            marks = marks + inside[:, None].to(dtype) * self.box_cells_embed.to(dtype)[None, :, None, None, None]
        if points is not None:
            coords, labels = points
            cells = torch.floor(coords.float() / cell).long()
            upper = torch.tensor(grid, device=device) - 1
            cells = torch.minimum(torch.clamp(cells, min=0), upper)
            for label in (0, 1):
                for b, n in zip(*torch.nonzero(labels == label, as_tuple=True)):
                    d, h, w = cells[b, n].tolist()
                    marks[b, :, d, h, w] = marks[b, :, d, h, w] + self.click_cells_embed[label].to(dtype)
        return marks

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, d, h, w) positional encoding of the image-embedding grid (see ``cached_dense_pe``)."""
        return cached_dense_pe(self, self.image_embedding_size)

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        coords = coords + 0.5  # voxel index -> voxel centre
        if pad:
            coords = torch.cat([coords, coords.new_zeros((coords.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        embedding = self.pe_layer.from_voxel_coords(coords, self.image_size, self.coordinates)
        padding = (labels == -1).unsqueeze(-1)
        embedding = torch.where(padding, self.not_a_point_embed.weight.to(embedding.dtype), embedding)
        embedding = embedding + (labels == 0).unsqueeze(-1) * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1).unsqueeze(-1) * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 3)
        embedding = self.pe_layer.from_voxel_coords(corners, self.image_size, self.coordinates)
        corner_codes = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return embedding + corner_codes

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        text_embedding: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns sparse tokens (B, N, C) ordered [points (+ padding point)] [box corners] [text] and the dense
        prompt (B, C, d, h, w) (the no-mask embedding everywhere)."""
        batch = _batch_size(points, boxes, text_embedding)
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords.float(), labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes.float()))
        if text_embedding is not None:
            parts.append(text_embedding.unsqueeze(1))
        dtype = self.no_mask_embed.weight.dtype  # coordinates were encoded in float32 whatever the model's dtype
        if parts:
            sparse = torch.cat([p.to(dtype) for p in parts], dim=1)
        else:
            sparse = self.no_mask_embed.weight.new_empty((batch, 0, self.embed_dim))
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        if self.dense_prompts and (points is not None or boxes is not None):
            dense = dense + self._dense_prompt_marks(points, boxes, batch)
        return sparse, dense


def _batch_size(points, boxes, text_embedding) -> int:
    if points is not None:
        return points[0].shape[0]
    if boxes is not None:
        return boxes.shape[0]
    if text_embedding is not None:
        return text_embedding.shape[0]
    return 1
