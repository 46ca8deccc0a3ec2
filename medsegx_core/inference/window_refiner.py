"""The zoom-in windows through the model: which windows run, their cache keys, their batches, and their blend.

For one prompt set on a window plan (``zoom_in.plan_windows``), in the order the predictor calls it:

1. ``refine``: every window's prompts (``zoom_in.window_prompts``); idle windows left out (``zoom_in.is_idle``);
   each window's decoded logits looked up by key (window, context, text, exact window prompts); the missing ones
   decoded in batches of one prompt layout (the decoder attends to every token, so sets with different numbers
   of points do not share a pass), their embeddings looked up by (context, window) and the missing ones encoded
   in one pass and kept int8-packed under reduced precision.
2. ``blend``: the windows' logits upsampled and averaged over the region (``zoom_in.blend_region``), re-blending
   only the rows of windows whose keys changed since the previous call on the same plan.

One refiner serves one volume (``Predictor.set_volume`` makes it); the cache and the runner are the predictor's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..progress import CancelToken, ProgressCallback, check, report
from .cache import DECODED, WINDOW, EmbeddingCache, PackedEmbedding
from .prompt_mapping import CropPrompts
from .runner import ModelRunner
from .zoom import ZoomMaps
from .zoom_in import BlendedRegion, WindowPlan, WindowPrompts, blend_region, is_idle, window_prompts

# Windows per encoder/decoder pass (``window_batch`` None). On a GPU a batch fills the device. On a CPU it does
# not pay: on 2 Zen 4 cores at SegVol's widths in bf16, 4 windows per pass took 2.34 s/window to encode (2.30 one
# at a time) and 0.150 s/window to decode (0.156), and the decoder's transient memory grew from 144 MB to 493 MB
# (/work/runs/p16 scripts, issue 16 note), which the 2 GB target cannot spare.
WINDOW_BATCH = {"cuda": 8, "cpu": 1}


@dataclass(frozen=True)
class WindowResult:
    prompts: WindowPrompts
    logits_lowres: torch.Tensor        # (1, 1, d, h, w) / 4 in h and w, float32
    encoded: bool                      # the window's embedding was computed by this call
    decoded: bool                      # the decoder ran for it in this call
    key: tuple = ()                    # what its logits depend on (window, context, text, window prompts)


class WindowRefiner:
    """The zoom-in windows of one volume through the model, answered from the cache where it holds them."""

    def __init__(self, runner: ModelRunner, cache: EmbeddingCache, crop_reader, maps: ZoomMaps,
                 window: Sequence[int], skip_idle_windows: bool, window_batch: Optional[int] = None):
        """``crop_reader``: the preprocessed foreground crop (``PreprocessedVolume.crop_reader``), read window by
        window; ``window``: the model input size (d, h, w); ``window_batch``: windows per pass, None =
        ``WINDOW_BATCH`` of the device."""
        self.runner, self.cache, self.crop_reader, self.maps = runner, cache, crop_reader, maps
        self.window = tuple(int(n) for n in window)
        self.skip_idle_windows = skip_idle_windows
        self.window_batch = window_batch
        self._last: Optional[BlendedRegion] = None   # the previous call's blend

    def refine(self, plan: WindowPlan, prompts: CropPrompts, coarse_foreground: np.ndarray,
               text_embedding: Optional[torch.Tensor], progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> List[Optional[WindowResult]]:
        """Every window of ``plan`` (None for a skipped idle window), from the cache where it holds them; the
        others are encoded and decoded in batches."""
        window_prompt = [window_prompts(plan, i, prompts, coarse_foreground, self.maps) for i in range(len(plan))]
        run = [i for i in range(len(plan)) if not (
            self.skip_idle_windows and is_idle(plan, i, window_prompt[i], coarse_foreground, self.maps))]
        self.cache.fit(len(plan) * self.entry_bytes())
        found = self._results(plan, run, prompts, window_prompt, text_embedding, progress, cancel)
        return [found.get(i) for i in range(len(plan))]

    def decode_window(self, plan: WindowPlan, index: int, prompts: CropPrompts, coarse_foreground: np.ndarray,
                      text_embedding: Optional[torch.Tensor]) -> WindowResult:
        """Window ``index`` of ``plan`` alone (from the cache when it holds it), skipped or not."""
        window_prompt = {index: window_prompts(plan, index, prompts, coarse_foreground, self.maps)}
        return self._results(plan, [index], prompts, window_prompt, text_embedding, None, None)[index]

    def blend(self, plan: WindowPlan, windows: List[Optional[WindowResult]], mask_crop: np.ndarray,
              logits_crop: Optional[np.ndarray], progress: Optional[ProgressCallback] = None,
              cancel: Optional[CancelToken] = None) -> None:
        """The windows' average written over the region of interest of the crop canvases (``blend_region``)."""
        def readable_logits(index: int) -> Optional[np.ndarray]:
            if windows[index] is None:   # skipped: adds nothing
                return None
            return self.runner.upsample(windows[index].logits_lowres, self.window)[plan.readable(index)[1]]

        keys = [None if w is None else w.key for w in windows]
        previous, self._last = self._last, None   # a cancelled blend leaves nothing half-written to re-use
        self._last = blend_region(plan, keys, readable_logits, mask_crop, logits_crop, previous, progress, cancel)

    def entry_bytes(self) -> int:
        """Bytes one window keeps in the cache: its embedding and one decoded result."""
        config = self.runner.model.config
        tokens = int(np.prod(config.embedding_grid))
        embedding = (config.embed_dim * tokens * 4 if self.runner.runtime.storage_dtype == torch.float32
                     else PackedEmbedding.size_of(config.embed_dim, tokens))
        decoded = int(np.prod(self.window)) // 16 * 4
        return embedding + decoded

    # ---- the model calls, through the cache ---------------------------------------------------------------------
    def _results(self, plan: WindowPlan, indices: Sequence[int], prompts: CropPrompts, window_prompt,
                 text_embedding, progress, cancel) -> Dict[int, WindowResult]:
        # Keys: a window's embedding depends on the experts' context and its image content; its logits also on
        # the text and exactly the prompts the decoder receives.
        window_key = {i: (prompts.context, plan.cache_key(i)) for i in indices}
        decoded_key = {i: window_key[i] + (prompts.text,) + window_prompt[i].cache_key() for i in indices}
        results: Dict[int, WindowResult] = {}
        todo: Dict[tuple, List[int]] = {}   # windows to decode, by what lets them share a decoder pass
        for i in indices:
            lowres = self.cache.get(DECODED, decoded_key[i])
            if lowres is not None:
                results[i] = WindowResult(window_prompt[i], lowres, False, False, decoded_key[i])
            else:
                todo.setdefault((len(window_prompt[i].points), window_prompt[i].box is None), []).append(i)
        size = self.window_batch or WINDOW_BATCH.get(self.runner.runtime.device.type, 1)
        batches = [group[start:start + size] for group in todo.values() for start in range(0, len(group), size)]
        done, total = 0, sum(len(batch) for batch in batches)
        for batch in batches:
            check(cancel)
            report(progress, done / max(total, 1), f"zoom-in windows {done + 1}-{done + len(batch)} of {total}")
            embeddings, encoded = self._embeddings(plan, batch, window_key, prompts.context, progress)
            wps = [window_prompt[i] for i in batch]
            boxes = None if wps[0].box is None else np.stack([wp.box for wp in wps])
            lowres = self.runner.decode_many(embeddings, text_embedding, np.stack([wp.points for wp in wps]),
                                             np.stack([wp.labels for wp in wps]), boxes, progress)
            for i, logits, fresh in zip(batch, lowres, encoded):
                logits = logits[None].clone()   # its own storage: a view would keep the whole batch alive
                self.cache.put(DECODED, decoded_key[i], logits)
                results[i] = WindowResult(window_prompt[i], logits, fresh, True, decoded_key[i])
            done += len(batch)
        return results

    def _embeddings(self, plan: WindowPlan, batch: Sequence[int], window_key, context,
                    progress) -> tuple[torch.Tensor, List[bool]]:
        """The embeddings of windows ``batch`` (B, C, ...), the missing ones encoded in one pass; and which."""
        cached = {i: self.cache.get(WINDOW, window_key[i]) for i in batch}
        missing = [i for i in batch if cached[i] is None]
        if missing:
            fresh = self.runner.encode_images([plan.window_image(self.crop_reader, i) for i in missing], context,
                                              progress)
            for i, embedding in zip(missing, fresh):
                # Under reduced precision windows are kept as int8 (half of bf16: a 512x512x300 CT's whole
                # region fits the memory target); float32 (parity, "official") keeps them as they are.
                kept = embedding[None].clone()
                cached[i] = PackedEmbedding.pack(kept) if kept.dtype != torch.float32 else kept
                self.cache.put(WINDOW, window_key[i], cached[i])
        unpacked = [c.unpack() if isinstance(c, PackedEmbedding) else c for c in (cached[i] for i in batch)]
        return torch.cat(unpacked), [i in missing for i in batch]
