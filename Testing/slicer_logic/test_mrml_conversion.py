"""MRML -> engine inputs on a real CT in a real slicer-core scene: geometry with parent transforms, clicks and
ROIs on oblique/flipped volumes, against Slicer's own hardening and Crop Volume logic."""
from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

import scene_builders as sb
from scene_builders import ct, moved_ct  # noqa: F401 (fixtures)
from MedSegXSlicerLib import mrml_conversion as mc
from medsegx_core.data.readers import read_volume
from medsegx_core.errors import GeometryError, InputError, PromptError

VOXELS = [(20, 30, 5), (100, 70, 25), (61, 50, 14)]  # (i, j, k) inside the 122 x 101 x 30 CT


def test_volume_matches_the_engine_reader(ct, data_dir):
    before = sb.node_state(ct)
    volume = mc.volume_from_node(ct)
    from_file = read_volume(data_dir / sb.CT_SMALL)
    assert np.array_equal(volume.array, from_file.array)
    assert np.allclose(volume.ijk_to_ras, from_file.ijk_to_ras, atol=1e-4)
    assert volume.source == ct.GetName()
    volume.array[0, 0, 0] += 1  # a copy: changing it leaves Slicer's voxels alone
    assert sb.node_state(ct) == before


def test_parent_transforms_equal_slicers_hardening(moved_ct):
    before = sb.node_state(moved_ct)
    volume = mc.volume_from_node(moved_ct)

    clone = slicer.modules.volumes.logic().CloneVolume(moved_ct.GetScene(), moved_ct, "hardened")
    clone.SetAndObserveTransformNodeID(moved_ct.GetTransformNodeID())
    slicer.vtkSlicerTransformLogic().hardenTransform(clone)
    assert clone.GetTransformNodeID() is None
    assert np.allclose(volume.ijk_to_ras, sb.ijk_to_ras(clone), atol=1e-6)
    assert np.allclose(mc.world_ijk_to_ras(moved_ct), sb.ijk_to_ras(clone), atol=1e-6)
    assert np.array_equal(volume.array, slicer.util.arrayFromVolume(clone))
    assert sb.node_state(moved_ct) == before  # the user's node keeps its transform and geometry


def test_clicks_reach_the_voxels_they_were_placed_on(moved_ct):
    scene = moved_ct.GetScene()
    markups_transform = sb.linear_transform(scene, sb.affine(sb.rotation("A", 40.0), (30.0, 0.0, -12.0)), "pts")
    worlds = [sb.world_of_voxel(moved_ct, ijk) + 0.4 for ijk in VOXELS]  # off-centre, inside the voxel
    positive = sb.add_points(scene, "pos", worlds[:2], parent=markups_transform)
    negative = sb.add_points(scene, "neg", worlds[2:], label=mc.NEGATIVE)
    volume = mc.volume_from_node(moved_ct)

    result = mc.prompts_from_nodes(volume, "ct", points_nodes=[positive, negative])
    voxel = result.prompts.to_voxel(volume)
    assert np.array_equal(np.rint(voxel.points_ijk).astype(int), np.array(VOXELS))
    assert voxel.labels.tolist() == [1, 1, 0]
    ct_voxels = slicer.util.arrayFromVolume(moved_ct)
    for (i, j, k), ijk in zip(VOXELS, np.rint(voxel.points_ijk).astype(int)):
        assert volume.array[ijk[2], ijk[1], ijk[0]] == ct_voxels[k, j, i]


def test_negative_clicks_by_attribute_or_argument_and_unplaced_points_skipped(ct):
    scene = ct.GetScene()
    worlds = [sb.world_of_voxel(ct, ijk) for ijk in VOXELS]
    marked = sb.add_points(scene, "marked", worlds[:1], label=mc.NEGATIVE)
    plain = sb.add_points(scene, "plain", worlds[1:])
    plain.UnsetNthControlPointPosition(1)  # a point still being placed
    volume = mc.volume_from_node(ct)

    by_attribute = mc.prompts_from_nodes(volume, "ct", points_nodes=[plain, marked])
    assert [p.positive for p in by_attribute.prompts.points] == [True, False]
    by_argument = mc.prompts_from_nodes(volume, "ct", text="liver", negative_nodes=[plain])
    assert [p.positive for p in by_argument.prompts.points] == [False]
    assert by_argument.prompts.text == "liver"


