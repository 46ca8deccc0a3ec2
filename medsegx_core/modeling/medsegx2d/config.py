"""Architecture of MedSegX's 2D model; the defaults are the released model (SAM ViT-B at 256x256)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Tuple

from ..config import MaskDecoderConfig
from ..conmoae import ConMoAEConfig


@dataclass
class MedSegX2DConfig:
    image_size: int = 256                     # square model input, pixels
    patch_size: int = 16
    embed_dim: int = 768                      # encoder width
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)   # the other blocks attend inside windows
    window_size: int = 14
    out_chans: int = 256                      # neck width = prompt width = decoder width (D)
    # SAM's decoder (two-way transformer 2 x 8 heads, MLP 2048; IoU head 3 x 256; 3 multimask outputs)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    mask_in_chans: int = 16                   # SAM's mask-prompt branch: MedSegX never feeds it a mask
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    conmoae: ConMoAEConfig = field(default_factory=ConMoAEConfig)   # MedSegX: 4 experts, bottleneck 16, all blocks

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.out_chans % 32:
            # the keep-resolution decoder halves the width four times after a first division by 4: D / 32 at the end
            raise ValueError(f"decoder width {self.out_chans} must be a multiple of 32")
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)

    @property
    def token_grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MedSegX2DConfig":
        """The inverse of ``to_dict`` (JSON lists become the config's tuples)."""
        values = dict(data)
        values["mask_decoder"] = MaskDecoderConfig(**values.get("mask_decoder", {}))
        values["conmoae"] = ConMoAEConfig.from_dict(values.get("conmoae", {}))
        for key in ("global_attn_indexes", "pixel_mean", "pixel_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)
