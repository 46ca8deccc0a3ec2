"""The engine state kept between clicks: loaded model, and a Predictor holding one volume's embeddings.

Refining with another click must be fast: SegVol's expensive part is the image encoder, and the Predictor caches
its zoom-out and zoom-in embeddings for the volume it was given. So a session is keyed by the volume node's ID,
the modification time of its voxels and its world geometry (parent transforms included): while the key is
unchanged, a new prompt re-runs only the prompt encoder and mask decoder. Any change of voxels, geometry or
transform gives a new key, and the next request re-encodes.

One session (the most recent volume) is kept: a CT's embeddings take hundreds of MB, and users refine one volume
at a time. The loaded model is kept separately, keyed by (weights, device), so switching volumes reuses it.

Every method here that touches torch runs on the worker thread (see worker.py); the main thread only reads
``SessionStore.current`` to know whether it must copy the voxels again.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from medsegx_core.progress import CancelToken, ProgressCallback, check, report, scaled


@dataclass
class EngineSession:
    """A Predictor with one volume set; ``key`` says which volume (see ``mrml_conversion.volume_key``)."""

    key: tuple
    volume: Any            # medsegx_core.data.volume.Volume in world RAS
    predictor: Any         # medsegx_core.predictor.Predictor, set_volume already done
    model_key: tuple
    segment_calls: int = 0

    def segment(self, prompts, progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None):
        self.segment_calls += 1
        return self.predictor.segment(prompts, progress=progress, cancel=cancel)


class SessionStore:
    """The loaded model and the current session; built lazily on the worker thread."""

    def __init__(self, model_loader: Callable[[str], Any], predictor_factory: Callable[..., Any]):
        self._load_model = model_loader
        self._make_predictor = predictor_factory
        self._lock = threading.Lock()
        self._model: Optional[tuple] = None          # (model_key, model)
        self.current: Optional[EngineSession] = None
        self.model_loads = 0                          # how often weights were read (tests check reuse)
        self.volume_encodings = 0                     # how often set_volume ran

    def session_for(self, key: tuple, volume, weights, device: str, modality: Optional[str],
                    progress: Optional[ProgressCallback] = None,
                    cancel: Optional[CancelToken] = None) -> EngineSession:
        """The session for this volume, loading the model and encoding the volume only when needed.

        ``weights``: what the model loader takes (a path, or a hashable spec such as (weights, expert pack))."""
        model_key = (weights if isinstance(weights, tuple) else str(weights), device)
        with self._lock:
            current = self.current
            if current is not None and current.key == key and current.model_key == model_key:
                return current
            model = self._model_locked(model_key, progress)
            check(cancel)
            predictor = self._make_predictor(model, device=device)
            report(progress, 0.3, "encoding the volume")
            predictor.set_volume(volume, modality=modality, progress=scaled(progress, 0.3, 1.0), cancel=cancel)
            self.volume_encodings += 1
            self.current = EngineSession(key, volume, predictor, model_key)
            return self.current

    def model_for(self, weights, device: str, progress: Optional[ProgressCallback] = None):
        """The loaded model for ``weights`` (loaded now if another one is held); worker thread only."""
        with self._lock:
            return self._model_locked((weights if isinstance(weights, tuple) else str(weights), device), progress)

    def _model_locked(self, model_key: tuple, progress: Optional[ProgressCallback]):
        if self._model is None or self._model[0] != model_key:
            report(progress, 0.0, "loading the model weights")
            self._model = None  # free the old model (and the session using it) before loading another
            self.current = None
            self._model = (model_key, self._load_model(model_key[0]))
            self.model_loads += 1
        return self._model[1]

    def forget(self) -> None:
        """Drop the session and the model (frees memory; the next request loads and encodes again)."""
        with self._lock:
            self.current = None
            self._model = None
