"""The composite MedSegX 2D model: normalise, encode with context-routed experts, encode the box, decode."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ...data.hierarchy import ContextIndices
from ...errors import InputError
from .config import MedSegX2DConfig
from .image_encoder import ImageEncoderViT2D
from ..mask_decoder_2d import DecoderOutput, MaskDecoder2D
from ..prompt_encoder_2d import PromptEncoder2D

Context = Union[ContextIndices, Sequence[ContextIndices], None]


class MedSegX2D(nn.Module):
    def __init__(self, config: Optional[MedSegX2DConfig] = None):
        super().__init__()
        self.config = config or MedSegX2DConfig()
        self.image_encoder = ImageEncoderViT2D(self.config)
        self.prompt_encoder = PromptEncoder2D(self.config.out_chans, self.config.token_grid, self.config.image_size,
                                              self.config.mask_in_chans)
        # MedSegX's keep-resolution decoder: four 2x steps bring the 16 x 16 tokens back to 256 x 256
        self.mask_decoder = MaskDecoder2D(self.config.out_chans, self.config.mask_decoder, upscaling_stages=4)
        # not in any checkpoint (SAM registers them non-persistent)
        self.register_buffer("pixel_mean", torch.tensor(self.config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(self.config.pixel_std).view(-1, 1, 1), persistent=False)
        self.eval()

    @property
    def conmoae(self):
        return self.image_encoder.conmoae

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) on the 0..255 scale, h, w <= input size -> normalised per channel, zero-padded bottom/right."""
        size = self.config.image_size
        if image.ndim != 4 or image.shape[1] != 3 or max(image.shape[-2:]) > size:
            raise InputError(f"MedSegX takes (B, 3, h, w) images with h, w <= {size} (got {tuple(image.shape)}); "
                             f"resize the slice first")
        image = (image - self.pixel_mean) / self.pixel_std
        return F.pad(image, (0, size - image.shape[-1], 0, size - image.shape[-2]))

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, context: Context = None,
                multimask_output: bool = True, trace: Optional[Dict[str, torch.Tensor]] = None) -> DecoderOutput:
        """image (B, 3, S, S) 0..255; boxes (B, 4) ``[x_min, y_min, x_max, y_max]`` in input pixels; ``context``
        one ContextIndices per sample (None: the unknown rows). ``trace`` receives every intermediate."""
        normalised = self.preprocess(image)
        embedding = self.image_encoder(normalised, context, trace=trace)
        out, sparse, dense, image_pe = self.decode(embedding, boxes, multimask_output)
        if trace is not None:
            trace.update(img_normalized=normalised, image_embedding=embedding, sparse_embeddings=sparse,
                         dense_embeddings=dense, image_pe=image_pe, decoder_tokens_out=out.tokens,
                         decoder_image_out=out.image_tokens, iou_all4=out.iou_all)
        return out

    def encode(self, image: torch.Tensor, context: Context = None) -> torch.Tensor:
        """image (B, 3, S, S) 0..255 -> image embedding (B, D, g, g), routed by ``context``."""
        return self.image_encoder(self.preprocess(image), context)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, multimask_output: bool = True):
        """(decoder output, sparse and dense prompt embeddings, image PE) for boxes (B, 4) in input pixels on an
        embedding from ``encode``: a new box on the same image re-runs only this."""
        sparse, dense = self.prompt_encoder(boxes.to(embedding.device))
        image_pe = self.prompt_encoder.get_dense_pe()
        return self.mask_decoder(embedding, image_pe, sparse, dense, multimask_output), sparse, dense, image_pe
