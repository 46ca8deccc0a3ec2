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
4. ``refine``: every window through the model (``inference/window_refiner.py``: window prompts, cache keys,
   batches), then blended over the region of interest, which replaces the coarse logits there
   (``decode_window`` gives one window alone).
5. threshold; back onto the volume's grid (undoing the canonical reorientation exactly).

The parts: ``inference/runner.py`` runs the model (device, precision, out-of-memory fallback),
``inference/cache.py`` keeps what a new click re-uses, ``inference/zoom_in.py`` owns the window plan, the window
prompts and the blending, ``inference/window_refiner.py`` runs the windows through the model and the cache.
Prompt rules and cache keys are documented in DESIGN.md ("Predictor").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from .data.hierarchy import context_indices, resolve_term
from .data.modality import routing_modality
from .data.volume import Volume
from .errors import PromptError
from .inference.cache import EmbeddingCache
from .inference.confidence import absence_warning, presence_confidence
from .inference.device import warn
from .inference.preprocessing import PreprocessedVolume, preprocess
from .inference.prompt_mapping import CropPrompts, to_crop
from .inference.runner import ModelRunner
from .inference.window_refiner import WindowRefiner, WindowResult
from .inference.zoom import ZoomMaps, foreground
from .inference.zoom_in import WindowPlan, plan_windows
from .progress import CancelToken, ProgressCallback, check, report, scaled
from .prompts import Prompts
from .weights.expert_pack import use_pack_for

# Logit written outside the foreground crop, where the model never looked (only with return_logits).
OUTSIDE_CROP_LOGIT = -1.0e4


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
        ``window_batch``: zoom-in windows per encoder/decoder pass; None = ``window_refiner.WINDOW_BATCH`` of
        the device."""
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
        self.windows: Optional[WindowRefiner] = None   # the zoom-in windows of the volume
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
        encoded, so the array must not be changed in place while it is set (replace it and call again).
        ``modality`` (a user's choice) routes the experts; an unknown one is a PromptError
        (``data.modality.routing_modality``: else the file's, else guessed from the intensities, as in training)."""
        modality_used = routing_modality(volume, modality)
        self.cache.clear()
        self.volume = self.windows = None
        name = volume.source or "volume"
        self.prepared = preprocess(volume.array, volume.direction_ras, self.preprocessing, name=name,
                                   progress=scaled(progress, 0.0, 0.4), cancel=cancel)
        self.maps = ZoomMaps.build(self.prepared.cropped_shape, self.window)
        self._zoom_image = self.maps.zoom_out(self.prepared.crop_reader)
        self.windows = WindowRefiner(self.runner, self.cache, self.prepared.crop_reader, self.maps, self.window,
                                     self.skip_idle_windows, self.window_batch)
        self.modality = modality_used
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
            self.windows.blend(plan, windows, mask_crop, logits_crop, scaled(progress, 0.8, 0.95), cancel)

        report(progress, 0.95, "assembling the mask")
        mask = self.prepared.to_stored(mask_full)
        logits = self.prepared.to_stored(logits_full) if return_logits else None
        report(progress, 1.0, "done")
        return SegmentationResult(mask=mask, name=crop_prompts.text, logits=logits,
                                  windows=len(windows), windows_encoded=sum(w.encoded for w in windows if w),
                                  windows_decoded=sum(w.decoded for w in windows if w),
                                  windows_skipped=sum(w is None for w in windows),
                                  runtime=self.runner.describe(), notes=notes, confidence=confidence)

    def coarse_mask(self, prompts: Prompts, progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """The zoom-out pass alone, on the volume's grid (no zoom-in windows): where the structure lies, for
        another model's zoom-in (LiteMedSAM slice by slice: ``VolumeSlicePredictor.segment_region``; ``medsegx
        segment --zoom-in litemedsam``). Its presence confidence and absence note are the zoom-out's, as in
        ``segment``."""
        self.cache.begin_call()
        crop_prompts = self.map_prompts(prompts)
        check(cancel)
        report(progress, 0.0, "zoom-out")
        coarse = self.zoom_out(crop_prompts, progress)
        confidence = presence_confidence(coarse.logits, coarse.foreground)
        absent = absence_warning(crop_prompts.text, confidence)
        mask_full, mask_crop = self.prepared.working_canvas(np.uint8)
        self.maps.back_to_crop_into(coarse.foreground, mask_crop)
        notes = [note for note in (self._volume_note, absent) if note]
        if absent:
            warn(absent, progress, 0.9)
        report(progress, 1.0, "zoom-out done")
        return SegmentationResult(mask=self.prepared.to_stored(mask_full), name=crop_prompts.text,
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
               cancel: Optional[CancelToken] = None) -> List[Optional[WindowResult]]:
        """Every window of ``plan`` (None for a skipped idle window), from the caches where they hold them; the
        others are encoded and decoded in batches."""
        return self.windows.refine(plan, prompts, coarse.foreground, self._text_embedding(prompts.text), progress,
                                   cancel)

    def decode_window(self, plan: WindowPlan, index: int, prompts: CropPrompts,
                      coarse: CoarseResult) -> WindowResult:
        """Window ``index`` of ``plan``: its prompts and low-resolution logits (from the caches when they hold
        them)."""
        return self.windows.decode_window(plan, index, prompts, coarse.foreground, self._text_embedding(prompts.text))

    # ---- embeddings that do not depend on the window ----------------------------------------------------
    def _text_embedding(self, text: Optional[str]) -> Optional[torch.Tensor]:
        return None if text is None else self.cache.text(text, lambda: self.runner.encode_text(text))

    def _zoom_embedding(self, context, progress) -> torch.Tensor:
        return self.cache.zoom_out(context, lambda: self.runner.encode_image(self._zoom_image, context, progress))

