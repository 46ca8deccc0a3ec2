"""MRML nodes -> engine inputs: a volume node -> ``Volume`` in world RAS, markups -> RAS ``Prompts``.

World coordinates everywhere. A volume under a parent transform is converted with the transform applied, as if
it had been hardened, but only on a copy of the geometry: the user's node is never modified. Markups give their
control points in world coordinates (their own parent transforms applied) through Slicer's ``...World`` getters.
Prompts then live in the same world RAS frame as the hardened volume geometry, which is what the engine expects.

Positive and negative clicks: two markups fiducial nodes. A node is negative when its attribute
``MedSegX.PointLabel`` is ``"negative"`` (the widget creates "MedSegX positive points" and "MedSegX negative
points" with this attribute set), or when it is passed as ``negative_nodes``; every other node is positive. A
per-node label keeps each click a single Slicer "place" action (no mode switch per point), and negative points
are visibly a different node (colour) in the scene.

The box comes from a markups ROI node. Its 8 corners (ROI rotation and parent transforms applied) are mapped
into the volume's voxel grid; the box is the voxels whose centres lie inside the corners' axis-aligned bounds.
For an ROI drawn on voxel edges that is exactly Crop Volume's extent; for other ROIs it can hold one more voxel
per side than Crop Volume (which keeps whole voxels only): a box prompt should rather be generous. An ROI rotated relative to the volume axes cannot be represented exactly
by SegVol's axis-aligned box, so its axis-aligned bounds are used and a warning says so. The box is handed to the
engine as a voxel box (``BoxPrompt(space="ijk")``) of the hardened volume: a RAS box would be axis-aligned in
RAS, which on an oblique volume is not the ROI the user drew.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import slicer
import vtk

from medsegx_core.data.validation import check_image, check_layout
from medsegx_core.data.volume import Volume
from medsegx_core.errors import GeometryError, InputError, PromptError

POINT_LABEL_ATTRIBUTE = "MedSegX.PointLabel"
POSITIVE, NEGATIVE = "positive", "negative"

# Corners of an ROI closer than this (in voxels) to a box face count as on it: rounding noise, not rotation.
_ALIGNMENT_TOL_VOXELS = 1e-3


def _matrix(vtk_matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return slicer.util.arrayFromVTKMatrix(vtk_matrix)


def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node.GetName() else node.GetID()


def _parent_to_world(node, what: str) -> np.ndarray:
    """4x4 from the node's own coordinates to world; a non-linear parent transform is refused."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise GeometryError(
            f"{what} {_node_label(node)} is under the non-linear transform '{parent.GetName()}': harden it first "
            f"(Data module: right-click the transform > Harden transform) so the voxels are resampled")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return _matrix(m)


# ---- volume ---------------------------------------------------------------------------------------------------
def world_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK -> world RAS matrix: its IJKToRAS with every parent transform applied (a hardened copy)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _parent_to_world(volume_node, "volume") @ _matrix(m)


def geometry_from_matrix(ijk_to_ras: np.ndarray) -> tuple:
    """Split a 4x4 IJK -> RAS matrix into (spacing, origin, unit directions), as Slicer does when hardening."""
    axes = np.asarray(ijk_to_ras, dtype=float)[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"the volume's IJK to RAS matrix is degenerate: {np.round(ijk_to_ras, 4).tolist()}")
    return tuple(spacing), np.asarray(ijk_to_ras, dtype=float)[:3, 3].copy(), axes / spacing


def check_volume_node(volume_node) -> None:
    if volume_node is None:
        raise InputError("no input volume: select a CT or MR volume (Input volume) before segmenting")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{_node_label(volume_node)} is a {volume_node.GetClassName()}, not a scalar (greyscale) "
                         f"volume: select the CT or MR image")
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"volume {_node_label(volume_node)} has no voxels: load the image again")
    # the engine's rule for every entry point (medsegx_core/data/validation.py)
    check_layout(f"volume {_node_label(volume_node)}", image.GetDimensions(), image.GetNumberOfScalarComponents())


