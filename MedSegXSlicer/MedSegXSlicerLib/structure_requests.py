"""A request's prompts, from MRML nodes and strings to one ``StructureRequest`` per segment to write.

The text may name several structures ("liver, spleen", a list, or a preset such as "abdominal organs"; the engine's
``resolve_structures`` splits, expands and resolves it and refuses an unknown name). Several structures are text
only, each its own new segment: clicks, a box or a segment to refine describe one structure, so they are refused
with a list. One structure gets its segment's name from ``segment_name``, else the structure, else the segment
it refines, else "MedSegX <n>".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

from medsegx_core.errors import InputError

from . import mrml_conversion, structures
from .segmentation_task import StructureRequest

logger = logging.getLogger("MedSegX")


@dataclass
class PromptInputs:
    """What the user gave for one request."""

    text: object = None                    # a name, "liver, spleen", a preset, or a list of those
    points_node: object = None             # clicks: positive unless the node is marked negative
    negative_points_node: object = None    # clicks that are negative whatever their node says
    roi_node: object = None                # the box
    segment_id: Optional[str] = None       # an existing segment to refine (replace); None: a new segment
    segment_name: Optional[str] = None

    def has_clicks(self) -> bool:
        return any(node is not None and node.GetNumberOfDefinedControlPoints() > 0
                   for node in (self.points_node, self.negative_points_node))


def resolve_terms(inputs: PromptInputs) -> list:
    """The hierarchy terms the text names (empty without text), checked against the other inputs."""
    from medsegx_core.data.hierarchy import resolve_structures

    terms = resolve_structures(inputs.text, presets=structures.PRESET_STRUCTURES)
    if len(terms) <= 1:
        return terms
    names = structures.describe([t.name for t in terms], limit=3)
    if inputs.has_clicks() or inputs.roi_node is not None:
        raise InputError(f"clicks and a box describe one structure, but the text names {len(terms)} ({names}): "
                         f"clear the points and the box to segment the list, or type one structure")
    if inputs.segment_id is not None:
        raise InputError(f"refining a segment takes one structure, but the text names {len(terms)} ({names}): "
                         f"choose '(new segment)' to add them all, or type one structure")
    if inputs.segment_name:
        raise InputError(f"one segment name was given for {len(terms)} structures ({names}): each structure is "
                         f"named after itself")
    return terms


def structure_requests(inputs: PromptInputs, terms: list, volume, volume_node,
                       segmentation_node) -> Tuple[List[StructureRequest], list]:
    """``(requests, warnings)``: each structure's prompts in the volume's world frame (checked by the engine's
    rules: something to segment, every click inside the volume) and the segment it goes to."""
    one = len(terms) <= 1
    requests, warnings = [], []
    for term in terms or [None]:
        from_scene = mrml_conversion.prompts_from_nodes(
            volume, volume_node.GetName(), text=term.name if term else None,
            points_nodes=[inputs.points_node] if one else [],
            negative_nodes=[inputs.negative_points_node] if one else [],
            roi_node=inputs.roi_node if one else None)
        warnings += from_scene.warnings
        requests.append(StructureRequest(term.name if term else None, from_scene.prompts))
    for warning in warnings:
        logger.warning(warning)
    if one:
        term = terms[0] if terms else None
        segmentation = segmentation_node.GetSegmentation() if segmentation_node is not None else None
        existing = segmentation is not None and inputs.segment_id is not None and \
            segmentation.GetSegment(inputs.segment_id) is not None
        name = inputs.segment_name or (term.name if term else None)
        if name is None:
            name = segmentation.GetSegment(inputs.segment_id).GetName() if existing else \
                f"MedSegX {(segmentation.GetNumberOfSegments() if segmentation is not None else 0) + 1}"
        requests[0] = StructureRequest(name, requests[0].prompts, inputs.segment_id,
                                       rename_existing=bool(inputs.segment_name or term) or not existing)
    return requests, warnings
