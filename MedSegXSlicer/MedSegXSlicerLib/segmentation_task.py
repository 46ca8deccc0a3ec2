"""What a segmentation request carries from the main thread to the engine thread and back."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .worker import Job


@dataclass
class StructureRequest:
    """One segment to produce: its name, the prompts, and the segment it replaces (None: a new one)."""

    name: str
    prompts: object              # medsegx_core.prompts.Prompts (world RAS / volume voxels)
    segment_id: Optional[str] = None
    rename_existing: bool = True


@dataclass
class StructureResult:
    request: StructureRequest
    result: object               # the engine's result: .mask on the volume's grid, .runtime, (LiteMedSAM) .notes
    seconds: float               # engine time for this structure (the first includes loading and encoding)


class PreviewSlot:
    """The newest preview of a running request (the engine thread puts, the main thread takes): the mask so far
    on the volume's grid, from the start slice on, so the user sees a result before every slice is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: Optional[Tuple[int, int, np.ndarray]] = None     # (serial, request index, mask)

    def put(self, request_index: int, mask: np.ndarray) -> None:
        with self._lock:
            serial = 1 if self._latest is None else self._latest[0] + 1
            self._latest = (serial, request_index, mask)

    def newer_than(self, serial: int) -> Optional[Tuple[int, int, np.ndarray]]:
        """(serial, request index, mask) if a preview newer than ``serial`` came, else None."""
        with self._lock:
            return self._latest if self._latest is not None and self._latest[0] > serial else None


@dataclass
class SegmentationTask:
    """A request in flight: the engine job plus what the main thread needs to write its results."""

    job: Job
    volume_node: object
    segmentation_node: Optional[object]
    requests: List[StructureRequest]
    ijk_to_world: np.ndarray
    shape_kji: tuple
    model_label: str = ""
    warnings: list = field(default_factory=list)
    finished: list = field(default_factory=list)     # StructureResult, appended on the worker thread
    segment_ids: list = field(default_factory=list)  # written, in request order (after finishSegmentation)
    started: float = field(default_factory=time.monotonic)
    latency_s: Optional[float] = None                # request to result written (finishSegmentation)
    status: str = ""                                 # one line for the status bar
    preview: PreviewSlot = field(default_factory=PreviewSlot)   # the mask so far (LiteMedSAM's requests)
    preview_shown: int = 0                           # serial of the preview on screen (main thread)

    @property
    def prompts(self):
        return self.requests[0].prompts

    def cancel(self) -> None:
        self.job.cancel()
