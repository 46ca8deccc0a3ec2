"""Engine mask -> one segment of a segmentation node: named, coloured, undoable, all-or-nothing.

Rules this file guarantees:
- Only the target segment changes. Slicer moves a segment whose new voxels overlap others into its own labelmap
  layer, so other segments keep every voxel (checked by the tests).
- All or nothing: if anything fails while writing, the segment is put back as it was (or removed if it was new),
  so a failure leaves the segmentation node's segments unchanged.
- Undo: the segmentation node takes part in scene undo (``SetUndoEnabled``) and the scene state is saved before
  the change when the scene records undo (``scene.GetUndoFlag()``), so Edit > Undo restores the previous segment.
- Geometry: the mask is on the voxel grid of the (hardened) input volume, i.e. in world RAS. It is imported
  through a temporary labelmap node that has that world geometry and no parent transform; Slicer's importer then
  maps it into the segmentation node's own frame, whatever transform that node is under.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import slicer
import vtk

from medsegx_core.errors import GeometryError, OutputError

TEMP_NODE_NAME = "__MedSegX_temp_labelmap__"


@contextmanager
def temporary_labelmap(scene, ijk_to_ras: np.ndarray, array: Optional[np.ndarray] = None):
    """A hidden, untransformed labelmap node on the given grid, removed from the scene afterwards together with
    any display and colour nodes Slicer made for it."""
    colors_before = {scene.GetNthNodeByClass(n, "vtkMRMLColorNode").GetID()
                     for n in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))}
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", TEMP_NODE_NAME)
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    try:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, dtype=float)))
        if array is not None:
            slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.uint8))
        yield node
    finally:
        display = node.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        if display is not None:
            scene.RemoveNode(display)
        scene.RemoveNode(node)
        if color is not None and color.GetID() not in colors_before:
            scene.RemoveNode(color)


def string_array(values: Sequence[str]) -> vtk.vtkStringArray:
    out = vtk.vtkStringArray()
    for value in values:
        out.InsertNextValue(value)
    return out


def ensure_reference_geometry(segmentation_node, volume_node) -> None:
    """Give a new (empty, geometry-less) segmentation the input volume's grid, as the Segment Editor does."""
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    has_geometry = segmentation_node.GetNodeReference(role) is not None or bool(
        segmentation_node.GetSegmentation().GetConversionParameter("Reference image geometry"))
    if not has_geometry and volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)


def read_segment_mask(segmentation_node, segment_id: str, ijk_to_world: np.ndarray, shape_kji) -> np.ndarray:
    """A segment's voxels resampled onto a world grid (``(k, j, i)`` uint8), e.g. the input volume's."""
    # Slicer's exporter ignores transforms: it reads the reference grid as if it were in the segmentation node's
    # own frame (checked on slicer-core), so express the world grid in that frame and leave the temp node
    # untransformed.
    transform = segmentation_node.GetParentTransformNode()
    to_world = np.eye(4)
    if transform is not None:
        m = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(m)
        to_world = slicer.util.arrayFromVTKMatrix(m)
    local = np.linalg.inv(to_world) @ np.asarray(ijk_to_world, dtype=float)
    scene = segmentation_node.GetScene()
    with temporary_labelmap(scene, local, np.zeros(shape_kji, np.uint8)) as labelmap:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, string_array([segment_id]), labelmap, labelmap)
        if not ok:
            raise GeometryError(f"could not read segment {segment_id!r} of '{segmentation_node.GetName()}'")
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)


def snapshot_segment(segmentation, segment_id: str):
    if segmentation.GetSegment(segment_id) is None:
        return None
    copy = slicer.vtkSegment()
    copy.DeepCopy(segmentation.GetSegment(segment_id))
    return copy


def restore_segment(segmentation, segment_id: str, snapshot, position: int) -> None:
    if segmentation.GetSegment(segment_id) is not None:
        segmentation.RemoveSegment(segment_id)
    if snapshot is not None:
        after = segmentation.GetNthSegmentID(position) if position < segmentation.GetNumberOfSegments() else ""
        segmentation.AddSegment(snapshot, segment_id, after)


def write_segment(segmentation_node, mask_kji: np.ndarray, ijk_to_world: np.ndarray, *, segment_id: Optional[str],
                  name: str, color: Sequence[float], terminology: Optional[str] = None,
                  reference_volume_node=None, rename_existing: bool = True) -> str:
    """Replace (or create) one segment's voxels with ``mask_kji`` (on the ``ijk_to_world`` grid); returns its ID.

    ``segment_id=None`` creates a new segment with a fresh ID. An existing segment keeps its colour and
    terminology unless ``rename_existing`` (then name, colour and terminology are set as for a new one).
    """
    scene = segmentation_node.GetScene()
    if scene is None:
        raise OutputError(f"segmentation '{segmentation_node.GetName()}' is not in a scene")
    mask = np.asarray(mask_kji)
    segmentation = segmentation_node.GetSegmentation()
    ensure_reference_geometry(segmentation_node, reference_volume_node)

    segmentation_node.SetUndoEnabled(True)
    if scene.GetUndoFlag():
        scene.SaveStateForUndo()

    if segment_id is None or segmentation.GetSegment(segment_id) is None:
        position, snapshot = segmentation.GetNumberOfSegments(), None
        segment_id = segmentation.AddEmptySegment(segment_id or "", name, list(color)[:3])
        is_new = True
    else:
        position, snapshot = segmentation.GetSegmentIndex(segment_id), snapshot_segment(segmentation, segment_id)
        is_new = False
    try:
        with temporary_labelmap(scene, ijk_to_world, (mask > 0).astype(np.uint8)) as labelmap:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap, segmentation_node, string_array([segment_id])):
                raise OutputError(f"Slicer could not import the result into segment {name!r} of "
                                  f"'{segmentation_node.GetName()}'")
        segment = segmentation.GetSegment(segment_id)
        if is_new or rename_existing:
            segment.SetName(name)
            segment.SetColor(*[float(c) for c in list(color)[:3]])
            if terminology:
                segment.SetTag(segment.GetTerminologyEntryTagName(), terminology)
    except BaseException:
        restore_segment(segmentation, segment_id, snapshot, position)
        raise
    return segment_id
