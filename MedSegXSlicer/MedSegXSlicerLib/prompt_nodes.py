"""The markups nodes that carry prompts: include / exclude point lists and the box (ROI)."""
from __future__ import annotations

from . import mrml_conversion


def create_points_node(scene, name: str, negative: bool = False, color=None):
    """A point list for include (or exclude) clicks, marked so that the Logic reads it that way."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    mrml_conversion.mark_points_node(node, mrml_conversion.NEGATIVE if negative else mrml_conversion.POSITIVE)
    node.CreateDefaultDisplayNodes()
    if color is not None:
        node.GetDisplayNode().SetSelectedColor(color)
        node.GetDisplayNode().SetColor(color)
    return node


def start_placing_box(scene, markups_logic, roi_node=None, name: str = "MedSegX box"):
    """Enter place mode for the box (a new ROI node unless ``roi_node``); returns the ROI node."""
    if roi_node is None:
        roi_node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        roi_node.CreateDefaultDisplayNodes()
    markups_logic.SetActiveList(roi_node)
    markups_logic.StartPlaceMode(False)
    return roi_node


def clear_points(*points_nodes) -> int:
    """Remove every click of these point lists (None skipped); returns how many were removed."""
    removed = 0
    for node in points_nodes:
        if node is not None:
            removed += node.GetNumberOfControlPoints()
            node.RemoveAllControlPoints()
    return removed
