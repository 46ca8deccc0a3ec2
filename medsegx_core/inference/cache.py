"""What a predictor keeps between prompts on one volume, so that a new click re-runs only what it changes.

Four stores, all cleared together when the volume changes:

* zoom-out embeddings, one per ConMoAE context (with experts the embedding depends on the anatomy the text names;
  without, there is one, under ``None``);
* window embeddings, per (context, what the window reads), least recently used first out, within a byte budget;
* text embeddings, per canonical structure name;
* decoded low-resolution window logits, per (window, exact window prompts), the last ``DECODED_WINDOWS_KEPT``.

Callers pass a key and a function that computes the value when it is missing; the stores never call the model
themselves.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Hashable, Tuple

import torch

# Decoded low-resolution window logits kept (0.5 MB each at SegVol's size).
DECODED_WINDOWS_KEPT = 64


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EmbeddingCache:
    """The per-volume stores of a predictor; ``budget_bytes`` bounds the window embeddings."""

    def __init__(self, budget_bytes: int, decoded_kept: int = DECODED_WINDOWS_KEPT):
        self.budget_bytes = int(budget_bytes)
        self.decoded_kept = int(decoded_kept)
        self.clear()

    def clear(self) -> None:
        self._zoom_out: Dict[Hashable, torch.Tensor] = {}
        self._windows: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._window_bytes = 0
        self._window_used: Dict[Hashable, int] = {}   # window key -> the call that last used it
        self._call = 0
        self._texts: Dict[str, torch.Tensor] = {}
        self._decoded: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()

    def begin_call(self) -> None:
        """A new segment() call: embeddings it uses are not evicted to make room for its later windows."""
        self._call += 1

    def text(self, text: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if text not in self._texts:
            self._texts[text] = compute()
        return self._texts[text]

    def zoom_out(self, context_key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if context_key not in self._zoom_out:
            self._zoom_out[context_key] = compute()
        return self._zoom_out[context_key]

    def window(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, bool]:
        """(embedding, whether it was computed now)."""
        if key in self._windows:
            self._windows.move_to_end(key)
            self._window_used[key] = self._call
            return self._windows[key], False
        embedding = compute()
        size = tensor_bytes(embedding)
        # Least recently used first, but never an embedding this call already used: when a region has more
        # windows than the budget holds, keeping the first ones beats evicting each before the next prompt
        # needs it again.
        while self._window_bytes + size > self.budget_bytes and self._windows:
            oldest = next(iter(self._windows))
            if self._window_used[oldest] == self._call:
                break
            dropped = self._windows.pop(oldest)
            del self._window_used[oldest]
            self._window_bytes -= tensor_bytes(dropped)
        if self._window_bytes + size <= self.budget_bytes:
            self._windows[key] = embedding
            self._window_used[key] = self._call
            self._window_bytes += size
        return embedding, True

    def decoded(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, bool]:
        """(low-resolution logits, whether they were computed now)."""
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key], False
        lowres = compute()
        self._decoded[key] = lowres
        while len(self._decoded) > self.decoded_kept:
            self._decoded.popitem(last=False)
        return lowres, True

    def forget_decoded(self) -> None:
        self._decoded.clear()

    def move_to(self, device: torch.device) -> None:
        """Move the embeddings (decoded logits are kept on the CPU anyway) after the model moved."""
        for store in (self._zoom_out, self._windows, self._texts):
            for key in list(store):
                store[key] = store[key].to(device)
