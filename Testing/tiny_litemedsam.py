"""A tiny LiteMedSAM (random weights, real architecture) for tests that need the model kind, not its masks: the
config, the model (BatchNorm statistics other than the defaults, so that keeping them is seen) and our weights
folder of it; experts with random weights (a pack that changes the masks)."""
from __future__ import annotations

import torch

from medsegx_core.modeling.config import MaskDecoderConfig
from medsegx_core.modeling.litemedsam import LiteMedSAM, LiteMedSAMConfig
from medsegx_core.modeling.tiny_vit import TinyViTConfig
from medsegx_core.weights import litemedsam as litemedsam_weights
from medsegx_core.weights.store import write_folder


def tiny_config() -> LiteMedSAMConfig:
    encoder = TinyViTConfig(image_size=64, embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2),
                            window_sizes=(7, 7, 7, 7), out_chans=32)
    decoder = MaskDecoderConfig(transformer_depth=1, transformer_heads=2, transformer_mlp_dim=32,
                                iou_head_hidden_dim=16)
    return LiteMedSAMConfig(encoder=encoder, mask_decoder=decoder, mask_in_chans=4, name="tiny")


def tiny_model(seed: int = 0) -> LiteMedSAM:
    torch.manual_seed(seed)
    model = LiteMedSAM(tiny_config())
    with torch.no_grad():     # running statistics other than BatchNorm's defaults, so that keeping them is seen
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def tiny_folder(model, folder):
    record = {"kind": litemedsam_weights.LITEMEDSAM_KIND, "model": model.config.to_dict(),
              "source": {"file": "random tiny LiteMedSAM (tests)"}}
    return write_folder(folder, dict(model.state_dict()), record)


def randomise_experts(model, seed: int = 0, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.conmoae.named_parameters():
            if "adapter_up" in name or "context_tables" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
