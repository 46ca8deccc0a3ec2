"""SegVol in Slicer (no Qt): the 3D model text and clicks run (and boxes, when LiteMedSAM does not take them).

The model (with the chosen expert pack) and a ``Predictor`` holding one volume's embeddings are kept in a
``SessionStore`` (session.py), so a new click re-runs only the prompt encoder and the mask decoder. Several
structures in one request share one encoding of the volume. Everything here that touches torch runs on the
Logic's engine thread.
"""
from __future__ import annotations

import time
from typing import List, Optional

from medsegx_core.progress import CancelToken, ProgressCallback, scaled

from .segmentation_task import StructureRequest, StructureResult
from .session import SessionStore

MODEL_NAME = "SegVol"


def load_model(spec):
    """``spec``: a weights path, or ``(weights path, expert pack)`` with the pack a file, ``models.NO_EXPERTS``
    (leave the weights' bundled experts out) or None (keep them): the engine's one expert-pack rule
    (``apply_expert_pack``), a pack for another expert configuration replacing the weights' own."""
    from medsegx_core.weights.expert_pack import apply_expert_pack
    from medsegx_core.weights.store import load_model as load_weights

    weights, pack = spec if isinstance(spec, tuple) else (spec, None)
    model = load_weights(weights)
    apply_expert_pack(model, pack, replace_experts=True)   # WeightsError: another base or another hierarchy
    return model


def make_predictor(model, device: str):
    from medsegx_core.predictor import Predictor
    return Predictor(model, device=device)


def new_session_store(model_loader=load_model, predictor_factory=make_predictor) -> SessionStore:
    return SessionStore(model_loader, predictor_factory)


def segment_structures(sessions: SessionStore, key: tuple, volume, spec, device: str, modality: Optional[str],
                       requests: List[StructureRequest], finished: list, progress: ProgressCallback,
                       cancel: CancelToken) -> list:
    """Engine thread: the session for this volume (the model loaded and the volume encoded only when needed),
    then each structure in turn, appended to ``finished`` as it ends (a cancel keeps the ones already there)."""
    started = time.monotonic()
    count = len(requests)
    encoded = 0.6 if count == 1 else 0.3
    session = sessions.session_for(key, volume, spec, device, modality, scaled(progress, 0.0, encoded), cancel)
    share = (1.0 - encoded) / count
    for index, request in enumerate(requests):
        cancel.raise_if_cancelled()
        sub = scaled(progress, encoded + index * share, encoded + (index + 1) * share)
        if count > 1:
            sub = _prefixed(sub, f"{request.name} ({index + 1}/{count})")
        result = session.segment(request.prompts, sub, cancel)
        cancel.raise_if_cancelled()  # a structure counts as finished only if no cancel came first
        finished.append(StructureResult(request, result, time.monotonic() - started))
        started = time.monotonic()
    return finished


def _prefixed(progress: Optional[ProgressCallback], prefix: str) -> Optional[ProgressCallback]:
    if progress is None:
        return None
    return lambda fraction, message="": progress(fraction, f"{prefix}: {message}" if message else prefix)
