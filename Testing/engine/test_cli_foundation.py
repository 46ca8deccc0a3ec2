"""``medsegx info`` and ``medsegx convert`` on the real data: output, exit codes, one-line errors, no stray files."""
import json
import shutil
import subprocess
import sys

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsegx_core.cli import main
from medsegx_core.data.readers import read_volume

CT_LABELS = "ct/totalseg_ct_labels.nii.gz"   # the reference CT's labels


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text_and_json_agree_with_the_volume(capsys, reference_ct):
    volume = read_volume(reference_ct)
    code, out, _ = run_cli(capsys, "info", reference_ct)
    assert code == 0
    assert "size (ijk):  122 x 101 x 112 voxels of int32" in out and "spacing:     3 x 3 x 3 mm" in out
    assert f"intensity:   {volume.array.min():g} .. {volume.array.max():g}" in out
    assert "axes:        RAS" in out and "modality:    unknown" in out
    code, out, _ = run_cli(capsys, "info", reference_ct, "--json")
    info = json.loads(out)
    assert info["size_ijk"] == [122, 101, 112] and info["intensity_max"] == float(volume.array.max())
    assert np.allclose(info["origin_lps"], sitk.ReadImage(str(reference_ct)).GetOrigin(), atol=1e-5)
    assert np.allclose(info["ijk_to_ras"], volume.ijk_to_ras, atol=1e-5)


def test_info_on_a_dicom_series_shows_the_modality(capsys, data_dir):
    code, out, _ = run_cli(capsys, "info", data_dir / "dicom/mr_3slice", "--json")
    info = json.loads(out)
    assert code == 0 and info["modality"] == "MR" and info["size_ijk"] == [512, 512, 3]
    assert info["axis_code"] == "LPS"  # DICOM's usual: rows run right-to-left, columns front-to-back


def test_info_on_a_bad_file_is_one_line_and_exit_1(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    code, out, err = run_cli(capsys, "info", tmp_path / "notes.txt")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("medsegx: error: ") and "notes.txt: unsupported" in err


def test_convert_totalsegmentator_labels_to_seg_nrrd(capsys, data_dir, reference_ct, tmp_path):
    out_path = tmp_path / "ct.seg.nrrd"
    code, out, err = run_cli(capsys, "convert", data_dir / CT_LABELS, "--reference", reference_ct,
                             "--names", data_dir / "totalsegmentator_class_map.json", "--names-key", "total",
                             "-o", out_path)
    assert code == 0, err
    assert "61 segments" in out
    back = slicerio.read_segmentation(str(out_path))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / CT_LABELS)))
    liver = slicerio.segment_mask(back, "liver").transpose(2, 1, 0)
    assert np.array_equal(liver, labels == 5) and len(back["segments"]) == 61
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.seg.nrrd"]


def test_convert_picks_up_the_sidecar_and_writes_nifti_with_names(capsys, data_dir, tmp_path):
    out_path = tmp_path / "aorta.nii.gz"
    code, out, err = run_cli(capsys, "convert", data_dir / "ct/chest_ct_aorta_crop_labels.nii.gz",
                             "--reference", data_dir / "ct/chest_ct_aorta_crop.nii.gz", "-o", out_path)
    assert code == 0 and "label names from" in err and "chest_ct_aorta_crop_labels.json" in err
    sidecar = json.loads((tmp_path / "aorta.json").read_text())
    assert [entry["name"] for entry in sidecar["labels"]] == ["aorta", "brachiocephalic_trunk", "celiac_trunk",
                                                             "superior_mesenteric_artery", "vertebrae_T12"]
    assert sidecar["labels"][0]["terminology"].endswith("SCT^15825003^Aorta~^^~Anatomic codes - DICOM master list~^^~^^")
    original = sitk.ReadImage(str(data_dir / "ct/chest_ct_aorta_crop_labels.nii.gz"))
    written = sitk.ReadImage(str(out_path))
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    assert np.allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)


def test_convert_to_dicom_seg_with_inline_names(capsys, data_dir, tmp_path):
    out_path = tmp_path / "liver_seg"
    code, out, err = run_cli(capsys, "convert", data_dir / "dicom/ct_3slice/liver_seg.nrrd",
                             "--reference", data_dir / "dicom/ct_3slice", "--names", "liver",
                             "--format", "dicom-seg", "-o", out_path)
    assert code == 0, err
    seg = hd.seg.segread(str(out_path))
    assert [d.segment_label for d in seg.SegmentSequence] == ["liver"]
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "dicom/ct_3slice/liver_seg.nrrd"))) > 0
    assert int(seg.get_volume().array.sum()) == int(liver.sum())


def test_existing_output_needs_overwrite(capsys, data_dir, tmp_path):
    out_path = tmp_path / "x.seg.nrrd"
    out_path.write_text("the user's file")
    args = ["convert", data_dir / "ct/chest_ct_pulmonary_crop_labels.nii.gz",
            "--reference", data_dir / "ct/chest_ct_pulmonary_crop.nii.gz", "-o", out_path]
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "x.seg.nrrd: already exists; pass --overwrite" in err
    assert out_path.read_text() == "the user's file"
    code, _, _ = run_cli(capsys, *args, "--overwrite")
    assert code == 0
    assert [s["name"] for s in slicerio.read_segmentation(str(out_path))["segments"]] == ["pulmonary_artery", "heart"]


@pytest.mark.parametrize("case, message", [
    ("grid", "is not on the grid of"),
    ("unwritable", "does not exist"),
    ("names", "no such names file"),
    ("extension", "unknown output type"),
])
def test_convert_errors_exit_1_and_write_nothing(capsys, data_dir, reference_ct, tmp_path, case, message):
    labelmap, reference, output = data_dir / CT_LABELS, reference_ct, tmp_path / "out.seg.nrrd"
    extra = []
    if case == "grid":
        labelmap = data_dir / "ct/totalseg_ct_small_labels.nii.gz"
    elif case == "unwritable":
        output = tmp_path / "no such folder" / "out.seg.nrrd"
    elif case == "names":
        extra = ["--names", tmp_path / "names.json"]
    else:
        output = tmp_path / "out.png"
    code, out, err = run_cli(capsys, "convert", labelmap, "--reference", reference, "-o", output, *extra)
    assert code == 1 and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_console_script_runs_and_sets_the_exit_code(data_dir, tmp_path):
    script = shutil.which("medsegx") or f"{sys.executable} -m medsegx_core"
    done = subprocess.run(f"{script} info {data_dir / 'ct/totalseg_ct_small.nii.gz'}", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "122 x 101 x 30" in done.stdout
    failed = subprocess.run(f"{script} info {tmp_path / 'absent.nii.gz'}", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert failed.returncode == 1 and "absent.nii.gz: no such file" in failed.stderr
