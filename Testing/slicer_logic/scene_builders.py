"""Scene set-ups shared by the MedSegX Slicer-logic tests: a real CT in a slicer-core scene, oblique/flipped
geometry, parent transforms, markups placed at known voxels.

Every expected value here comes from Slicer's own objects (the node's IJKToRAS, transform nodes' matrices,
Slicer's hardening and Crop Volume logic), never from the code under test.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegXSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))  # MedSegXSlicerLib, as Slicer puts the module folder on sys.path

import slicer  # noqa: E402
import vtk  # noqa: E402

CT_SMALL = "ct/totalseg_ct_small.nii.gz"   # 122 x 101 x 30 voxels, 3 mm, abdominal CT with liver


def rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = {"R": (1, 2), "A": (2, 0), "S": (0, 1)}[axis]
    m = np.eye(3)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def affine(linear: np.ndarray = np.eye(3), translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


def load_ct(data_dir: Path, name: str = CT_SMALL):
    return slicer.util.loadVolume(str(data_dir / name))


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def to_world(node) -> np.ndarray:
    """Slicer's own node -> world matrix (identity without a parent transform)."""
    m = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, m)
    return slicer.util.arrayFromVTKMatrix(m)


def make_oblique_flipped(volume_node, degrees: float = 20.0) -> np.ndarray:
    """Give the volume LPS-flipped axes rotated about S and A (keeps spacing and voxels); returns IJKToRAS."""
    spacing = np.asarray(volume_node.GetSpacing())
    directions = rotation("S", degrees) @ rotation("A", degrees / 2) @ np.diag([-1.0, -1.0, 1.0])
    matrix = affine(directions * spacing, (112.5, -85.25, 40.0))
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    return matrix


def linear_transform(scene, matrix: np.ndarray, name: str, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def world_of_voxel(volume_node, ijk) -> np.ndarray:
    """World RAS of a voxel centre, through Slicer's IJKToRAS and the volume's transforms."""
    return (to_world(volume_node) @ ijk_to_ras(volume_node) @ np.append(np.asarray(ijk, float), 1.0))[:3]


def add_points(scene, name: str, world_points, parent=None, label: str = None):
    """A fiducial node whose control points sit at ``world_points`` whatever its parent transform is."""
    from MedSegXSlicerLib import mrml_conversion

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    local = np.linalg.inv(to_world(node))
    for n, world in enumerate(world_points):
        node.AddControlPoint((local @ np.append(world, 1.0))[:3].tolist(), f"{name}-{n + 1}")
    if label is not None:
        mrml_conversion.mark_points_node(node, label)
    return node


def add_roi_on_voxels(scene, volume_node, first_ijk, last_ijk, name: str = "box", extra_rotation=np.eye(3),
                      parent=None):
    """An ROI covering whole voxels first..last (inclusive) of the volume, aligned with its (world) axes and
    optionally rotated about its centre, placed in world whatever the ROI's own parent transform."""
    world = to_world(volume_node) @ ijk_to_ras(volume_node)
    spacing = np.linalg.norm(world[:3, :3], axis=0)
    axes = world[:3, :3] / spacing
    first, last = np.asarray(first_ijk, float), np.asarray(last_ijk, float)
    center_world = (world @ np.append((first + last) / 2.0, 1.0))[:3]
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    object_to_world = affine(extra_rotation @ axes, center_world)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(np.linalg.inv(to_world(node))
                                                                        @ object_to_world))
    node.SetSize(*((last - first + 1.0) * spacing))
    return node


def crop_extent(roi_node, volume_node) -> list:
    """Slicer's Crop Volume rule for the voxels an ROI covers: [i0, i1, j0, j1, k0, k1]."""
    extent = [0] * 6
    assert slicer.vtkSlicerCropVolumeLogic.GetVoxelBasedCropOutputExtent(roi_node, volume_node, extent)
    return extent


def node_state(volume_node) -> tuple:
    """What must not change when MedSegX reads a volume: geometry, transform, voxels."""
    return (ijk_to_ras(volume_node).tobytes(), volume_node.GetTransformNodeID(),
            slicer.util.arrayFromVolume(volume_node).tobytes(), volume_node.GetImageData().GetMTime())


TAGS = ("TerminologyEntry", "Segmentation.Status")  # the tags MedSegX or Slicer's editor set


def segment_tags(segment) -> tuple:
    """The segment's known tags (vtkSegment's Python wrapping cannot list tag names)."""
    tags = []
    for name in TAGS:
        value = vtk.reference("")
        if segment.GetTag(name, value):
            tags.append((name, str(value)))
    return tuple(tags)


def segmentation_state(segmentation_node, reference_volume_node) -> dict:
    """Every segment's name, colour, tags and voxels on the reference grid (compare before/after)."""
    from MedSegXSlicerLib import mrml_conversion, segment_writer

    if segmentation_node is None:
        return {}
    segmentation = segmentation_node.GetSegmentation()
    world = mrml_conversion.world_ijk_to_ras(reference_volume_node)
    shape = slicer.util.arrayFromVolume(reference_volume_node).shape
    state = {}
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        state[segment_id] = (segment.GetName(), tuple(np.round(segment.GetColor(), 6)), segment_tags(segment),
                             segment_writer.read_segment_mask(segmentation_node, segment_id, world, shape).tobytes())
    return state


@pytest.fixture(scope="session")
def imported_weights(tmp_path_factory, fixtures_dir):
    """The parity fixture's tiny SegVol, imported through the Logic as "Import official checkpoint" does
    (a published file with the tokenizer files beside it -> our safetensors folder). Import it in a test module
    (``from scene_builders import imported_weights``) to use it as a fixture."""
    from MedSegXSlicerLib import MedSegXSlicerLogic

    published = tmp_path_factory.mktemp("published")
    shutil.copy(fixtures_dir / "segvol_parity/public/model.safetensors", published)
    for file in (fixtures_dir / "segvol_parity/tokenizer").iterdir():
        shutil.copy(file, published)
    importer = MedSegXSlicerLogic()
    try:
        folder = importer.importCheckpoint(published / "model.safetensors",
                                           destination=tmp_path_factory.mktemp("weights") / "tiny")
    finally:
        importer.cleanup()
    assert importer.weightsPath == folder and (folder / "config.json").is_file()
    return folder


@pytest.fixture
def ct(slicer_app, data_dir):
    """The small real CT loaded through slicer.util.loadVolume into the test's scene."""
    return load_ct(data_dir)


@pytest.fixture
def moved_ct(ct):
    """The CT with oblique, LPS-flipped axes under two nested parent transforms (rotation + translation)."""
    scene = ct.GetScene()
    make_oblique_flipped(ct)
    outer = linear_transform(scene, affine(rotation("R", 15.0), (5.0, -7.0, 11.0)), "outer")
    inner = linear_transform(scene, affine(rotation("S", -30.0), (-20.0, 3.0, 0.5)), "inner", outer)
    ct.SetAndObserveTransformNodeID(inner.GetID())
    return ct
