"""Predictor: set a volume once, then segment it with many prompts, answering each from cached embeddings.

In the style of segment-anything's ``SamPredictor``::

    predictor = Predictor(model)                      # device/precision "auto", canonical preprocessing
    predictor.set_volume(volume)                      # preprocess + zoom-out image embedding
    result = predictor.segment(Prompts(text="liver"))
    result = predictor.segment(Prompts(text="liver", points=(PointPrompt(ras), ...)))   # encoder not re-run

One ``segment`` call is SegVol's zoom-out-zoom-in, in steps that are public so that each can be inspected
(the parity tests compare every one with the fixture):

1. ``map_prompts``: the prompts on the preprocessed volume's foreground crop (``inference/prompt_mapping.py``).
2. ``zoom_out``: the whole crop resized to the model input; the prompts decoded on its (cached) embedding;
   coarse logits (``inference/zoom.py``).
3. ``plan_zoom_in``: region of interest from the coarse foreground and the positive clicks; windows over it.
4. ``decode_window`` per window (its prompts from ``inference/zoom_in.py``, its embedding and logits cached),
   blended by ``zoom_in.zoom_in``; the blended region replaces the coarse logits there.
5. threshold; back onto the volume's grid (undoing the canonical reorientation exactly).

The parts: ``inference/runner.py`` runs the model (device, precision, out-of-memory fallback),
``inference/cache.py`` keeps what a new click re-uses, ``inference/zoom_in.py`` owns the windows, their prompts
and the blending. Prompt rules and cache keys are documented in DESIGN.md ("Predictor").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .data.hierarchy import context_indices, guess_modality, resolve_modality, resolve_term
from .data.volume import Volume
from .errors import PromptError
from .inference.cache import DECODED, WINDOW, EmbeddingCache, PackedEmbedding
from .inference.confidence import absence_warning, presence_confidence
from .inference.device import warn
from .inference.preprocessing import PreprocessedVolume, preprocess
from .inference.prompt_mapping import CropPrompts, to_crop
from .inference.runner import ModelRunner
from .inference.zoom import ZoomMaps, foreground
from .inference.zoom_in import WindowPlan, WindowPrompts, is_idle, plan_windows, window_prompts, zoom_in
from .progress import CancelToken, ProgressCallback, check, report, scaled
from .prompts import Prompts
from .weights.expert_pack import use_pack_for

# Logit written outside the foreground crop, where the model never looked (only with return_logits).
OUTSIDE_CROP_LOGIT = -1.0e4
# Windows per encoder/decoder pass (``window_batch`` None). On a GPU a batch fills the device. On a CPU it does
# not pay: on 2 Zen 4 cores at SegVol's widths in bf16, 4 windows per pass took 2.34 s/window to encode (2.30 one
# at a time) and 0.150 s/window to decode (0.156), and the decoder's transient memory grew from 144 MB to 493 MB
# (/work/runs/p16 scripts, issue 16 note), which the 2 GB target cannot spare.
WINDOW_BATCH = {"cuda": 8, "cpu": 1}


@dataclass
class SegmentationResult:
    mask: np.ndarray                   # uint8 (k, j, i) on the input volume's grid, 1 = inside
    name: Optional[str]                # the structure named by the text prompt (canonical name), else None
    logits: Optional[np.ndarray] = None  # float32 (k, j, i) when asked for
    windows: int = 0                   # zoom-in windows over the region of interest
    windows_encoded: int = 0           # of which had to be encoded (the others came from the cache)
    windows_decoded: int = 0           # of which had to be decoded (same window and same window prompts: cached)
    windows_skipped: int = 0           # of which held neither coarse foreground nor a click (default mode only)
    runtime: str = ""                  # e.g. "cpu bf16"
    notes: list = field(default_factory=list)   # warnings given during the call
    confidence: float = 0.0            # presence confidence of the coarse pass (inference/confidence.py)


@dataclass(frozen=True)
class CoarseResult:
    """The zoom-out pass of one prompt set, in model space."""

    model_box: Optional[np.ndarray]    # the box prompt as the model received it (d0, h0, w0, d1, h1, w1)
    logits_lowres: torch.Tensor        # (1, 1, d, h, w) / 4 in h and w, float32
    logits: np.ndarray                 # model shape, float32
    foreground: np.ndarray             # model shape, bool


@dataclass(frozen=True)
class WindowResult:
    prompts: WindowPrompts
    logits_lowres: torch.Tensor        # (1, 1, d, h, w) / 4 in h and w, float32
    encoded: bool                      # the window's embedding was computed by this call
    decoded: bool                      # the decoder ran for it in this call
    key: tuple = ()                    # what its logits depend on (window, context, text, window prompts)


@dataclass(frozen=True)
class LastZoomIn:
    """The zoom-in result of the previous call, so that the next re-blends only the rows of windows it
    changes (a click changes the prompts of a few windows; the others give the same logits)."""

    plan: WindowPlan
    keys: tuple                        # per window: ``WindowResult.key``, None for a skipped window
    mask: np.ndarray                   # uint8, the region of interest of the crop
    logits: Optional[np.ndarray]       # float32, the same region, when that call returned logits


class Predictor:
    """Zoom-out-zoom-in segmentation of one volume at a time with cached image embeddings."""

    def __init__(self, model, device: str = "auto", precision: str = "auto", preprocessing: str = "canonical",
                 cache_megabytes: Optional[float] = None, fast_kernels: bool = True, zoom_in: Optional[bool] = None,
                 skip_idle_windows: Optional[bool] = None, window_batch: Optional[int] = None):
        """``model``: a SegVol-API model (``encode_image``, ``encode_text``, ``decode_with_details``).
        ``precision``: "auto" (bf16/fp16 where the hardware does it fast), "fp32", "bf16", "fp16".
        ``preprocessing``: "canonical" (reorient to RAS+ first) or "official" (voxel order as stored).
        ``cache_megabytes``: room for window embeddings and decoded windows; None = as much as the region of
        interest needs, from 192 MB up to 1 GB (``inference/cache.py``).
        ``fast_kernels``: fused SDPA attention in the encoder and the decoder's non-overlapping transposed
        convolutions as matrix products (same mathematics within the parity tolerance, about 2x faster on CPU).
        Under bf16/fp16 the model's linear/convolution weights are converted to that dtype (the model then
        belongs to this Predictor; give it a copy if you need the float32 weights elsewhere).
        ``zoom_in``: run zoom-in windows over the zoom-out result; None = what the model's config says
        (``SegVolConfig.zoom_in``: True for SegVol, False for the bundled starter model).
        ``skip_idle_windows``: leave out zoom-in windows that hold neither coarse foreground nor a click (they
        add nothing to the blend; voxels only they cover keep the coarse result); None = in canonical
        preprocessing only, so "official" stays SegVol's algorithm.
        ``window_batch``: zoom-in windows per encoder/decoder pass; None = ``WINDOW_BATCH`` of the device."""
        self.runner = ModelRunner(model, device, precision, fast_kernels)
        self.cache = EmbeddingCache(None if cache_megabytes is None else int(cache_megabytes * (1 << 20)))
        self.runner.on_move = self.cache.move_to
        self.preprocessing = preprocessing
        self.window = tuple(int(n) for n in model.config.image_size)
        self.zoom_in = bool(getattr(model.config, "zoom_in", True) if zoom_in is None else zoom_in)
        self.skip_idle_windows = (preprocessing == "canonical") if skip_idle_windows is None else skip_idle_windows
        self.window_batch = window_batch
        self.volume: Optional[Volume] = None
        self.prepared: Optional[PreprocessedVolume] = None
        self.maps: Optional[ZoomMaps] = None
        self._last: Optional[LastZoomIn] = None
        self._volume_note: Optional[str] = None   # a warning about this volume, given with every result

    @property
    def model(self):
        return self.runner.model

    @property
    def runtime(self):
        return self.runner.runtime

    @property
    def has_experts(self) -> bool:
        return self.runner.has_experts

    # ---- volume -----------------------------------------------------------------------------------------
    def set_volume(self, volume: Volume, modality: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> None:
        """Preprocess ``volume`` and (for models without experts) encode its zoom-out view.

        No float copy of the volume is kept: windows are read from ``volume.array`` and normalised as they are
        encoded, so the array must not be changed in place while it is set (replace it and call again)."""
        self.cache.clear()
        self._last = None
        self.volume = None
        name = volume.source or "volume"
        self.prepared = preprocess(volume.array, volume.direction_ras, self.preprocessing, name=name,
                                   progress=scaled(progress, 0.0, 0.4), cancel=cancel)
        self.maps = ZoomMaps.build(self.prepared.cropped_shape, self.window)
        self._zoom_image = self.maps.zoom_out(self.prepared.crop_reader)
        # The experts' routing modality: the caller's, else the file's, else guessed from the intensities, the
        # same rule that labelled the training cases (an "unknown" routing would be one no expert learned).
        given = modality or volume.modality
        self.modality = resolve_modality(given) if given else guess_modality(volume.array)
        # A loaded expert pack applies to volumes of its own modality; the others get the model's own experts.
        self._volume_note = use_pack_for(self.model, self.modality)
        if self._volume_note:
            warn(self._volume_note, progress, 0.4)
        self.volume = volume
        if not self.runner.has_experts:   # the zoom-out embedding does not depend on the prompt: do it now
            report(progress, 0.4, "encoding the zoom-out view")
            self._zoom_embedding(None, progress)
        report(progress, 1.0, "volume ready")

    # ---- segmentation -----------------------------------------------------------------------------------
    def segment(self, prompts: Prompts, return_logits: bool = False, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """Segment the structure the prompts describe (on the volume given to ``set_volume``)."""
        self.cache.begin_call()
        crop_prompts = self.map_prompts(prompts)
        check(cancel)
        report(progress, 0.0, "zoom-out")
        coarse = self.zoom_out(crop_prompts, progress)
        plan = self.plan_zoom_in(coarse, crop_prompts)
        # Is the structure there at all? Judged on the zoom-out pass, the one that sees the whole volume.
        confidence = presence_confidence(coarse.logits, coarse.foreground)
        absent = absence_warning(crop_prompts.text, confidence)

        # The coarse result on the crop; the zoom-in result overwrites the region of interest slab by slab. The
        # crop arrays are views of the full-size outputs, so the result needs no second full-size copy.
        mask_full, mask_crop = self.prepared.working_canvas(np.uint8)
        self.maps.back_to_crop_into(coarse.foreground, mask_crop)
        logits_full = logits_crop = None
        if return_logits:
            logits_full, logits_crop = self.prepared.working_canvas(np.float32, fill=OUTSIDE_CROP_LOGIT)
            self.maps.back_to_crop_into(coarse.logits, logits_crop)
        notes: list = [self._volume_note] if self._volume_note else []
        if absent:
            notes.append(absent)
            warn(absent, progress, 0.05)
        windows: List[Optional[WindowResult]] = []
        if plan is None and not self.zoom_in:
            notes.append("coarse pass only: this model's configuration turns zoom-in off")
        elif plan is None:
            notes.append("the zoom-out result has no foreground: kept it without zooming in (as SegVol does)")
            warn(notes[-1], progress, 0.1)
        else:
            windows = self.refine(plan, crop_prompts, coarse, scaled(progress, 0.1, 0.8), cancel)
            self._blend(plan, windows, mask_crop, logits_crop, scaled(progress, 0.8, 0.95), cancel)

        report(progress, 0.95, "assembling the mask")
        mask = self.prepared.to_stored(mask_full)
        logits = self.prepared.to_stored(logits_full) if return_logits else None
        report(progress, 1.0, "done")
        return SegmentationResult(mask=mask, name=crop_prompts.text, logits=logits,
                                  windows=len(windows), windows_encoded=sum(w.encoded for w in windows if w),
                                  windows_decoded=sum(w.decoded for w in windows if w),
                                  windows_skipped=sum(w is None for w in windows),
                                  runtime=self.runner.describe(), notes=notes, confidence=confidence)

    # ---- the steps of segment() -------------------------------------------------------------------------
    def map_prompts(self, prompts: Prompts) -> CropPrompts:
        """The prompts on the foreground crop: checked (``Prompts.to_voxel``, then the crop's border), the text
        resolved to its canonical structure name and, with experts, its context."""
        if self.volume is None:
            raise PromptError("no volume: call set_volume(volume) before segment(prompts)")
        if not isinstance(prompts, Prompts):
            raise PromptError(f"segment() takes a Prompts object, got {type(prompts).__name__}")
        voxel = prompts.to_voxel(self.volume)
        term = resolve_term(voxel.text) if voxel.text else None
        context = context_indices(term, self.modality) if self.runner.has_experts else None
        return to_crop(prompts, voxel, self.prepared, text=term.name if term else None, context=context)

    def zoom_out(self, prompts: CropPrompts, progress: Optional[ProgressCallback] = None) -> CoarseResult:
        embedding = self._zoom_embedding(prompts.context, progress)
        model_box = None if prompts.box_lo is None else self.maps.box_to_model(prompts.box_lo, prompts.box_hi)
        lowres = self.runner.decode(embedding, self._text_embedding(prompts.text),
                                    self.maps.points_to_model(prompts.points), prompts.labels, model_box, progress)
        logits = self.runner.upsample(lowres, self.window)
        return CoarseResult(model_box, lowres, logits, foreground(logits))

    def plan_zoom_in(self, coarse: CoarseResult, prompts: CropPrompts) -> Optional[WindowPlan]:
        """The zoom-in windows, or None (zoom-in off, or no coarse foreground and no positive click)."""
        return plan_windows(coarse.foreground, self.maps, self.window, prompts) if self.zoom_in else None

    def refine(self, plan: WindowPlan, prompts: CropPrompts, coarse: CoarseResult,
               progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> List[Optional["WindowResult"]]:
        """Every window of ``plan`` (None for a skipped idle window), from the caches where they hold it; the
        others are encoded and decoded in batches."""
        window_prompt = [window_prompts(plan, i, prompts, coarse.foreground, self.maps) for i in range(len(plan))]
        run = [i for i in range(len(plan)) if not (
            self.skip_idle_windows and is_idle(plan, i, window_prompt[i], coarse.foreground, self.maps))]
        self.cache.fit(len(plan) * self._window_entry_bytes())
        found = self._window_results(plan, run, prompts, window_prompt, progress, cancel)
        return [found.get(i) for i in range(len(plan))]

    def decode_window(self, plan: WindowPlan, index: int, prompts: CropPrompts,
                      coarse: CoarseResult) -> WindowResult:
        """Window ``index`` of ``plan``: its prompts and low-resolution logits (from the caches when they hold
        them)."""
        window_prompt = {index: window_prompts(plan, index, prompts, coarse.foreground, self.maps)}
        return self._window_results(plan, [index], prompts, window_prompt, None, None)[index]

    # ---- blending ---------------------------------------------------------------------------------------
    def _blend(self, plan: WindowPlan, windows: List[Optional[WindowResult]], mask_crop: np.ndarray,
               logits_crop: Optional[np.ndarray], progress, cancel) -> None:
        """The windows' average written over the region of interest of the crop canvases (voxels that only
        skipped windows cover keep the coarse result). Rows of windows whose logits are those of the previous
        call on the same plan are copied from it instead of being upsampled and averaged again."""
        region = plan.region
        keys = tuple(None if w is None else w.key for w in windows)
        last, self._last = self._last, None
        slices = None
        if last is not None and last.plan == plan and (logits_crop is None or last.logits is not None):
            changed = [i for i, (key, before) in enumerate(zip(keys, last.keys)) if key != before]
            self._copy_unchanged(plan, windows, last, mask_crop, logits_crop)
            rows = [plan.readable(i)[0][0] for i in changed]
            slices = (min((r.start for r in rows), default=0) - plan.region_lo[0],
                      max((r.stop for r in rows), default=0) - plan.region_lo[0])

        def readable_logits(index: int) -> Optional[np.ndarray]:
            if windows[index] is None:   # skipped: adds nothing
                return None
            return self.runner.upsample(windows[index].logits_lowres, self.window)[plan.readable(index)[1]]

        def write_final(d_start: int, d_stop: int, logits: np.ndarray, covered: Optional[np.ndarray]) -> None:
            rows = (slice(plan.region_lo[0] + d_start, plan.region_lo[0] + d_stop),) + region[1:]
            if covered is None:
                mask_crop[rows] = foreground(logits)
                if logits_crop is not None:
                    logits_crop[rows] = logits
            else:
                mask_crop[rows][covered] = foreground(logits[covered])
                if logits_crop is not None:
                    logits_crop[rows][covered] = logits[covered]

        if slices is None or slices[0] < slices[1]:
            zoom_in(plan, readable_logits, write_final, progress, cancel, slices=slices)
        self._last = LastZoomIn(plan, keys, mask_crop[region].copy(),
                                None if logits_crop is None else logits_crop[region].copy())

    @staticmethod
    def _copy_unchanged(plan: WindowPlan, windows, last: LastZoomIn, mask_crop, logits_crop) -> None:
        """The previous result wherever a window covered it (the changed rows are blended again after)."""
        region = plan.region
        if all(w is not None for w in windows):
            boxes = [tuple(slice(0, n) for n in plan.region_shape)]
        else:   # voxels only skipped windows cover show this call's coarse result, already on the canvas
            boxes = [tuple(slice(c.start - lo, c.stop - lo) for c, lo in zip(plan.readable(i)[0], plan.region_lo))
                     for i, w in enumerate(windows) if w is not None]
        for box in boxes:
            mask_crop[region][box] = last.mask[box]
            if logits_crop is not None:
                logits_crop[region][box] = last.logits[box]

    # ---- model calls through the cache ------------------------------------------------------------------
    def _window_results(self, plan: WindowPlan, indices: Sequence[int], prompts: CropPrompts, window_prompt,
                        progress, cancel) -> Dict[int, WindowResult]:
        context_key = _context_key(prompts.context)
        window_key = {i: (context_key, plan.cache_key(i)) for i in indices}
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
        text = self._text_embedding(prompts.text)
        done, total = 0, sum(len(batch) for batch in batches)
        for batch in batches:
            check(cancel)
            report(progress, done / max(total, 1), f"zoom-in windows {done + 1}-{done + len(batch)} of {total}")
            embeddings, encoded = self._window_embeddings(plan, batch, window_key, prompts.context, progress)
            wps = [window_prompt[i] for i in batch]
            boxes = None if wps[0].box is None else np.stack([wp.box for wp in wps])
            lowres = self.runner.decode_many(embeddings, text, np.stack([wp.points for wp in wps]),
                                             np.stack([wp.labels for wp in wps]), boxes, progress)
            for i, logits, fresh in zip(batch, lowres, encoded):
                logits = logits[None].clone()   # its own storage: a view would keep the whole batch alive
                self.cache.put(DECODED, decoded_key[i], logits)
                results[i] = WindowResult(window_prompt[i], logits, fresh, True, decoded_key[i])
            done += len(batch)
        return results

    def _window_embeddings(self, plan: WindowPlan, batch: Sequence[int], window_key, context,
                           progress) -> tuple[torch.Tensor, List[bool]]:
        """The embeddings of windows ``batch`` (B, C, ...), the missing ones encoded in one pass; and which."""
        cached = {i: self.cache.get(WINDOW, window_key[i]) for i in batch}
        missing = [i for i in batch if cached[i] is None]
        if missing:
            fresh = self.runner.encode_images(
                [plan.window_image(self.prepared.crop_reader, i) for i in missing], context, progress)
            for i, embedding in zip(missing, fresh):
                # Under reduced precision windows are kept as int8 (half of bf16: a 512x512x300 CT's whole
                # region fits the memory target); float32 (parity, "official") keeps them as they are.
                kept = embedding[None].clone()
                cached[i] = PackedEmbedding.pack(kept) if kept.dtype != torch.float32 else kept
                self.cache.put(WINDOW, window_key[i], cached[i])
        return torch.cat([_unpacked(cached[i]) for i in batch]), [i in missing for i in batch]

    def _window_entry_bytes(self) -> int:
        """Bytes one window keeps in the cache: its embedding and one decoded result."""
        config = self.model.config
        tokens = int(np.prod(config.embedding_grid))
        embedding = (config.embed_dim * tokens * 4 if self.runner.runtime.storage_dtype == torch.float32
                     else PackedEmbedding.size_of(config.embed_dim, tokens))
        decoded = int(np.prod(self.window)) // 16 * 4
        return embedding + decoded

    def _text_embedding(self, text: Optional[str]) -> Optional[torch.Tensor]:
        return None if text is None else self.cache.text(text, lambda: self.runner.encode_text(text))

    def _zoom_embedding(self, context, progress) -> torch.Tensor:
        return self.cache.zoom_out(_context_key(context), lambda: self.runner.encode_image(
            self._zoom_image, context, progress))


def _unpacked(embedding) -> torch.Tensor:
    return embedding.unpack() if isinstance(embedding, PackedEmbedding) else embedding


def _context_key(context):
    return None if context is None else tuple(context.rows())