def test_aligned_roi_gives_slicers_crop_extent(moved_ct):
    scene = moved_ct.GetScene()
    roi_transform = sb.linear_transform(scene, sb.affine(sb.rotation("S", 70.0), (3.0, 4.0, 5.0)), "roi parent")
    roi = sb.add_roi_on_voxels(scene, moved_ct, (10, 8, 6), (30, 28, 18), parent=roi_transform)
    volume = mc.volume_from_node(moved_ct)

    result = mc.prompts_from_nodes(volume, "ct", roi_node=roi)
    assert result.warnings == []
    extent = sb.crop_extent(roi, moved_ct)
    assert result.box.ijk_min.tolist() == extent[0::2] == [10, 8, 6]
    assert result.box.ijk_max.tolist() == extent[1::2] == [30, 28, 18]
    voxel = result.prompts.to_voxel(volume)
    assert np.allclose(voxel.box_ijk, [[10, 8, 6], [30, 28, 18]])


def test_rotated_roi_uses_its_bounds_in_the_volume_with_a_warning(moved_ct):
    roi = sb.add_roi_on_voxels(moved_ct.GetScene(), moved_ct, (40, 30, 8), (70, 60, 20),
                               extra_rotation=sb.rotation("A", 25.0))
    result = mc.prompts_from_nodes(mc.volume_from_node(moved_ct), "ct", roi_node=roi)
    assert len(result.warnings) == 1 and "rotated" in result.warnings[0]
    first, last = result.box.ijk_min, result.box.ijk_max

    # Every voxel whose centre is inside the rotated ROI (Slicer's ROI matrix) is inside the box ...
    k, j, i = np.indices(slicer.util.arrayFromVolume(moved_ct).shape)
    ijk = np.c_[i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]
    world_to_roi = np.linalg.inv(slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix()))
    in_roi = ijk[np.all(np.abs((ijk @ (world_to_roi @ sb.to_world(moved_ct) @ sb.ijk_to_ras(moved_ct)).T)[:, :3])
                        <= np.asarray(roi.GetSize()) / 2, axis=1), :3]
    assert np.all(in_roi >= first) and np.all(in_roi <= last)
    # ... and the box is Crop Volume's (which keeps only voxels wholly inside the bounds) plus at most one
    # voxel per side (we keep voxels whose centre is inside: a box prompt should rather be generous).
    extent = np.array(sb.crop_extent(roi, moved_ct))
    assert np.all(first <= extent[0::2]) and np.all(first >= extent[0::2] - 1)
    assert np.all(last >= extent[1::2]) and np.all(last <= extent[1::2] + 1)
    assert first[0] < 40 and last[0] > 70  # the bounds grew with the rotation


def test_roi_partly_outside_is_clipped_and_fully_outside_refused(ct):
    scene = ct.GetScene()
    partly = sb.add_roi_on_voxels(scene, ct, (-5, 10, 20), (20, 30, 40), name="partly")
    volume = mc.volume_from_node(ct)
    result = mc.prompts_from_nodes(volume, "ct", roi_node=partly)
    assert result.box.ijk_min.tolist() == [0, 10, 20] and result.box.ijk_max.tolist() == [20, 30, 29]
    assert "clipped" in result.warnings[0]
    outside = sb.add_roi_on_voxels(scene, ct, (200, 10, 5), (220, 30, 9), name="far away")
    with pytest.raises(PromptError, match="'far away' does not overlap volume 'ct'"):
        mc.prompts_from_nodes(volume, "ct", roi_node=outside)


def test_bad_inputs_raise_one_line_errors(ct):
    scene = ct.GetScene()
    volume = mc.volume_from_node(ct)
    with pytest.raises(PromptError, match="no prompt for volume 'ct'"):
        mc.prompts_from_nodes(volume, "ct", text="  ", points_nodes=[None], roi_node=None)
    far = sb.add_points(scene, "clicks", [sb.world_of_voxel(ct, (300, 5, 5))])
    # the engine's check (Prompts.to_voxel), naming the volume by its node's name
    outside = rf"positive point \(.*\) \(RAS mm\) is outside the volume '{ct.GetName()}' \(RAS bounds .*\); click"
    with pytest.raises(PromptError, match=outside):
        mc.prompts_from_nodes(volume, "ct", points_nodes=[far])
    with pytest.raises(InputError, match="no input volume"):
        mc.volume_from_node(None)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(InputError, match="'labels' is a vtkMRMLLabelMapVolumeNode"):
        mc.volume_from_node(labelmap)


def test_non_linear_transform_is_refused_and_node_left_alone(ct):
    scene = ct.GetScene()
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for x, y, z in [(0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100), (50, 50, 50)]:
        source.InsertNextPoint(x, y, z)
        target.InsertNextPoint(x + (5 if x == 50 else 0), y, z)
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    warp = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(spline)
    ct.SetAndObserveTransformNodeID(warp.GetID())
    before = sb.node_state(ct)
    with pytest.raises(GeometryError, match="non-linear transform 'warp': harden it first"):
        mc.volume_from_node(ct)
    assert sb.node_state(ct) == before
