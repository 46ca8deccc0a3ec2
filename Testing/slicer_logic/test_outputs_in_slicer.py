"""What we write, loaded by Slicer's own readers (slicer-core storage nodes and module logics)."""
from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from medsegx_core.data.readers import read_labelmap, read_volume
from medsegx_core.data.segments import Segment, complete, read_label_names, segments_from_labelmap
from medsegx_core.data.writers import write_nifti_labelmap, write_seg_nrrd

LABELS = "ct/totalseg_ct_labels.nii.gz"


@pytest.fixture(scope="module")
def totalseg(data_dir, reference_ct):
    ct = read_volume(reference_ct)
    labels = read_labelmap(data_dir / LABELS, ct)
    names, _ = read_label_names(str(data_dir / "totalsegmentator_class_map.json"), key="total")
    return ct, labels, segments_from_labelmap(labels.array, names)


def matrix(getter) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    getter(m)
    return slicer.util.arrayFromVTKMatrix(m)


def test_fixture_gives_an_empty_scene_with_colour_tables_and_the_shim(slicer_app):
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") > 0
    assert slicer.mrmlScene is slicer_app.scene and slicer.modules.segmentations.logic() is slicer_app.segmentations
    slicer_app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "left over")


def test_next_test_does_not_see_the_previous_tests_nodes(slicer_app):
    assert slicer_app.scene.GetFirstNodeByName("left over") is None


def test_seg_nrrd_loads_in_slicer_voxel_for_voxel_with_names_colours_and_geometry(slicer_app, totalseg, reference_ct,
                                                                                tmp_path):
    ct, labels, segments = totalseg
    path = write_seg_nrrd(tmp_path / "totalseg.seg.nrrd", ct, segments)

    ct_node = slicer.util.loadVolume(str(reference_ct))
    assert np.allclose(matrix(ct_node.GetIJKToRASMatrix), ct.ijk_to_ras, atol=1e-4)  # Slicer agrees on the CT
    node = slicer.util.loadSegmentation(str(path))  # vtkSlicerSegmentationsModuleLogic -> storage node
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(segments) == 61
    for segment in complete(segments, ct.array.shape):  # with the colours and IDs the writer gave them
        segment_id = segmentation.GetSegmentIdBySegmentName(segment.name)
        loaded = segmentation.GetSegment(segment_id)
        assert segment_id == segment.id == segment.name  # TotalSegmentator names are already safe IDs
        assert np.allclose(loaded.GetColor(), segment.color, atol=1e-5)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, ct_node)
        assert np.array_equal(mask > 0, labels.array == segment.label), segment.name
        # geometry: the segment's own labelmap representation, in Slicer's RAS
        image = loaded.GetRepresentation("Binary labelmap")
        assert np.allclose(matrix(image.GetImageToWorldMatrix), ct.ijk_to_ras, atol=1e-6), segment.name
    liver = segmentation.GetSegment("liver")
    assert np.allclose(liver.GetColor(), np.array([221, 130, 101]) / 255, atol=1e-5)
    entry = vtk.mutable("")
    assert liver.GetTag("TerminologyEntry", entry) and "SCT^10200004^Liver" in str(entry)
    extent = segmentation.GetSegment("liver").GetRepresentation("Binary labelmap").GetExtent()
    assert list(extent[1::2]) == [n - 1 for n in ct.shape_ijk] and list(extent[::2]) == [0, 0, 0]


def test_overlapping_seg_nrrd_loads_in_slicer(slicer_app, totalseg, reference_ct, tmp_path):
    ct, labels, _ = totalseg
    liver = labels.array == 5
    core = liver & (np.indices(liver.shape)[0] > np.median(np.nonzero(liver)[0]))
    path = write_seg_nrrd(tmp_path / "overlap.seg.nrrd", ct, [Segment("liver", mask=liver),
                                                             Segment("tumor", mask=core, color=(1.0, 1.0, 0.0))])
    ct_node = slicer.util.loadVolume(str(reference_ct))
    node = slicer.util.loadSegmentation(str(path))
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2
    for name, expected in (("liver", liver), ("tumor", core)):
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, ct_node) > 0, expected)
    assert np.allclose(segmentation.GetSegment("tumor").GetColor(), (1, 1, 0))


def test_nifti_labelmap_loads_in_slicer_on_the_ct_grid(slicer_app, totalseg, tmp_path):
    ct, labels, segments = totalseg
    path = write_nifti_labelmap(tmp_path / "totalseg_labels.nii.gz", ct, segments)
    node = slicer.util.loadVolume(str(path), {"labelmap": True})
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert np.allclose(matrix(node.GetIJKToRASMatrix), ct.ijk_to_ras, atol=1e-4)
    assert np.array_equal(slicer.util.arrayFromVolume(node), labels.array)
    # and Slicer turns it into one segment per label value on the same grid
    segmentation_node = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer_app.segmentations.ImportLabelmapToSegmentationNode(node, segmentation_node)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 61
