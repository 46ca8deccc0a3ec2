"""TinyViT image encoder as LiteMedSAM uses it (MobileSAM's TinyViT-5M adapted to a 256 x 256 input), with
SAM's neck. Written from the architecture's description; parameter names follow the published checkpoint.

    patch embedding   two 1x1 Conv+BN (3 -> d0/2 -> d0, GELU between): the full 256 x 256 grid is kept
    stage 0           MBConv blocks (1x1 expand x4, 3x3 depth-wise, 1x1 project, residual, GELU), then merging
    stages 1..3       TinyViT blocks: window attention (own LayerNorm, learned bias per head and |offset|),
                      residual, 3x3 depth-wise Conv+BN, residual MLP (own LayerNorm); merging after 1 and 2
    merging           1x1 Conv+BN, GELU, 3x3 depth-wise Conv+BN (stride 2; stride 1 into the last stage, so the
                      grid stays at image/4 = 64), GELU, 1x1 Conv+BN
    neck              1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d, to the 256-wide 64 x 64 embedding

Tokens travel channels-last ``(B, H, W, C)`` between transformer blocks. Convolutions are Conv2d + BatchNorm
(``c`` / ``bn``), BatchNorm in inference mode with the checkpoint's running statistics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .common import LayerNorm2d


@dataclass
class TinyViTConfig:
    image_size: int = 256
    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)      # stage 0 is convolutional: its entry is unused
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)   # likewise
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256

    def __post_init__(self) -> None:
        for key in ("embed_dims", "depths", "num_heads", "window_sizes"):
            setattr(self, key, tuple(int(v) for v in getattr(self, key)))
        stages = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == stages >= 2):
            raise ValueError("TinyViT needs one depth, head count and window size per stage, and two stages at least")
        if self.image_size % 2 ** (stages - 2):
            raise ValueError(f"image size {self.image_size} must be divisible by {2 ** (stages - 2)}")

    def resolution(self, stage: int) -> int:
        """Side of the token grid of ``stage``: halved by each merging but the last."""
        return self.image_size // 2 ** min(stage, len(self.embed_dims) - 2)

    @property
    def embedding_grid(self) -> int:
        return self.resolution(len(self.embed_dims) - 1)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Conv2dBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (``c``, ``bn``: the checkpoint's names)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2), nn.GELU(), Conv2dBN(dim // 2, dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.seq(image)


class MBConv(nn.Module):
    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return self.act(out + x)


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', H / stride, W / stride), channels-first."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


def offset_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index of the learned bias for each pair of positions in a window: the row-major number of the
    absolute offset (|dy|, |dx|), i.e. |dy| * w + |dx| (the order in which the published tables list them)."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return ((rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()).long()


class WindowAttention(nn.Module):
    """Multi-head attention inside a window with a learned bias per head and absolute offset; q, k, v of each
    head sit next to each other in ``qkv``'s output ([q_h | k_h | v_h] per head)."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", offset_index(window), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, L, C) -> (N, L, C); L = window * window."""
        count, length, _ = tokens.shape
        qkv = self.qkv(self.norm(tokens)).view(count, length, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)                      # each (N, heads, L, head_dim)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)          # (heads, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)        # scale head_dim ** -0.5, as trained
        return self.proj(out.transpose(1, 2).reshape(count, length, -1))


class TinyViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = TinyViTMLP(dim, int(dim * mlp_ratio))    # ConMoAE hooks here (h: the mlp's own norm output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) channels-last."""
        batch, height, width, channels = x.shape
        w = self.window
        pad_h, pad_w = (-height) % w, (-width) % w
        # zero-padded to whole windows before the attention's own LayerNorm, as trained (no mask: padded tokens
        # are attended to)
        padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        rows, cols = (height + pad_h) // w, (width + pad_w) // w
        windows = padded.view(batch, rows, w, cols, w, channels).transpose(2, 3).reshape(-1, w * w, channels)
        attended = self.attn(windows).view(batch, rows, cols, w, w, channels).transpose(2, 3)
        attended = attended.reshape(batch, rows * w, cols * w, channels)[:, :height, :width]
        x = x + attended
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class TinyViTMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (``norm``, ``fc1``, ``fc2``)."""

    # The norm sits inside the MLP (the block adds mlp(x), not mlp(norm(x))): ConMoAE's experts take its output,
    # the post-norm tokens MedSegX's adapters see in SAM's blocks (modeling/conmoae.py).
    EXPERT_INPUT = "norm"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the next stage's (B, H', W', C') channels-last tokens."""
        for block in self.blocks:
            x = block(x)
        return self.downsample(x).permute(0, 2, 3, 1)


class TransformerStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, config: TinyViTConfig,
                 downsample: "nn.Module | None"):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, config.mlp_ratio, config.local_conv_size)
                                    for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x


class TinyViT(nn.Module):
    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        dims, last = config.embed_dims, len(config.embed_dims) - 1
        self.patch_embed = PatchEmbed(3, dims[0])

        def merging(stage: int) -> nn.Module:
            # the merging into the last stage keeps the grid (SAM's 64 x 64 embedding)
            return PatchMerging(dims[stage], dims[stage + 1], stride=1 if stage + 1 == last else 2)

        stages = [ConvStage(dims[0], config.depths[0], config.mbconv_expand_ratio, merging(0))]
        for i in range(1, len(dims)):
            stages.append(TransformerStage(dims[i], config.depths[i], config.num_heads[i], config.window_sizes[i],
                                           config, merging(i) if i < last else None))
        self.layers = nn.ModuleList(stages)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, kernel_size=1, bias=False), LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    @property
    def transformer_blocks(self):
        """The TinyViT blocks of stages 1.. (what adapter experts wrap), in order."""
        return [block for stage in self.layers[1:] for block in stage.blocks]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S) -> embedding (B, out_chans, S/4, S/4)."""
        x = self.patch_embed(image)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x.permute(0, 3, 1, 2))
