"""What a predictor keeps between prompts on one volume, so that a new click re-runs only what it changes.

One store with one byte budget, cleared when the volume changes. It holds four kinds of entries:

* ``ZOOM_OUT`` embeddings, one per ConMoAE context (with experts the embedding depends on the anatomy the text
  names; without, there is one, under ``None``);
* ``TEXT`` embeddings, per canonical structure name;
* ``WINDOW`` embeddings, per (context, what the window reads); under reduced precision the predictor keeps them as
  ``PackedEmbedding`` (int8, half of bf16);
* ``DECODED`` low-resolution window logits, per (window, text, exact window prompts).

Zoom-out and text entries are few and small and every prompt needs them: they count against the budget but are
never evicted. Window embeddings and decoded windows grow with the region of interest; they are evicted least
recently used first, but never one the current call already used: when a region has more windows than the budget
holds, keeping the first ones beats evicting each before the next prompt needs it again.

The budget is either fixed (``budget_bytes``) or automatic: before the windows of a call run, the predictor tells
the cache what the whole region needs (``fit``), and the budget becomes that much, at least ``AUTO_FLOOR_BYTES``
and at most the cap (``AUTO_CAP_BYTES``, and never more than a quarter of the machine's memory). So a click on a
region that fits within the cap re-encodes nothing, and a small region does not hold a large budget.

Callers ``get`` and ``put`` tensors under a key (or pass a function that computes a missing zoom-out or text
embedding); the store never calls the model itself.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Dict, Hashable, Optional

import torch

ZOOM_OUT, TEXT, WINDOW, DECODED = "zoom-out", "text", "window", "decoded"
PINNED = (ZOOM_OUT, TEXT)

AUTO_FLOOR_BYTES = 192 << 20
# SegVol's widths in bf16: a window embedding is 1.6 MB packed (int8) and its decoded logits 0.5 MB, so 1 GB keeps
# about 480 windows: a 512x512 CT of some 850 slices that is all region of interest.
AUTO_CAP_BYTES = 1024 << 20


def tensor_bytes(tensor) -> int:
    """Bytes of a tensor, or of a ``PackedEmbedding``'s parts."""
    if isinstance(tensor, PackedEmbedding):
        return tensor_bytes(tensor.values) + tensor_bytes(tensor.scales)
    return tensor.numel() * tensor.element_size()


class PackedEmbedding:
    """An image embedding (1, C, d, h, w) kept as int8 with one float32 scale per token (absmax over the C
    channels): half of bf16, a quarter of float32. Used for window embeddings under reduced precision only
    (``pack``), where the predictor decodes every window from the unpacked values, so a window gives the same
    logits whether its embedding was just computed or came from the cache."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.values, self.scales, self.dtype = values, scales, dtype

    @classmethod
    def pack(cls, embedding: torch.Tensor) -> "PackedEmbedding":
        scales = embedding.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        values = torch.round(embedding.float() / scales).to(torch.int8)
        return cls(values, scales, embedding.dtype)

    @staticmethod
    def size_of(channels: int, tokens: int) -> int:
        """Bytes of a packed embedding of ``channels`` x ``tokens``: int8 values and a float32 scale per token."""
        return channels * tokens + 4 * tokens

    def unpack(self) -> torch.Tensor:
        return (self.values.float() * self.scales).to(self.dtype)

    def to(self, device) -> "PackedEmbedding":
        return PackedEmbedding(self.values.to(device), self.scales.to(device), self.dtype)


def auto_cap_bytes() -> int:
    """The automatic budget's cap: ``AUTO_CAP_BYTES``, or a quarter of physical memory if that is less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # not on every platform (Windows)
        return AUTO_CAP_BYTES
    return min(AUTO_CAP_BYTES, physical // 4)


class EmbeddingCache:
    """The per-volume store of a predictor. ``budget_bytes`` None = automatic (see the module docstring)."""

    def __init__(self, budget_bytes: Optional[int] = None, cap_bytes: Optional[int] = None):
        self.automatic = budget_bytes is None
        self.cap_bytes = int(cap_bytes if cap_bytes is not None else auto_cap_bytes())
        self.budget_bytes = AUTO_FLOOR_BYTES if self.automatic else int(budget_bytes)
        self.clear()

    def clear(self) -> None:
        self._entries: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()   # (kind, key) -> tensor, LRU first
        self._used: Dict[tuple, int] = {}    # entry -> the call that last used it
        self._call = 0
        self.bytes = 0
        if self.automatic:
            self.budget_bytes = AUTO_FLOOR_BYTES

    # ---- calls and budget ------------------------------------------------------------------------------------
    def begin_call(self) -> None:
        """A new segment() call: entries it uses are not evicted to make room for its later windows."""
        self._call += 1

    def fit(self, region_bytes: int) -> None:
        """The current region needs ``region_bytes`` of window entries: an automatic budget becomes that (plus
        the pinned entries), within the floor and the cap. A fixed budget stays."""
        if not self.automatic:
            return
        pinned = sum(tensor_bytes(t) for (kind, _), t in self._entries.items() if kind in PINNED)
        self.budget_bytes = min(self.cap_bytes, max(AUTO_FLOOR_BYTES, int(region_bytes) + pinned))
        self._evict(0)

    # ---- entries ---------------------------------------------------------------------------------------------
    def get(self, kind: str, key: Hashable) -> Optional[torch.Tensor]:
        entry = (kind, key)
        tensor = self._entries.get(entry)
        if tensor is not None:
            self._entries.move_to_end(entry)
            self._used[entry] = self._call
        return tensor

    def put(self, kind: str, key: Hashable, tensor: torch.Tensor) -> bool:
        """Keep ``tensor`` if the budget makes room for it (pinned kinds always); returns whether it is kept."""
        entry = (kind, key)
        if entry in self._entries:
            self.bytes -= tensor_bytes(self._entries.pop(entry))
        size = tensor_bytes(tensor)
        if kind not in PINNED and not self._evict(size):
            return False
        self._entries[entry] = tensor
        self._used[entry] = self._call
        self.bytes += size
        return True

    def computed(self, kind: str, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The entry, computed (and kept if it fits) when missing."""
        tensor = self.get(kind, key)
        if tensor is None:
            tensor = compute()
            self.put(kind, key, tensor)
        return tensor

    def text(self, text: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.computed(TEXT, text, compute)

    def zoom_out(self, context_key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return self.computed(ZOOM_OUT, context_key, compute)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self._entries if k == kind)

    def forget(self, kind: str) -> None:
        for entry in [e for e in self._entries if e[0] == kind]:
            self.bytes -= tensor_bytes(self._entries.pop(entry))
            del self._used[entry]

    def move_to(self, device: torch.device) -> None:
        """Move the embeddings after the model moved (decoded logits are kept on the CPU anyway)."""
        for entry in list(self._entries):
            if entry[0] != DECODED:
                self._entries[entry] = self._entries[entry].to(device)

    def _evict(self, incoming: int) -> bool:
        """Make room for ``incoming`` bytes, least recently used first and never an entry of this call;
        returns whether there is room."""
        while self.bytes + incoming > self.budget_bytes:
            victim = next((e for e in self._entries
                           if e[0] not in PINNED and self._used[e] != self._call), None)
            if victim is None:
                return False
            self.bytes -= tensor_bytes(self._entries.pop(victim))
            del self._used[victim]
        return True
