"""Predictor: set a volume once, then segment it with many prompts, re-using every image embedding.

In the style of segment-anything's ``SamPredictor``::

    predictor = Predictor(model)                      # device/precision "auto", canonical preprocessing
    predictor.set_volume(volume)                      # preprocess + zoom-out image embedding
    result = predictor.segment(Prompts(text="liver"))
    result = predictor.segment(Prompts(text="liver", points=(PointPrompt(ras), ...)))   # encoder not re-run

What one ``segment`` call does (SegVol's zoom-out-zoom-in, geometry in ``inference/zoom.py``):

1. zoom-out: the whole foreground crop resized to the model input; decode the prompts on its (cached)
   embedding; coarse logits.
2. region of interest from the coarse foreground; sliding windows over it at native resolution.
3. zoom-in: per window, decode the window's prompts on its (cached) embedding; average the windows.
4. the coarse logits outside the region, the averaged ones inside; threshold; map back onto the volume's grid
   (undoing the canonical reorientation exactly).

Prompt combinations (the official demo allows a box XOR points, each optionally with text; we allow any
non-empty combination). Every prompt becomes sparse tokens of the prompt encoder, in its order: points
(positive and negative, plus the official padding point when there is no box), the two box corners, the
text embedding; the text is also matched against the upscaled image features in the decoder (SegVol's text
branch). In zoom-in windows: the text is passed unchanged; a point goes to every window that contains it
(deterministic, where the official code re-draws points at random from a rasterised cube); when the user gave
a box or points each window also gets the bounding box of the coarse mask inside it (``[-1]*6`` if it holds
none), as the official code does, except that with a single window a user box is used itself. The region of
interest is the official one (coarse foreground, widened to a window) extended to hold every positive click,
so that a click where the coarse result missed the structure is still zoomed in on.

Caches (per volume): the zoom-out embedding and each window's embedding, keyed by the ConMoAE context (when
experts are attached the embeddings depend on the anatomy named by the text) and by what the window reads;
text embeddings by text; decoded window logits by window and exact window prompts. A new click therefore
re-runs only the prompt encoder and mask decoder, and only for the zoom-out view and the windows whose prompts
it changes (those containing it, those whose coarse-mask box moved), unless it moves the region of interest
onto windows never encoded.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .data.hierarchy import context_indices, guess_modality, resolve_modality, resolve_term
from .data.volume import Volume
from .errors import PromptError
from .inference.device import (Runtime, cast_matmul_weights, is_out_of_memory, release_cuda_memory,
                               release_freed_memory, use_fused_attention, use_matmul_transposed_convolutions,
                               warn)
from .inference.preprocessing import PreprocessedVolume, preprocess
from .inference.zoom import RegionBlender, WindowPlan, ZoomMaps, foreground, region_of_interest
from .progress import CancelToken, ProgressCallback, check, report, scaled
from .prompts import Prompts

# Logit written outside the foreground crop, where the model never looked (only with return_logits).
OUTSIDE_CROP_LOGIT = -1.0e4
# Decoded low-resolution window logits kept (0.5 MB each at SegVol's size).
DECODED_WINDOWS_KEPT = 64


@dataclass
class SegmentationResult:
    mask: np.ndarray                   # uint8 (k, j, i) on the input volume's grid, 1 = inside
    name: Optional[str]                # the structure named by the text prompt (canonical name), else None
    logits: Optional[np.ndarray] = None  # float32 (k, j, i) when asked for
    windows: int = 0                   # zoom-in windows over the region of interest
    windows_encoded: int = 0           # of which had to be encoded (the others came from the cache)
    windows_decoded: int = 0           # of which had to be decoded (same window and same window prompts: cached)
    runtime: str = ""                  # e.g. "cpu bf16"
    notes: list = field(default_factory=list)   # warnings given during the call


@dataclass
class _MappedPrompts:
    """One prompt set in the foreground crop's (d, h, w) coordinates."""

    text: Optional[str]
    name: Optional[str]
    context: object
    points: np.ndarray           # (N, 3) float crop coordinates
    labels: np.ndarray           # (N,) 1/0
    box_lo: Optional[np.ndarray]  # (3,) int inclusive crop voxels
    box_hi: Optional[np.ndarray]

    @property
    def spatial(self) -> bool:
        return len(self.points) > 0 or self.box_lo is not None


