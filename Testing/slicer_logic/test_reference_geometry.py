""".seg.nrrd files we write carry Slicer's "Reference image geometry": Slicer (slicer-core) exports them "with the
reference geometry" onto the CT's whole grid, not a grid cropped to the segments."""
from __future__ import annotations

import numpy as np
import slicer

from medsegx_core.cli import main
from medsegx_core.data.readers import read_labelmap, read_volume

CT, LABELS = "ct/msd_spleen_8_ct.nii.gz", "ct/msd_spleen_8_ct_labels.nii.gz"  # 512 x 512 x 32, a small spleen


def test_converted_seg_nrrd_exports_at_the_full_ct_extent_in_slicer(slicer_app, data_dir, tmp_path):
    output = tmp_path / "spleen.seg.nrrd"
    assert main(["convert", str(data_dir / LABELS), "--reference", str(data_dir / CT), "--names", "1=spleen",
                 "-o", str(output)]) == 0
    ct = read_volume(data_dir / CT)
    labels = read_labelmap(data_dir / LABELS, ct).array

    node = slicer.util.loadSegmentation(str(output))
    geometry = node.GetSegmentation().GetConversionParameter("Reference image geometry")
    assert geometry.endswith(";0;511;0;511;0;31;")
    exported = slicer_app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer_app.segmentations.ExportAllSegmentsToLabelmapNode(
        node, exported, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert exported.GetImageData().GetDimensions() == ct.shape_ijk == (512, 512, 32)
    matrix = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(exported))
    assert np.allclose(matrix, ct.ijk_to_ras, atol=1e-4)
    assert np.array_equal(slicer.util.arrayFromVolume(exported) > 0, labels == 1)


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix
