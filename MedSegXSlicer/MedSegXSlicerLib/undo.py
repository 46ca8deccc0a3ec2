"""Undo for results written into segmentation nodes: one step per request, whatever it wrote.

A step records, for every segment the request wrote, a copy of the segment it replaced (None when the segment was
new) and its position in the list, so undoing puts back exactly what was there: a refined segment gets its old
mask, name and place back, a new one is removed. Steps are kept per segmentation node ID, so a node deleted since
is skipped rather than recreated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from . import segment_writer

#: Steps kept: a step holds copies of the segments it replaced (a CT-sized labelmap each).
UNDO_DEPTH = 20


@dataclass
class UndoStep:
    segmentation_node_id: str
    #: [segment_id, vtkSegment copy or None when the segment was new, position], in writing order
    entries: List[list] = field(default_factory=list)

    def restore(self, segmentation) -> None:
        """Put the segments back in reverse writing order (also used to roll back a half-written result)."""
        for segment_id, snapshot, position in reversed(self.entries):
            segment_writer.restore_segment(segmentation, segment_id, snapshot, position)


class UndoHistory:
    """The last ``UNDO_DEPTH`` steps, newest last."""

    def __init__(self, depth: int = UNDO_DEPTH):
        self._depth = depth
        self._steps: List[UndoStep] = []

    def push(self, step: UndoStep) -> None:
        self._steps = (self._steps + [step])[-self._depth:]

    def can_undo(self) -> bool:
        return bool(self._steps)

    def undo(self, scene) -> bool:
        """Undo the newest step whose segmentation node still exists in ``scene``; False when there is none."""
        while self._steps:
            step = self._steps.pop()
            node = scene.GetNodeByID(step.segmentation_node_id)
            if node is not None:
                step.restore(node.GetSegmentation())
                return True
        return False