def volume_from_node(volume_node, modality: Optional[str] = None) -> Volume:
    """The volume's voxels (a copy, ``(k, j, i)``) with its world geometry; the node is not modified."""
    check_volume_node(volume_node)
    spacing, origin, directions = geometry_from_matrix(world_ijk_to_ras(volume_node))
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    volume = Volume(array, spacing, origin, directions, modality=modality or volume_modality(volume_node),
                    source=volume_node.GetName())
    return check_image(volume, f"volume {_node_label(volume_node)}")  # NaN/Inf, blank: the engine's rule


def volume_modality(volume_node) -> Optional[str]:
    """The DICOM modality Slicer recorded for a volume loaded from DICOM, else ``None``."""
    for attribute in ("DICOM.Modality", "Modality"):
        value = volume_node.GetAttribute(attribute)
        if value:
            return value
    return None


def volume_key(volume_node) -> tuple:
    """Identity of a volume's voxels and world geometry: equal keys mean an engine session can be reused."""
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetMTime() if image is not None else 0,
            tuple(np.round(world_ijk_to_ras(volume_node), 6).ravel()))


# ---- points ---------------------------------------------------------------------------------------------------
def is_negative_node(points_node) -> bool:
    return (points_node.GetAttribute(POINT_LABEL_ATTRIBUTE) or POSITIVE).strip().lower() == NEGATIVE


def mark_points_node(points_node, label: str) -> None:
    """Tag a fiducial node as holding positive or negative clicks (what the widget does when it creates one)."""
    if label not in (POSITIVE, NEGATIVE):
        raise ValueError(f"label must be {POSITIVE!r} or {NEGATIVE!r}, got {label!r}")
    points_node.SetAttribute(POINT_LABEL_ATTRIBUTE, label)


def markup_points(points_node, positive: Optional[bool] = None) -> list:
    """Defined control points of a fiducial node as engine ``PointPrompt``s in world RAS; ``positive`` overrides
    the node's attribute. Points still being placed (preview / undefined position) are skipped.

    Whether they lie inside the volume is the engine's check (``Prompts.to_voxel``), run in ``prompts_from_nodes``.
    """
    from medsegx_core.prompts import PointPrompt

    if not points_node.IsA("vtkMRMLMarkupsFiducialNode"):
        raise PromptError(f"points node {_node_label(points_node)} is a {points_node.GetClassName()}, "
                          f"not a point list (markups fiducial node)")
    _parent_to_world(points_node, "point list")  # refuse non-linear transforms with the same clear message
    is_positive = (not is_negative_node(points_node)) if positive is None else positive
    points = []
    position = [0.0, 0.0, 0.0]
    for n in range(points_node.GetNumberOfControlPoints()):
        if points_node.GetNthControlPointPositionStatus(n) != points_node.PositionDefined:
            continue
        points_node.GetNthControlPointPositionWorld(n, position)
        points.append(PointPrompt(position=tuple(float(v) for v in position), positive=is_positive))
    return points


# ---- box ------------------------------------------------------------------------------------------------------
@dataclass
class RoiBox:
    """An ROI turned into an inclusive voxel box ``ijk_min..ijk_max`` of the volume."""

    ijk_min: np.ndarray
    ijk_max: np.ndarray
    warnings: list = field(default_factory=list)


