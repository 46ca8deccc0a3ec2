"""Writers: .seg.nrrd (read back by slicerio/pynrrd), NIfTI + sidecar (SimpleITK), DICOM SEG (highdicom/pydicom)."""
import json
from pathlib import Path

import highdicom as hd
import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
import slicerio.segmentation as slicerio_segmentation

from medsegx_core.data.atomic import atomic_outputs
from medsegx_core.data.readers import dicom_series_files, read_labelmap, read_volume
from medsegx_core.data.segments import Segment, read_label_names, segments_from_labelmap
from medsegx_core.data.terminology import LEFT, lookup
from medsegx_core.data.writers import (pack_layers, sidecar_path, write_dicom_seg, write_nifti_labelmap,
                                       write_seg_nrrd, write_segmentation)
from medsegx_core.errors import GeometryError, InputError, OutputError


@pytest.fixture(scope="module")
def totalseg(data_dir, reference_ct):
    ct = read_volume(reference_ct)
    labels = read_labelmap(data_dir / "ct/totalseg_ct_labels.nii.gz", ct)
    names, _ = read_label_names(str(data_dir / "totalsegmentator_class_map.json"), key="total")
    return ct, labels, names


@pytest.fixture(scope="module")
def dicom_ct(data_dir):
    ct = read_volume(data_dir / "dicom/ct_3slice")
    liver = read_labelmap(data_dir / "dicom/ct_3slice/liver_seg.nrrd", ct).array > 0
    spine = read_labelmap(data_dir / "dicom/ct_3slice/spine_seg.nrrd", ct).array > 0
    return ct, liver, spine


