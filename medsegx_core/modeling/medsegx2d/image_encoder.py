"""SAM's 2D ViT image encoder as MedSegX uses it, with ConMoAE experts next to every block's MLP.

Tokens are kept channels-last ``(B, H, W, C)`` as in SAM, so the checkpoint's ``pos_embed (1, H, W, C)`` adds
directly. Blocks alternate windowed attention (14x14 windows over a zero-padded grid, no attention mask: padded
tokens are attended to) with global attention, and add decomposed relative-position terms. The experts are our
model-agnostic ConMoAE (``modeling/conmoae.py``), attached to ``blocks[i].mlp`` through ``attach_experts``: the
MLP's input is the post-norm ``h`` that MedSegX feeds its adapters.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ...data.hierarchy import ContextIndices
from ..conmoae import attach_experts
from ..common import LayerNorm2d, MLPBlock
from .config import MedSegX2DConfig

ENCODER_LN_EPS = 1e-6


def relative_position_rows(table: torch.Tensor, size: int) -> torch.Tensor:
    """(2*size-1, C) table -> (size, size, C): entry [r, r'] is the row for the offset r - r'."""
    if table.shape[0] != 2 * size - 1:
        raise ValueError(f"relative-position table has {table.shape[0]} rows; a {size}-token side needs "
                         f"{2 * size - 1} (resize it when loading the checkpoint)")
    positions = torch.arange(size, device=table.device)
    return table[positions[:, None] - positions[None, :] + size - 1]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions (H and W terms)."""

    def __init__(self, dim: int, num_heads: int, side: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # one table per axis, shared by the heads; ``side`` is the window size or the token grid
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = height * width
        # channel layout [q | k | v], each split into contiguous heads
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, self.head_dim).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + self._relative_positions(q, height, width)
        out = attn.softmax(dim=-1) @ v
        out = out.view(batch, self.num_heads, height, width, self.head_dim).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, dim))

    def _relative_positions(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """q . R_h[r - r'] + q . R_w[c - c'] for every (query, key) pair; SAM uses the unscaled q here."""
        grid_q = q.reshape(-1, height, width, self.head_dim)
        along_h = torch.einsum("nrcd,rkd->nrck", grid_q, relative_position_rows(self.rel_pos_h, height))
        along_w = torch.einsum("nrcd,ckd->nrck", grid_q, relative_position_rows(self.rel_pos_w, width))
        pairs = along_h[..., :, None] + along_w[..., None, :]          # (n, H, W, H', W')
        return pairs.reshape(-1, height * width, height * width)


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nH * nW, window, window, C), zero-padding bottom/right to whole windows."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // window, (width + pad_w) // window
    x = x.view(batch, rows, window, cols, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, channels)


def from_windows(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``to_windows``: reassemble the padded grid and crop it to (B, height, width, C)."""
    window, channels = windows.shape[1], windows.shape[-1]
    rows, cols = -(-height // window), -(-width // window)
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, window, window, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * window, cols * window, channels)[:, :height, :width]


class Block(nn.Module):
    """Pre-norm transformer block; ``window`` 0 means global attention over the whole grid."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window: int, grid: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.attn = Attention(dim, num_heads, window or grid)
        self.norm2 = nn.LayerNorm(dim, eps=ENCODER_LN_EPS)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.GELU)     # ConMoAE hooks here: its input is norm2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window:
            height, width = h.shape[1:3]
            h = from_windows(self.attn(to_windows(h, self.window)), height, width)
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.proj(image).permute(0, 2, 3, 1)          # channels-last token grid


class ImageEncoderViT2D(nn.Module):
    def __init__(self, config: MedSegX2DConfig):
        super().__init__()
        grid, dim = config.token_grid, config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, 3, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, dim))
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_dim,
                  0 if i in config.global_attn_indexes else config.window_size, grid)
            for i in range(config.depth))
        self.neck = nn.Sequential(
            nn.Conv2d(dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans, eps=ENCODER_LN_EPS),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans, eps=ENCODER_LN_EPS),
        )
        self.conmoae = attach_experts(self.blocks, config.conmoae)

    def forward(self, image: torch.Tensor, context: Optional[Sequence[ContextIndices]] = None,
                trace: Optional[Dict[str, object]] = None) -> torch.Tensor:
        """image (B, 3, S, S) normalised -> embedding (B, D, g, g). ``context``: one ContextIndices per sample
        (or one for all); None routes with the "unknown" rows. ``trace``: a dict that receives the
        intermediates (patch embedding, block outputs, routing details) for parity checks."""
        captured: List[torch.Tensor] = []
        hooks = [blk.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
                 for blk in self.blocks] if trace is not None else []
        try:
            with self.conmoae.context(context):
                x = self.patch_embed(image)
                if trace is not None:
                    trace["patch_embed_out"] = x
                x = x + self.pos_embed
                outputs = []
                for blk in self.blocks:
                    x = blk(x)
                    outputs.append(x)
        finally:
            for hook in hooks:
                hook.remove()
        embedding = self.neck(x.permute(0, 3, 1, 2))
        if trace is not None:
            trace["block_out"] = torch.stack(outputs)
            trace.update(self.routing_details(captured, context, image.shape[0]))
        return embedding

    def expert_activation(self) -> torch.Tensor:
        """Gates of the last forward, stacked over the blocks with experts: (n_blocks, B, n_experts)."""
        gates = self.conmoae.last_gates
        return torch.stack([gates[i] for i in self.conmoae.block_indices])

    @torch.no_grad()
    def routing_details(self, mlp_inputs: Sequence[torch.Tensor], context: Optional[Sequence[ContextIndices]],
                        batch: int) -> Dict[str, torch.Tensor]:
        """What each block's router saw and decided, recomputed with the experts' own ``route``."""
        tables = self.conmoae.context_tables
        if context is None:
            rows = tables.unknown_rows().unsqueeze(0)
        else:
            contexts = [context] if isinstance(context, ContextIndices) else list(context)
            rows = torch.tensor([c.rows() for c in contexts], dtype=torch.long)
        embeddings = tables(rows.to(mlp_inputs[0].device).expand(batch, -1))          # (B, 6, E)
        per_block = []
        for experts, index in zip(self.conmoae.experts, self.conmoae.block_indices):
            summary = experts.summarise(mlp_inputs[index])
            per_block.append({**experts.route(embeddings, summary), "image_summary": summary})
        details = {name: torch.stack([block[name] for block in per_block])
                   for name in ("hierarchy_attention", "gate_logits", "gates", "image_summary")}
        details["context_embeddings"] = embeddings.transpose(0, 1)                       # (6, B, E)
        details["expert_activation"] = self.expert_activation()
        return details