def roi_corners_world(roi_node) -> np.ndarray:
    """The ROI's 8 corners in world RAS: its own rotation (ObjectToNode) and its parent transforms applied."""
    if not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise PromptError(f"box node {_node_label(roi_node)} is a {roi_node.GetClassName()}, not an ROI "
                          f"(markups ROI node)")
    if roi_node.GetNumberOfControlPoints() == 0 or \
            roi_node.GetNthControlPointPositionStatus(0) != roi_node.PositionDefined:
        raise PromptError(f"ROI {_node_label(roi_node)} is not placed yet: place it or clear the box prompt")
    node_to_world = _parent_to_world(roi_node, "ROI")
    object_to_node = _matrix(roi_node.GetObjectToNodeMatrix())
    half = np.asarray(roi_node.GetSize(), dtype=float) / 2.0
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    corners = np.c_[signs * half, np.ones(8)]
    return (corners @ (node_to_world @ object_to_node).T)[:, :3]


def roi_box(roi_node, volume: Volume, volume_name: str) -> RoiBox:
    """The voxels of ``volume`` whose centres are inside the ROI's axis-aligned bounds (in the volume's grid)."""
    corners_ijk = volume.ras_to_ijk_points(roi_corners_world(roi_node))
    lo, hi = corners_ijk.min(axis=0), corners_ijk.max(axis=0)
    warnings = []
    on_a_face = np.isclose(corners_ijk, lo, atol=_ALIGNMENT_TOL_VOXELS) | \
        np.isclose(corners_ijk, hi, atol=_ALIGNMENT_TOL_VOXELS)
    if not on_a_face.all():
        warnings.append(f"ROI {_node_label(roi_node)} is rotated relative to the axes of volume '{volume_name}': "
                        f"its axis-aligned bounds in the volume are used as the box")
    eps = 1e-6  # an ROI edge exactly on a voxel centre includes that voxel
    first = np.array([math.ceil(v - eps) for v in lo], dtype=int)
    last = np.array([math.floor(v + eps) for v in hi], dtype=int)
    size = np.asarray(volume.shape_ijk)
    clipped_first, clipped_last = np.maximum(first, 0), np.minimum(last, size - 1)
    if np.any(clipped_first > clipped_last):
        raise PromptError(f"ROI {_node_label(roi_node)} does not overlap volume '{volume_name}' "
                          f"({volume.describe_ras_bounds()}): move it onto the structure")
    if np.any(clipped_first != first) or np.any(clipped_last != last):
        warnings.append(f"ROI {_node_label(roi_node)} extends beyond volume '{volume_name}': clipped to it")
    return RoiBox(clipped_first, clipped_last, warnings)


# ---- all prompts ----------------------------------------------------------------------------------------------
@dataclass
class PromptsFromScene:
    """The engine's ``Prompts`` plus what the user should be told about how the markups were read."""

    prompts: object  # medsegx_core.prompts.Prompts
    box: Optional[RoiBox]
    warnings: list


def prompts_from_nodes(volume: Volume, volume_name: str, text: Optional[str] = None,
                       points_nodes: Iterable = (), negative_nodes: Iterable = (),
                       roi_node=None) -> PromptsFromScene:
    """Text + clicks + box in world RAS, checked against the volume; raises ``PromptError`` when there is none.

    The clicks and the box are checked by the engine (``Prompts.to_voxel``: something to segment, every point
    inside the volume), here on the main thread so that the user hears of a misplaced click before any work."""
    from medsegx_core.prompts import BoxPrompt, Prompts

    text = (text or "").strip() or None
    points = [p for node in points_nodes if node is not None for p in markup_points(node)]
    points += [p for node in negative_nodes if node is not None for p in markup_points(node, positive=False)]
    box = roi_box(roi_node, volume, volume_name) if roi_node is not None else None
    if text is None and not points and box is None:
        raise PromptError(f"no prompt for volume '{volume_name}': type a structure name, click points, or place "
                          f"an ROI box")
    prompts = Prompts(
        text=text, points=tuple(points),
        box=None if box is None else BoxPrompt(corner_a=tuple(box.ijk_min.tolist()),
                                               corner_b=tuple(box.ijk_max.tolist()), space="ijk"))
    prompts.to_voxel(volume)
    return PromptsFromScene(prompts, box, list(box.warnings) if box is not None else [])