class Predictor:
    """Zoom-out-zoom-in segmentation of one volume at a time with cached image embeddings."""

    def __init__(self, model, device: str = "auto", precision: str = "auto", preprocessing: str = "canonical",
                 cache_megabytes: int = 192, fast_kernels: bool = True, zoom_in: Optional[bool] = None):
        """``model``: a SegVol-API model (``encode_image``, ``encode_text``, ``decode_with_details``).
        ``precision``: "auto" (bf16/fp16 where the hardware does it fast), "fp32", "bf16", "fp16".
        ``preprocessing``: "canonical" (reorient to RAS+ first) or "official" (voxel order as stored).
        ``fast_kernels``: fused SDPA attention in the encoder and the decoder's non-overlapping transposed
        convolutions as matrix products (same mathematics within the parity tolerance, about 2x faster on CPU).
        Under bf16/fp16 the model's linear/convolution weights are converted to that dtype (the model then
        belongs to this Predictor; give it a copy if you need the float32 weights elsewhere).
        ``zoom_in``: refine the coarse pass with zoom-in windows; None = what the model's config says
        (``SegVolConfig.zoom_in``: True for SegVol, False for the bundled starter model)."""
        self.runtime = Runtime.resolve(device, precision)
        self.preprocessing = preprocessing
        self.model = model.eval().to(self.runtime.device)
        # Under reduced precision the matrix weights are stored in it (same results, half the memory); the
        # model is the Predictor's from now on.
        cast_matmul_weights(self.model, self.runtime.storage_dtype)
        release_freed_memory()   # the float32 weights just replaced
        if fast_kernels:
            use_fused_attention(self.model)
            use_matmul_transposed_convolutions(self.model)
        self.window = tuple(int(n) for n in model.config.image_size)
        self.zoom_in = bool(getattr(model.config, "zoom_in", True) if zoom_in is None else zoom_in)
        self.cache_bytes = int(cache_megabytes) << 20
        self.volume: Optional[Volume] = None
        self.prepared: Optional[PreprocessedVolume] = None
        self._clear_caches()

    # ---- volume -----------------------------------------------------------------------------------------
    def set_volume(self, volume: Volume, modality: Optional[str] = None,
                   progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> None:
        """Preprocess ``volume`` and (for models without experts) encode its zoom-out view.

        No float copy of the volume is kept: windows are read from ``volume.array`` and normalised as they are
        encoded, so the array must not be changed in place while it is set (replace it and call again)."""
        self._clear_caches()
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
        self.volume = volume
        if not self.has_experts:   # the zoom-out embedding does not depend on the prompt: do it now
            report(progress, 0.4, "encoding the zoom-out view")
            self._zoom_embedding(None, progress)
        report(progress, 1.0, "volume ready")

    @property
    def has_experts(self) -> bool:
        return hasattr(getattr(self.model, "conmoae", None), "context")

    # ---- segmentation -----------------------------------------------------------------------------------
    def segment(self, prompts: Prompts, return_logits: bool = False, trace: Optional[Dict] = None,
                progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None) -> SegmentationResult:
        """Segment the structure the prompts describe. ``trace``: a dict that receives the intermediates
        (zoom-out logits, ROI, windows, window prompts and logits, final crop logits) for inspection."""
        if self.volume is None:
            raise PromptError("no volume: call set_volume(volume) before segment(prompts)")
        notes: list = []
        self._serial += 1
        mapped = self._map_prompts(prompts)
        text_embedding = self._text_embedding(mapped.text)
        check(cancel)

        report(progress, 0.0, "zoom-out")
        zoom_embedding = self._zoom_embedding(mapped.context, progress)
        model_points = self.maps.points_to_model(mapped.points)
        model_box = None if mapped.box_lo is None else self.maps.box_to_model(mapped.box_lo, mapped.box_hi)
        coarse_lowres = self._decode(zoom_embedding, text_embedding, model_points, mapped.labels, model_box,
                                     progress)
        coarse = self._upsample(coarse_lowres)
        coarse_foreground = foreground(coarse)
        self._record(trace, zoomout_box=model_box, zoomout_logits_lowres=coarse_lowres.numpy(),
                     zoomout_logits=coarse)

        positive = np.floor(mapped.points[mapped.labels == 1] + 0.5).astype(int)
        roi = (region_of_interest(coarse_foreground, self.maps, self.window, include_voxels=positive)
               if self.zoom_in else None)
        plan = None if roi is None else WindowPlan.official(roi[0], roi[1], self.prepared.cropped_shape,
                                                             self.window)
        # The coarse result on the crop; the zoom-in result overwrites the region of interest slab by slab. The
        # crop arrays are views of the full-size outputs, so the result needs no second full-size copy.
        mask_full, mask_crop = self.prepared.working_canvas(np.uint8)
        self.maps.back_to_crop_into(coarse_foreground, mask_crop)
        logits_full = logits_crop = None
        if return_logits or trace is not None:
            logits_full, logits_crop = self.prepared.working_canvas(np.float32, fill=OUTSIDE_CROP_LOGIT)
            self.maps.back_to_crop_into(coarse, logits_crop)
            self._record(trace, zoomout_logits_back=logits_crop.copy() if trace is not None else None)
        encoded = decoded = 0
        if plan is None and not self.zoom_in:
            notes.append("coarse pass only: this model's configuration turns the zoom-in refinement off")
        elif plan is None:
            notes.append("the zoom-out result has no foreground: kept it without zooming in (as SegVol does)")
            warn(notes[-1], progress, 0.1)
        else:
            self._record(trace, roi_dhw=np.concatenate(roi), plan=plan, window_boxes=[],
                         window_points=[], window_logits_lowres=[])

            def write_final(d_start: int, d_stop: int, logits: np.ndarray) -> None:
                region = (slice(plan.region_lo[0] + d_start, plan.region_lo[0] + d_stop),) + tuple(
                    slice(lo, hi) for lo, hi in zip(plan.region_lo[1:], plan.region_hi[1:]))
                mask_crop[region] = foreground(logits)
                if logits_crop is not None:
                    logits_crop[region] = logits

            blender = RegionBlender(plan, write_final)
            for index in range(len(plan)):
                check(cancel)
                report(progress, 0.1 + 0.85 * index / len(plan), f"zoom-in window {index + 1}/{len(plan)}")
                points, labels, box = self._window_prompts(mapped, plan, index, coarse_foreground)
                lowres, fresh_embedding, fresh_logits = self._window_logits(
                    mapped, plan, index, text_embedding, (points, labels, box), progress)
                encoded += fresh_embedding
                decoded += fresh_logits
                blender.add(index, self._upsample(lowres))
                if trace is not None:
                    trace["window_boxes"].append(box)
                    trace["window_points"].append((points, labels))
                    trace["window_logits_lowres"].append(lowres.numpy())
            blender.finish()

        report(progress, 0.95, "assembling the mask")
        self._record(trace, final_logits_cropped=logits_crop, final_mask_cropped=mask_crop)
        mask = self.prepared.to_stored(mask_full)
        logits = self.prepared.to_stored(logits_full) if return_logits else None
        report(progress, 1.0, "done")
        return SegmentationResult(mask=mask, name=mapped.name, logits=logits,
                                  windows=0 if plan is None else len(plan), windows_encoded=encoded,
                                  windows_decoded=decoded,
                                  runtime=self.runtime.describe(), notes=notes)

    # ---- prompts ----------------------------------------------------------------------------------------
    def _map_prompts(self, prompts: Prompts) -> _MappedPrompts:
        if not isinstance(prompts, Prompts):
            raise PromptError(f"segment() takes a Prompts object, got {type(prompts).__name__}")
        voxel = prompts.to_voxel(self.volume)
        term = resolve_term(voxel.text) if voxel.text else None
        context = context_indices(term, self.modality) if self.has_experts else None
        shape = np.asarray(self.prepared.cropped_shape)
        points = self.prepared.points_to_cropped(voxel.points_ijk)
        for point, position in zip(prompts.points, points):
            voxel_index = np.floor(position + 0.5)
            if np.any(voxel_index < 0) or np.any(voxel_index >= shape):
                raise PromptError(f"{point.describe()} lies in the empty border of the volume (voxels at its "
                                  f"minimum value, which the model never sees); click on the body")
        box_lo = box_hi = None
        if voxel.box_ijk is not None:
            corners = self.prepared.points_to_cropped(voxel.box_ijk)
            box_lo = np.clip(np.floor(corners.min(axis=0) + 0.5), 0, shape - 1).astype(int)
            box_hi = np.clip(np.floor(corners.max(axis=0) + 0.5), 0, shape - 1).astype(int)
            if np.any(corners.max(axis=0) < -0.5) or np.any(corners.min(axis=0) > shape - 0.5):
                raise PromptError(f"{prompts.box.describe()} lies in the empty border of the volume (voxels at "
                                  f"its minimum value, which the model never sees); draw it over the body")
        return _MappedPrompts(text=term.name if term else None, name=term.name if term else None,
                              context=context, points=points, labels=np.asarray(voxel.labels),
                              box_lo=box_lo, box_hi=box_hi)

    def _window_logits(self, mapped: _MappedPrompts, plan: WindowPlan, index: int, text_embedding,
                       window_prompts, progress) -> tuple[torch.Tensor, int, int]:
        """(low-res logits, 1 if the window was encoded, 1 if it was decoded) of window ``index``."""
        points, labels, box = window_prompts
        key = (self._context_key(mapped.context), plan.cache_key(index), mapped.text,
               np.asarray(points, np.float64).tobytes(), np.asarray(labels).tobytes(),
               None if box is None else np.asarray(box, np.float32).tobytes())
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key], 0, 0
        embedding, encoded = self._window_embedding(mapped.context, plan, index, progress)
        lowres = self._decode(embedding, text_embedding, points, labels, box, progress)
        self._decoded[key] = lowres
        while len(self._decoded) > DECODED_WINDOWS_KEPT:
            self._decoded.popitem(last=False)
        return lowres, encoded, 1

    def _window_prompts(self, mapped: _MappedPrompts, plan: WindowPlan, index: int, coarse_foreground):
        points, labels = plan.points_in_window(mapped.points, mapped.labels, index)
        if mapped.box_lo is not None and len(plan) == 1:
            box = plan.box_in_window(mapped.box_lo, mapped.box_hi, index)
        elif mapped.spatial:
            box = plan.coarse_box(coarse_foreground, self.maps, index)
        else:
            box = None
        return points, labels, box

    # ---- model calls (cached) ---------------------------------------------------------------------------
    def _text_embedding(self, text: Optional[str]) -> Optional[torch.Tensor]:
        if text is None:
            return None
        if text not in self._texts:
            self._texts[text] = self._guarded(lambda: self._run(lambda: self.model.encode_text([text])), None)
        return self._texts[text]

    def _zoom_embedding(self, context, progress) -> torch.Tensor:
        key = self._context_key(context)
        if key not in self._zoom_embeddings:
            self._zoom_embeddings[key] = self._encode(self._zoom_image, context, progress)
        return self._zoom_embeddings[key]

    def _window_embedding(self, context, plan: WindowPlan, index: int, progress) -> tuple[torch.Tensor, int]:
        key = (self._context_key(context), plan.cache_key(index))
        if key in self._windows:
            self._windows.move_to_end(key)
            self._window_used[key] = self._serial
            return self._windows[key], 0
        embedding = self._encode(plan.window_image(self.prepared.crop_reader, index), context, progress)
        size = embedding.numel() * embedding.element_size()
        # Least recently used first, but never an embedding this call already used: when a region has more
        # windows than the cache holds, keeping the first ones beats evicting each before the next prompt
        # needs it again.
        while self._windows_bytes + size > self.cache_bytes and self._windows:
            oldest = next(iter(self._windows))
            if self._window_used[oldest] == self._serial:
                break
            dropped = self._windows.pop(oldest)
            del self._window_used[oldest]
            self._windows_bytes -= dropped.numel() * dropped.element_size()
        if self._windows_bytes + size <= self.cache_bytes:
            self._windows[key] = embedding
            self._window_used[key] = self._serial
            self._windows_bytes += size
        return embedding, 1

    def _encode(self, image: np.ndarray, context, progress) -> torch.Tensor:
        def compute():
            tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(self.runtime.device)
            with self._expert_context(context):
                embedding = self._run(lambda: self.model.encode_image(tensor))
            # Kept in the autocast dtype: the decoder's matrix products read it in that precision anyway,
            # and twice as many windows fit the cache.
            return embedding.to(self.runtime.storage_dtype)
        embedding = self._guarded(compute, progress)
        release_freed_memory()   # the forward's activations, so they do not add up with the growing caches
        return embedding

    def _decode(self, embedding, text_embedding, points, labels, box, progress) -> torch.Tensor:
        """Low-resolution logits (1, 1, d, h, w), float32 on the CPU."""
        def compute():
            device = self.runtime.device
            point_prompt = None
            if len(points):
                point_prompt = (torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device)[None],
                                torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)[None])
            boxes = None if box is None else torch.as_tensor(np.asarray(box), dtype=torch.float32,
                                                             device=device)[None]
            text = None if text_embedding is None else text_embedding.to(device)
            output = self._run(lambda: self.model.decode_with_details(embedding.to(device), text,
                                                                      point_prompt, boxes))
            return output.logits_lowres.float().cpu()
        return self._guarded(compute, progress)

    def _upsample(self, lowres: torch.Tensor) -> np.ndarray:
        """Full-resolution window logits (float32, window shape), as SegVol's final trilinear resize."""
        with torch.inference_mode():
            return self.model.upsample_logits(lowres, self.window)[0, 0].numpy()

    def _run(self, compute: Callable):
        with torch.inference_mode(), self.runtime.autocast():
            return compute()

    def _expert_context(self, context):
        return self.model.conmoae.context(context) if self.has_experts and context is not None else nullcontext()

    @staticmethod
    def _context_key(context):
        return None if context is None else tuple(context.rows())

    # ---- result -----------------------------------------------------------------------------------------
    @staticmethod
    def _record(trace: Optional[Dict], **values) -> None:
        if trace is not None:
            trace.update(values)

    # ---- caches and devices -----------------------------------------------------------------------------
    def _clear_caches(self) -> None:
        self._zoom_embeddings: Dict = {}
        self._windows: "OrderedDict" = OrderedDict()
        self._windows_bytes = 0
        self._window_used: Dict = {}     # window key -> serial of the last segment() call that used it
        self._serial = 0
        self._texts: Dict[str, torch.Tensor] = {}
        self._decoded: "OrderedDict" = OrderedDict()

    def _guarded(self, compute: Callable, progress):
        """Run ``compute``; on CUDA out-of-memory, tell the user and continue on the CPU."""
        try:
            return compute()
        except Exception as exc:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
            if self.runtime.device.type != "cuda" or not is_out_of_memory(exc):
                raise
        warn(f"the GPU ran out of memory; continuing on the CPU ({self.runtime.cpu_fallback().describe()}), "
             f"which is slower", progress)
        self._move_to(self.runtime.cpu_fallback())
        return compute()

    def _move_to(self, runtime: Runtime) -> None:
        self.runtime = runtime
        release_cuda_memory()
        self.model.to(runtime.device)
        cast_matmul_weights(self.model, runtime.storage_dtype)
        release_freed_memory()
        for cache in (self._zoom_embeddings, self._windows, self._texts):
            for key in list(cache):
                cache[key] = cache[key].to(runtime.device)
        release_cuda_memory()
