"""What a segmentation request carries from the main thread to the engine thread and back."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional

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

    @property
    def prompts(self):
        return self.requests[0].prompts

    def cancel(self) -> None:
        self.job.cancel()
