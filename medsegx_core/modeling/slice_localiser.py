"""SliceLocaliser: where each named structure lies on a slice, read off LiteMedSAM's frozen slice embedding.

The zoom-out of text prompts on the slice-wise path. LiteMedSAM's TinyViT has seen over a million medical slices
(CT, MR and more); its (256, 64, 64) embedding of a slice already says what tissue lies where. A small head on top
of it, trained here on every labelled volume of the shared data, turns that into one coarse probability map per
structure of its vocabulary (64 x 64, the embedding's grid, which covers the model's 256 x 256 input). The maps of
a volume's slices are stacked and their largest connected blob gives the structure's slices and a box on each,
which LiteMedSAM then segments (``text_localisation.py``). The embedding is the one the box path computes anyway,
so a text prompt encodes each slice once for both stages.

Two coordinate channels (x and y from -1 to 1 across the model input) join the embedding: a slice's features say
"kidney", only the position says which side is the patient's left (slices are in the radiological view).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import torch
from torch import nn

COORDINATE_CHANNELS = 2


@dataclass
class SliceLocaliserConfig:
    structures: Tuple[str, ...]          # canonical hierarchy names, one output map each (the vocabulary)
    embed_dim: int = 256                 # LiteMedSAM's embedding channels
    hidden: int = 64
    dropout: float = 0.1
    name: str = "slice_localiser"

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["structures"] = list(self.structures)
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "SliceLocaliserConfig":
        values = dict(data)
        values["structures"] = tuple(values["structures"])
        return cls(**values)


def _conv_block(channels_in: int, channels_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels_in, channels_out, 3, padding=dilation, dilation=dilation, bias=False),
                         nn.GroupNorm(8, channels_out), nn.GELU())


class SliceLocaliser(nn.Module):
    def __init__(self, config: SliceLocaliserConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden
        self.dropout = nn.Dropout2d(config.dropout)
        self.reduce = nn.Sequential(nn.Conv2d(config.embed_dim + COORDINATE_CHANNELS, hidden, 1, bias=False),
                                    nn.GroupNorm(8, hidden), nn.GELU())
        # dilated convolutions widen the view to about a quarter of the slice: an organ's neighbours tell it apart
        self.context = nn.Sequential(_conv_block(hidden, hidden, 1), _conv_block(hidden, hidden, 2),
                                     _conv_block(hidden, hidden, 4))
        self.head = nn.Conv2d(hidden, len(config.structures), 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, G, G) slice embeddings -> (B, structures, G, G) logits."""
        batch, _, height, width = embedding.shape
        ys = torch.linspace(-1.0, 1.0, height, device=embedding.device, dtype=embedding.dtype)
        xs = torch.linspace(-1.0, 1.0, width, device=embedding.device, dtype=embedding.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coordinates = torch.stack([grid_x, grid_y])[None].expand(batch, -1, -1, -1)
        features = self.reduce(torch.cat([self.dropout(embedding), coordinates], dim=1))
        return self.head(features + self.context(features))

    def index_of(self, name: str) -> int:
        return self.config.structures.index(name)


__all__ = ["SliceLocaliser", "SliceLocaliserConfig"]
