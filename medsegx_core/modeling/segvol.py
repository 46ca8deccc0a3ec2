"""The composite SegVol model: image encoder + text tower + prompt encoder + mask decoder.

Its API is split so that inference can cache: ``encode_image`` once per window, ``encode_text`` once per prompt
text, then ``decode`` per prompt (cheap). Everything is device/dtype agnostic (no ``.cuda()``), so the caller
may move it anywhere or run it under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PromptError
from .config import SegVolConfig
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D

Points = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class DecoderOutput:
    logits_lowres: torch.Tensor      # (B, 1, 4d, 4h, 4w) mask-decoder output, before the final upsample
    iou_pred: torch.Tensor           # (B, 1) IoU head (computed, unused by SegVol)
    sparse_embeddings: torch.Tensor  # (B, N, C) prompt tokens
    dense_pe: torch.Tensor           # (1, C, d, h, w)


class SegVol(nn.Module):
    def __init__(self, config: SegVolConfig, image_encoder: ImageEncoderViT3D, prompt_encoder: PromptEncoder3D,
                 mask_decoder: MaskDecoder3D, text_encoder: nn.Module):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.text_encoder = text_encoder

    # ---- the cached stages -----------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) in [0, 1] (model-space window) -> image embedding (B, C, d, h, w)."""
        expected = (self.config.in_channels, *self.config.image_size)
        if image.ndim != 5 or tuple(image.shape[1:]) != expected:
            raise PromptError(f"model input has shape {tuple(image.shape)}; the model takes (B, {expected[0]}, "
                              f"{expected[1]}, {expected[2]}, {expected[3]}) windows")
        return self.image_encoder(image)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompt names (e.g. ``["liver"]``; the template is applied here) -> (B, C)."""
        return self.text_encoder(texts)

    def decode(self, image_embedding: torch.Tensor, text_embedding: Optional[torch.Tensor] = None,
               points: Optional[Points] = None, boxes: Optional[torch.Tensor] = None,
               output_size: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
        """Mask logits (B, 1, D, H, W) at ``output_size`` (default: the window size ``config.image_size``).

        points: (coords (B, N, 3) float (d, h, w) model-space voxel indices, labels (B, N) 1 positive, 0 negative,
        -1 padding); boxes: (B, 6) ``[d0, h0, w0, d1, h1, w1]`` inclusive voxel indices."""
        lowres = self.decode_with_details(image_embedding, text_embedding, points, boxes).logits_lowres
        return self.upsample_logits(lowres, output_size)

    def decode_with_details(self, image_embedding: torch.Tensor, text_embedding: Optional[torch.Tensor] = None,
                            points: Optional[Points] = None, boxes: Optional[torch.Tensor] = None
                            ) -> DecoderOutput:
        if points is None and boxes is None and text_embedding is None:
            raise PromptError("no prompt: give a text, a point or a box")
        points, boxes = self._checked_prompts(points, boxes)
        sparse, dense = self.prompt_encoder(points, boxes, text_embedding)
        dense_pe = self.prompt_encoder.get_dense_pe()
        logits_lowres, iou_pred = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=dense_pe.to(image_embedding.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            text_embedding=text_embedding,
            multimask_output=False,
        )
        return DecoderOutput(logits_lowres, iou_pred, sparse, dense_pe)

    def upsample_logits(self, logits_lowres: torch.Tensor,
                        output_size: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
        """Trilinear (align_corners=False) resize of low-resolution logits, as SegVol does."""
        size = tuple(output_size or self.config.image_size)
        return F.interpolate(logits_lowres, size=size, mode="trilinear", align_corners=False)

    def forward(self, image: torch.Tensor, texts: Optional[Sequence[str]] = None,
                points: Optional[Points] = None, boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whole-window convenience: encode and decode in one call; returns logits (B, 1, D, H, W)."""
        text_embedding = self.encode_text(texts) if texts else None
        return self.decode(self.encode_image(image), text_embedding, points, boxes)

    # ---- helpers ---------------------------------------------------------------------------------------
    def set_tokenizer(self, tokenizer_or_folder) -> None:
        self.text_encoder.set_tokenizer(tokenizer_or_folder)

    def restore_buffers(self) -> None:
        """After an empty (meta-device) build filled from a checkpoint: re-create the constant buffers that
        checkpoints do not store, and make sure nothing is left unfilled."""
        self.text_encoder.restore_buffers()
        unfilled = [name for name, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if unfilled:
            raise RuntimeError(f"model tensors left unfilled after loading: {unfilled[:5]}")

    def packaged_state_prefixes(self) -> Tuple[str, ...]:
        """Full state-dict prefixes whose weights come from an installed package, not from checkpoints."""
        return tuple("text_encoder." + p for p in self.text_encoder.packaged_state_prefixes())

    @staticmethod
    def _checked_prompts(points: Optional[Points], boxes: Optional[torch.Tensor]):
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise PromptError("points must be given as (coords (B, N, 3), labels (B, N))")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 3 or tuple(labels.shape) != tuple(coords.shape[:2]):
                raise PromptError(f"points: coords {tuple(coords.shape)} and labels {tuple(labels.shape)} do not "
                                  f"have the shapes (B, N, 3) and (B, N)")
            points = (coords, labels.long())
        if boxes is not None:
            if boxes.ndim == 3 and boxes.shape[1] == 1:
                boxes = boxes[:, 0]
            if boxes.ndim != 2 or boxes.shape[-1] != 6:
                raise PromptError(f"boxes have shape {tuple(boxes.shape)}; expected (B, 6) "
                                  f"[d0, h0, w0, d1, h1, w1]")
        return points, boxes