def test_seg_nrrd_from_totalsegmentator_labels_reads_back_in_slicerio(totalseg, tmp_path):
    ct, labels, names = totalseg
    segments = segments_from_labelmap(labels.array, names)
    present = sorted(int(v) for v in np.unique(labels.array) if v)
    assert [s.label for s in segments] == present and len(present) == 61
    out = write_seg_nrrd(tmp_path / "ct.seg.nrrd", ct, segments)

    back = slicerio.read_segmentation(str(out))
    assert np.allclose(back["ijkToLPS"], ct.ijk_to_lps, atol=1e-9)
    assert back["voxels"].ndim == 3  # disjoint labels: one layer
    assert [s["name"] for s in back["segments"]] == [names[v] for v in present]
    for segment in back["segments"]:
        value = next(v for v in present if names[v] == segment["name"])
        mask_kji = slicerio.segment_mask(back, segment["id"]).transpose(2, 1, 0)
        assert np.array_equal(mask_kji, labels.array == value), segment["name"]
        assert segment["labelValue"] == value  # TotalSegmentator ids survive
    liver = slicerio.segment_from_name(back, "liver")
    assert np.allclose(liver["color"], np.array([221, 130, 101]) / 255, atol=1e-5)
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    kidney = slicerio.segment_from_name(back, "kidney_left")
    assert kidney["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    header = nrrd.read_header(str(out))
    assert header["space"] == "left-posterior-superior" and header["Segment0_ID"] == "spleen"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^" \
        "Anatomical Structure~SCT^78961009^Spleen" in header["Segment0_Tags"]


def test_overlapping_segments_go_to_extra_layers(totalseg, tmp_path):
    ct, labels, _ = totalseg
    liver = labels.array == 5
    k = np.indices(liver.shape)[0]
    upper_liver = liver & (k > np.median(np.nonzero(liver)[0]))  # inside the liver: overlaps it
    spleen = labels.array == 1
    segments = [Segment("liver", mask=liver), Segment("liver tumour", mask=upper_liver, color=(1, 1, 0)),
                Segment("spleen", mask=spleen)]
    out = write_seg_nrrd(tmp_path / "overlap.seg.nrrd", ct, segments)
    back = slicerio.read_segmentation(str(out))
    assert back["voxels"].shape == (2,) + ct.shape_ijk
    placed = {s["name"]: (s["layer"], s["labelValue"]) for s in back["segments"]}
    assert placed == {"liver": (0, 1), "liver tumour": (1, 1), "spleen": (0, 2)}
    for segment in segments:
        assert np.array_equal(slicerio.segment_mask(back, segment.name).transpose(2, 1, 0), segment.mask)
    assert upper_liver.any() and np.allclose(slicerio.segment_from_name(back, "liver tumour")["color"], [1, 1, 0])
    assert slicerio.segment_from_name(back, "liver tumour").get("terminology") is None  # not a table name


def test_pack_layers_keeps_labelmap_values_and_adds_masks_after_them(totalseg):
    ct, labels, names = totalseg
    segments = segments_from_labelmap(labels.array, {1: "spleen", 5: "liver"})  # other labels: "label N"
    outside = labels.array == 0
    segments.append(Segment("background blob", mask=outside & (np.indices(outside.shape)[2] < 3)))
    layers, placement = pack_layers(segments, ct.array.shape)
    assert len(layers) == 1 and layers[0].dtype == np.uint8
    assert placement[-1] == (0, int(labels.array.max()) + 1)
    assert np.array_equal(layers[0][~segments[-1].mask], labels.array[~segments[-1].mask])


def test_nifti_labelmap_and_sidecar_read_back(totalseg, tmp_path):
    ct, labels, names = totalseg
    segments = segments_from_labelmap(labels.array, names)
    out = write_nifti_labelmap(tmp_path / "labels.nii.gz", ct, segments)
    image = sitk.ReadImage(str(out))
    reference = sitk.ReadImage(ct.source)
    assert np.array_equal(sitk.GetArrayFromImage(image), labels.array)
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    assert np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    sidecar = sidecar_path(out)
    assert sidecar == tmp_path / "labels.json"
    document = json.loads(sidecar.read_text())
    assert document["format"] == "medsegx-labels/1" and len(document["labels"]) == 61
    back_names, back_colors = read_label_names(str(sidecar))
    assert back_names == {s.label: s.name for s in segments}
    assert np.allclose(back_colors[5], np.array([221, 130, 101]) / 255, atol=1e-5)


def test_nifti_refuses_overlaps_and_writes_nothing(totalseg, tmp_path):
    ct, labels, _ = totalseg
    liver = labels.array == 5
    with pytest.raises(OutputError, match="overlap.*write a .seg.nrrd instead"):
        write_nifti_labelmap(tmp_path / "x.nii.gz", ct, [Segment("a", mask=liver), Segment("b", mask=liver)])
    assert list(tmp_path.iterdir()) == []


def test_dicom_seg_reads_back_with_highdicom_on_the_source_grid(dicom_ct, data_dir, tmp_path):
    ct, liver, spine = dicom_ct
    assert liver.any() and spine.any() and (liver & spine).sum() == 0
    out = write_dicom_seg(tmp_path / "seg.dcm", ct, [Segment("liver", mask=liver), Segment("spine", mask=spine)])
    seg = hd.seg.segread(str(out))
    assert seg.Modality == "SEG" and [d.segment_label for d in seg.SegmentSequence] == ["liver", "spine"]
    assert seg.SegmentSequence[0].segmented_property_type.value == "10200004"
    source = pydicom.dcmread(dicom_series_files(data_dir / "dicom/ct_3slice")[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    volume = seg.get_volume(combine_segments=False)  # highdicom's own (slice, row, column) grid and affine
    # map every highdicom voxel into our (i, j, k) through both affines: must land on integer voxels of ours
    index = np.indices(volume.array.shape[:3]).reshape(3, -1).T.astype(float)
    ours = ct.lps_to_ijk_points(index @ volume.affine[:3, :3].T + volume.affine[:3, 3])
    assert np.allclose(ours, np.rint(ours), atol=1e-4)
    i, j, k = np.rint(ours).astype(int).T
    for number, mask in enumerate([liver, spine]):
        assert np.array_equal(volume.array[..., number].reshape(-1) > 0, mask[k, j, i])
    assert int(volume.array[..., 0].sum()) == int(liver.sum())


def test_dicom_seg_needs_a_dicom_reference_on_its_grid(dicom_ct, totalseg, data_dir, tmp_path):
    ct, labels, _ = totalseg
    with pytest.raises(OutputError, match="DICOM SEG needs the source DICOM series"):
        write_dicom_seg(tmp_path / "x.dcm", ct, [Segment("liver", mask=labels.array == 5)])
    dicom, liver, _ = dicom_ct
    with pytest.raises(GeometryError, match="does not lie on the reference volume's grid"):
        write_dicom_seg(tmp_path / "x.dcm", dicom, [Segment("liver", mask=liver)],
                        source_dicom=data_dir / "dicom/mr_3slice")
    assert list(tmp_path.iterdir()) == []


def test_write_segmentation_picks_the_format_from_the_name(dicom_ct, tmp_path):
    ct, liver, _ = dicom_ct
    segments = [Segment("liver", mask=liver)]
    for name in ("a.seg.nrrd", "a.nii.gz", "a.dcm"):
        write_segmentation(tmp_path / name, ct, segments)
    assert pydicom.dcmread(tmp_path / "a.dcm").Modality == "SEG"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz"))), liver)
    assert slicerio.read_segmentation(str(tmp_path / "a.seg.nrrd"))["segments"][0]["name"] == "liver"
    with pytest.raises(OutputError, match="unknown output type"):
        write_segmentation(tmp_path / "a.png", ct, segments)


def test_existing_output_is_kept_without_overwrite(dicom_ct, tmp_path):
    ct, liver, spine = dicom_ct
    target = tmp_path / "seg.seg.nrrd"
    write_seg_nrrd(target, ct, [Segment("liver", mask=liver)])
    before = target.read_bytes()
    with pytest.raises(OutputError, match=r"seg.seg.nrrd: already exists; pass --overwrite"):
        write_seg_nrrd(target, ct, [Segment("spine", mask=spine)])
    assert target.read_bytes() == before
    write_seg_nrrd(target, ct, [Segment("spine", mask=spine)], overwrite=True)
    assert slicerio.read_segmentation(str(target))["segments"][0]["name"] == "spine"
    # NIfTI: an existing sidecar blocks the pair, and the image is not written either
    (tmp_path / "lab.json").write_text("{}")
    with pytest.raises(OutputError, match="lab.json: already exists"):
        write_nifti_labelmap(tmp_path / "lab.nii.gz", ct, [Segment("liver", mask=liver)])
    assert not (tmp_path / "lab.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab.json", "seg.seg.nrrd"]  # no temporaries left


@pytest.mark.parametrize("where, message", [
    (lambda t: t / "missing" / "out.seg.nrrd", "does not exist"),
    (lambda t: (t / "file.txt").write_text("x") and t / "file.txt" / "out.seg.nrrd", "is not a folder"),
    (lambda t: t, "is a folder"),
    (lambda t: Path("/proc/medsegx_out.seg.nrrd"), "cannot write the output|not writable"),
])
def test_unwritable_output_is_an_output_error(dicom_ct, tmp_path, where, message):
    ct, liver, _ = dicom_ct
    target = where(tmp_path)
    with pytest.raises(OutputError, match=message) as info:
        write_seg_nrrd(target, ct, [Segment("liver", mask=liver)])
    assert "\n" not in str(info.value)
    assert not target.is_file()


def test_a_failing_writer_leaves_nothing(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_outputs([tmp_path / "a.nii.gz", tmp_path / "a.json"]) as temps:
            temps[0].write_bytes(b"half")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_segment_checks(dicom_ct, tmp_path):
    ct, liver, _ = dicom_ct
    with pytest.raises(GeometryError, match="does not match the reference"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", ct, [Segment("liver", mask=liver[:2])])
    with pytest.raises(InputError, match="either a mask or a labelmap"):
        Segment("liver")
    with pytest.raises(InputError, match="colour"):
        Segment("liver", mask=liver, color=(255, 0, 0))
    with pytest.raises(InputError, match="no segments"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", ct, [])


def test_terminology_table():
    terminology, color = lookup("kidney_left")
    assert terminology.type.value == "64033007" and terminology.type_modifier == LEFT
    assert lookup("Left Kidney")[0] == terminology and terminology.label == "Kidney, Left"
    assert lookup("lung_upper_lobe_left") is None and lookup("left right kidney") is None
    assert lookup("IVC")[0].type.meaning == "Inferior vena cava" and lookup("tumour")[0].type.meaning == "Mass"
    assert terminology.to_slicer_string() == ("Segmentation category and type - 3D Slicer General Anatomy list"
                                              "~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney"
                                              "~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^")
    assert slicerio_segmentation.terminology_entry_from_string(terminology.to_slicer_string()) == terminology.to_slicerio() | {
        "anatomicContextName": "Anatomic codes - DICOM master list"}


def test_read_label_names_formats(data_dir, tmp_path):
    names, _ = read_label_names(str(data_dir / "ct/chest_ct_aorta_crop_labels.json"))
    assert names[1] == "aorta" and names[5] == "vertebrae_T12"
    mr, _ = read_label_names(str(data_dir / "totalsegmentator_class_map.json"), key="total_mr")
    assert mr[1] == "spleen"
    with pytest.raises(InputError, match="several label maps \\(total, total_mr\\)"):
        read_label_names(str(data_dir / "totalsegmentator_class_map.json"))
    assert read_label_names("liver, spleen")[0] == {1: "liver", 2: "spleen"}
    assert read_label_names("5=liver,1=spleen")[0] == {5: "liver", 1: "spleen"}
    (tmp_path / "table.ctbl").write_text("# Slicer colour table\n0 background 0 0 0 0\n3 liver 255 0 0 255\n")
    with pytest.raises(InputError, match="must be positive"):
        read_label_names(str(tmp_path / "table.ctbl"))
    (tmp_path / "table.ctbl").write_text("# Slicer colour table\n3 liver 255 0 0 255\n")
    assert read_label_names(str(tmp_path / "table.ctbl")) == ({3: "liver"}, {3: (1.0, 0.0, 0.0)})
    (tmp_path / "bad.json").write_text("{1: liver")
    with pytest.raises(InputError, match="not valid JSON"):
        read_label_names(str(tmp_path / "bad.json"))
    with pytest.raises(InputError, match="not a mix"):
        read_label_names("1=liver,spleen")
    with pytest.raises(InputError, match="no such names file"):
        read_label_names(str(tmp_path / "absent.json"))
    # the nested map's key after the file name, and inline lists too long to be a file name
    assert read_label_names(f"{data_dir / 'totalsegmentator_class_map.json'}:total_mr")[0] == mr
    long_inline = ",".join(f"{value}=structure number {value}" for value in range(1, 200))
    assert len(read_label_names(long_inline)[0]) == 199
