"""ModelRunner: the model on its device, in its precision, with the CUDA out-of-memory fallback.

Every model call of the predictor goes through here, so placement, autocast, the fused kernels and the fallback
live in one place (the policies themselves are in ``device.py``):

* on construction the model moves to the resolved device; under bf16/fp16 its matrix weights are stored in that
  dtype (same results under autocast, half the memory: the model then belongs to this runner);
* every call runs under ``torch.inference_mode`` and the runtime's autocast;
* a CUDA out-of-memory error is told to the user (``medsegx`` logger and progress callback), the model moves to
  the CPU, ``on_move(device)`` lets the owner of cached tensors move them too, and the call is retried once.

Inputs and outputs are numpy arrays and torch tensors in model space (d, h, w); nothing here knows about
volumes, prompts or windows.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .device import (Runtime, cast_matmul_weights, is_out_of_memory, own_storage, release_cuda_memory,
                     release_freed_memory, use_fused_attention, use_matmul_transposed_convolutions, warn)


class ModelRunner:
    """A SegVol-API model (``encode_image``, ``encode_text``, ``decode_with_details``, ``upsample_logits``)
    placed on a device and run in a precision."""

    def __init__(self, model, device: str = "auto", precision: str = "auto", fast_kernels: bool = True):
        self.runtime = Runtime.resolve(device, precision)
        self.model = model.eval().to(self.runtime.device)
        if cast_matmul_weights(self.model, self.runtime.storage_dtype):
            own_storage(self.model)  # so that a checkpoint's memory map (all its float32 pages) can go
        release_freed_memory()   # the float32 weights just replaced
        if fast_kernels:
            use_fused_attention(self.model)
            use_matmul_transposed_convolutions(self.model)
        # Called with the new device after an out-of-memory fallback, for tensors cached elsewhere.
        self.on_move: Callable[[torch.device], None] = lambda device: None

    @property
    def has_experts(self) -> bool:
        return hasattr(getattr(self.model, "conmoae", None), "context")

    def encode_image(self, image: np.ndarray, context=None, progress=None) -> torch.Tensor:
        """Image embedding (1, C, ...) of one model-sized float32 image; see ``encode_images``."""
        return self.encode_images([image], context, progress)

    def encode_images(self, images: Sequence[np.ndarray], context=None, progress=None) -> torch.Tensor:
        """Image embeddings (B, C, ...) of model-sized float32 images, in one batch, under the ConMoAE
        ``context`` when experts are attached; kept in the autocast dtype (the decoder reads them in that
        precision anyway, and caches hold twice as many)."""
        def compute():
            batch = torch.from_numpy(np.ascontiguousarray(np.stack(images)))[:, None].to(self.runtime.device)
            experts = (self.model.conmoae.context(context) if self.has_experts and context is not None
                       else nullcontext())
            with experts:
                embedding = self._run(lambda: self.model.encode_image(batch))
            return embedding.to(self.runtime.storage_dtype)
        embedding = self._guarded(compute, progress)
        release_freed_memory()   # the forward's activations, so they do not add up with the growing caches
        return embedding

    def encode_text(self, text: str) -> torch.Tensor:
        return self._guarded(lambda: self._run(lambda: self.model.encode_text([text])), None)

    def decode(self, embedding: torch.Tensor, text_embedding: Optional[torch.Tensor], points, labels, box,
               progress=None) -> torch.Tensor:
        """Low-resolution logits (1, 1, d, h, w), float32 on the CPU. ``points`` (N, 3) model-space (d, h, w)
        with ``labels`` (N,); ``box`` six numbers or None."""
        return self.decode_many(embedding, text_embedding, np.asarray(points, np.float64).reshape(1, -1, 3),
                                np.asarray(labels).reshape(1, -1), None if box is None else [box], progress)

    def decode_many(self, embeddings: torch.Tensor, text_embedding: Optional[torch.Tensor], points, labels,
                    boxes, progress=None) -> torch.Tensor:
        """Low-resolution logits (B, 1, d, h, w), float32 on the CPU, of B prompt sets on B embeddings in one
        decoder pass. ``points`` (B, N, 3) and ``labels`` (B, N): the same number of points in each set (the
        decoder attends to every token, so sets of different lengths cannot share a pass without changing
        results); ``boxes`` (B, 6) or None; the text embedding is shared."""
        def compute():
            device = self.runtime.device
            batch = embeddings.shape[0]
            point_prompt = None
            if np.asarray(points).size:
                point_prompt = (torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device),
                                torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device))
            box_prompt = None if boxes is None else torch.as_tensor(np.asarray(boxes), dtype=torch.float32,
                                                                    device=device).reshape(batch, 6)
            text = None if text_embedding is None else text_embedding.to(device).expand(batch, -1)
            output = self._run(lambda: self.model.decode_with_details(embeddings.to(device), text,
                                                                      point_prompt, box_prompt))
            return output.logits_lowres.float().cpu()
        return self._guarded(compute, progress)

    def upsample(self, lowres: torch.Tensor, size) -> np.ndarray:
        """Full-resolution logits (float32, ``size``), as SegVol's final trilinear resize."""
        with torch.inference_mode():
            return self.model.upsample_logits(lowres, tuple(size))[0, 0].numpy()

    def describe(self) -> str:
        return self.runtime.describe()

    def call(self, compute: Callable, progress=None):
        """Any model call (``compute()`` uses ``self.model``) under inference mode and the runtime's autocast,
        with the out-of-memory fallback: the entry point of predictors whose model is not SegVol's API."""
        return self._guarded(lambda: self._run(compute), progress)

    # ---- placement --------------------------------------------------------------------------------------------
    def _run(self, compute: Callable):
        with torch.inference_mode(), self.runtime.autocast():
            return compute()

    def _guarded(self, compute: Callable, progress):
        """Run ``compute``; on CUDA out-of-memory, tell the user and continue on the CPU."""
        try:
            return compute()
        except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
            if self.runtime.device.type != "cuda" or not is_out_of_memory(exc):
                raise
        fallback = self.runtime.cpu_fallback()
        warn(f"the GPU ran out of memory; continuing on the CPU ({fallback.describe()}), which is slower", progress)
        self._move_to(fallback)
        return compute()

    def _move_to(self, runtime: Runtime) -> None:
        self.runtime = runtime
        release_cuda_memory()
        self.model.to(runtime.device)
        cast_matmul_weights(self.model, runtime.storage_dtype)
        release_freed_memory()
        self.on_move(runtime.device)
        release_cuda_memory()
