"""The mask so far of a running request, shown while the engine works (main thread, MRML only).

LiteMedSAM segments a box slice by slice from its start slice (the slice the user drew on, or the ROI's middle):
the engine hands over the mask so far, first after that one slice, then about once a second
(``VolumeSlicePredictor.segment(preview=)``, kept in the task's ``PreviewSlot``). The widget's poll timer calls
``show``: the newest preview goes into one scratch segmentation node (hidden from node selectors, never saved
with the scene, outside undo), so the user sees the structure appear after one slice while the rest is computed.
The user's own segmentation is not touched until the request finishes (one undo step, or nothing on a failure or
Cancel); ``clear`` removes the scratch node then.
"""
from __future__ import annotations

import slicer

from .segment_writer import string_array, temporary_labelmap

PREVIEW_NODE_NAME = "MedSegX preview"
PREVIEW_COLOR = (1.0, 0.85, 0.2)      # a light amber: not a terminology colour, so not mistaken for a result
SEGMENT_ID = "preview"


def show(task) -> bool:
    """Show the task's newest preview if one came since the last call; returns whether the display changed."""
    slot = getattr(task, "preview", None)
    latest = slot.newer_than(task.preview_shown) if slot is not None else None
    if latest is None:
        return False
    serial, request_index, mask = latest
    scene = task.volume_node.GetScene()
    node = _preview_node(scene, task.volume_node)
    segmentation = node.GetSegmentation()
    if segmentation.GetSegment(SEGMENT_ID) is None:
        segmentation.AddEmptySegment(SEGMENT_ID, "", list(PREVIEW_COLOR))
    segmentation.GetSegment(SEGMENT_ID).SetName(f"{task.requests[request_index].name} (in progress)")
    with temporary_labelmap(scene, task.ijk_to_world, (mask > 0).astype("uint8")) as labelmap:
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, node, string_array([SEGMENT_ID]))
    task.preview_shown = serial
    return True


def node_in(scene):
    """The scratch node, or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetAttribute("MedSegX.preview") == "1":
            return node
    return None


def clear(scene) -> None:
    """Remove the scratch node (and its display nodes) if there is one."""
    if scene is None:
        return
    node = node_in(scene)
    if node is None:
        return
    for index in reversed(range(node.GetNumberOfDisplayNodes())):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


def _preview_node(scene, volume_node):
    node = node_in(scene)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", PREVIEW_NODE_NAME)
        node.SetAttribute("MedSegX.preview", "1")
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return node
