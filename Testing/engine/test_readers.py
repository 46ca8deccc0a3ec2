"""Readers: every shared data file with the geometry SimpleITK / nibabel / pydicom give, and every bad input refused."""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medsegx_core.data.readers import dicom_series_files, read_labelmap, read_volume
from medsegx_core.data.volume import LPS_FROM_RAS
from medsegx_core.errors import Cancelled, GeometryError, InputError
from medsegx_core.progress import CancelToken

ITK_FILES = [
    "ct/chest_ct_aorta_crop.nii.gz", "ct/chest_ct_aorta_crop_labels.nii.gz",
    "ct/chest_ct_pulmonary_crop.nii.gz", "ct/chest_ct_pulmonary_crop_labels.nii.gz",
    "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz",
    "ct/totalseg_ct_small.nii.gz", "ct/totalseg_ct_small_labels.nii.gz",
    "mri/totalseg_mr.nii.gz", "mri/totalseg_mr_labels.nii.gz",
    "mri/brain_tumor_t1.nrrd", "mri/brain_tumor_t1_label.nrrd",
    "dicom/ct_3slice/liver_seg.nrrd", "dicom/ct_3slice/spine_seg.nrrd", "dicom/ct_3slice/heart_seg.nrrd",
    "dicom/ct_3slice/liver_spine_seg.nrrd",
    "ct/thorax_abdomen_ct.nii.gz", "ct/thorax_abdomen_ct_labels.nii.gz",
    "ct/msd_spleen_8_ct.nii.gz", "ct/msd_spleen_8_ct_labels.nii.gz",
] + [f"mri/chaos_t2spir/chaos_t2_{nn}_{kind}.nii.gz" for kind in ("mr", "label")
       for nn in ("01", "02", "03", "05", "08", "10", "13", "15", "19", "20")]
FREESURFER_FILES = ["mri/brain_t1.mgz", "mri/brain_t1_aparc_aseg.mgz"]
DICOM_SERIES = {"dicom/ct_3slice": "CT", "dicom/mr_3slice": "MR"}
NOT_VOLUMES = {".json", ".md"}  # sidecars; liver_SEG.dcm is checked by the writer tests
SMALL_CT = "ct/totalseg_ct_small.nii.gz"


def assert_matches_sitk(volume, image):
    assert volume.shape_ijk == image.GetSize()
    assert np.allclose(volume.spacing, image.GetSpacing(), atol=1e-9)
    assert np.allclose(volume.origin_lps, image.GetOrigin(), atol=1e-9)
    assert np.allclose(volume.direction_lps, np.reshape(image.GetDirection(), (3, 3)), atol=1e-9)
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image))
    # voxel -> world of a far corner, straight from ITK
    far = tuple(float(n - 1) for n in image.GetSize())
    assert np.allclose(volume.ijk_to_lps_points(far), image.TransformContinuousIndexToPhysicalPoint(far), atol=1e-6)


def test_the_lists_cover_every_shared_data_file(data_dir):
    listed = set(ITK_FILES) | set(FREESURFER_FILES) | {"dicom/ct_3slice/liver_SEG.dcm"}
    dicom_members = {str(p.relative_to(data_dir)) for folder in DICOM_SERIES for p in (data_dir / folder).glob("*")}
    present = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()
               and p.suffix not in NOT_VOLUMES}
    missing = present - listed - {m for m in dicom_members if m.endswith(".dcm")}
    assert not missing, f"shared data files no reader test covers: {sorted(missing)}"


@pytest.mark.parametrize("relative", ITK_FILES)
def test_itk_formats_read_with_simpleitk_geometry(data_dir, relative):
    volume = read_volume(data_dir / relative)
    assert_matches_sitk(volume, sitk.ReadImage(str(data_dir / relative)))
    assert volume.source == str(data_dir / relative) and volume.modality is None


@pytest.mark.parametrize("relative", FREESURFER_FILES)
def test_freesurfer_reads_with_nibabel_ras_affine(data_dir, relative):
    volume = read_volume(data_dir / relative)
    image = nib.load(str(data_dir / relative))
    assert np.allclose(volume.ijk_to_ras, image.affine, atol=1e-6)  # the .mgz affine is voxel -> RAS
    expected = np.asarray(image.dataobj)
    assert volume.array.shape == expected.shape[::-1] and volume.array.dtype.isnative
    assert np.array_equal(volume.array, expected.transpose(2, 1, 0))
    assert np.array_equal(volume.array[3, 100, 50], expected[50, 100, 3])


@pytest.mark.parametrize("folder, modality", sorted(DICOM_SERIES.items()))
def test_dicom_series_geometry_matches_simpleitk_and_the_slice_headers(data_dir, folder, modality):
    volume = read_volume(data_dir / folder)
    files = dicom_series_files(data_dir / folder)
    assert len(files) == 3 and all(f.endswith(".dcm") and "SEG" not in f for f in files)
    assert volume.modality == modality and volume.shape_ijk[2] == 3
    assert_matches_sitk(volume, sitk.ReadImage(files))
    # independent check: each slice's ImagePositionPatient (LPS) is the world position of voxel (0, 0, k)
    for name in files:
        header = pydicom.dcmread(name, stop_before_pixels=True)
        ijk = volume.lps_to_ijk_points(np.asarray(header.ImagePositionPatient, dtype=float))
        assert np.allclose(ijk[:2], 0, atol=1e-4) and abs(ijk[2] - round(ijk[2])) < 1e-4
        assert np.allclose(volume.spacing[:2], np.asarray(header.PixelSpacing, float)[::-1])
    # one file of the series reads the whole series
    one = read_volume(Path(files[1]))
    assert one.same_grid(volume) and np.array_equal(one.array, volume.array) and one.modality == modality


def test_compressed_transfer_syntax_reads_like_the_uncompressed_series(data_dir, tmp_path):
    for name in dicom_series_files(data_dir / "dicom/ct_3slice"):
        dataset = pydicom.dcmread(name)
        dataset.compress(pydicom.uid.RLELossless)
        dataset.save_as(tmp_path / Path(name).name)
    assert pydicom.dcmread(tmp_path / "01.dcm").file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    compressed, plain = read_volume(tmp_path), read_volume(data_dir / "dicom/ct_3slice")
    assert compressed.same_grid(plain, tol=1e-9) and np.array_equal(compressed.array, plain.array)
    assert compressed.modality == "CT"


def test_read_labelmap_on_the_reference_grid(data_dir):
    reference = read_volume(data_dir / "ct/totalseg_ct.nii.gz")
    labels = read_labelmap(data_dir / "ct/totalseg_ct_labels.nii.gz", reference)
    assert labels.same_grid(reference, tol=0) and labels.array.dtype == np.uint8 and labels.modality is None
    assert np.array_equal(labels.array, sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct/totalseg_ct_labels.nii.gz"))))
    assert len(np.unique(labels.array)) == 62  # background + 61 classes


def test_labelmap_on_another_grid_is_a_geometry_error(data_dir, tmp_path):
    reference = read_volume(data_dir / "ct/totalseg_ct.nii.gz")
    with pytest.raises(GeometryError, match=r"totalseg_ct_small_labels.nii.gz is not on the grid of .*size"):
        read_labelmap(data_dir / "ct/totalseg_ct_small_labels.nii.gz", reference)
    shifted = sitk.ReadImage(str(data_dir / "ct/totalseg_ct_labels.nii.gz"))
    shifted.SetOrigin(tuple(np.add(shifted.GetOrigin(), (0, 0, 1.5))))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    with pytest.raises(GeometryError, match="origin"):
        read_labelmap(tmp_path / "shifted.nii.gz", reference)


def test_fractional_labelmap_is_refused(data_dir, tmp_path):
    reference = read_volume(data_dir / SMALL_CT)
    sitk.WriteImage(reference.to_sitk(reference.array.astype(np.float32) / 7), str(tmp_path / "frac.nrrd"))
    with pytest.raises(InputError, match="whole-number"):
        read_labelmap(tmp_path / "frac.nrrd", reference)


def test_progress_and_cancel(data_dir):
    seen = []
    read_volume(data_dir / SMALL_CT, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        read_volume(data_dir / SMALL_CT, cancel=token)


# ---- bad inputs: each one a clear one-line InputError naming the file ---------------------------------------------
def write_image(path, array, spacing=(1.0, 1.0, 1.0, 1.0), vector=False):
    image = sitk.GetImageFromArray(array, isVector=vector)
    image.SetSpacing(spacing[:image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def truncated_copy(source, target):
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: len(data) * 2 // 3])
    return target


def small_ct_as(data_dir, tmp_path, suffix, compress):
    path = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / SMALL_CT)), str(path), compress)
    return truncated_copy(path, tmp_path / f"truncated{suffix}")


BAD_INPUTS = {
    "missing": (lambda d, t: t / "absent.nii.gz", "no such file"),
    "truncated .nii.gz": (lambda d, t: truncated_copy(d / SMALL_CT, t / "cut.nii.gz"), "truncated"),
    "truncated .nii": (lambda d, t: small_ct_as(d, t, ".nii", False), "truncated"),
    "truncated .nrrd": (lambda d, t: small_ct_as(d, t, ".nrrd", True), "corrupt or truncated"),
    "truncated .mha": (lambda d, t: small_ct_as(d, t, ".mha", False), "corrupt or truncated"),
    "garbage .nii.gz": (lambda d, t: (t / "junk.nii.gz").write_bytes(b"not an image" * 40) and t / "junk.nii.gz",
                        "unsupported or unrecognised"),
    "unsupported .txt": (lambda d, t: (t / "notes.txt").write_text("hello") and t / "notes.txt", "unsupported"),
    "truncated .mgz": (lambda d, t: truncated_copy(d / "mri/brain_t1.mgz", t / "brain.mgz"), "corrupt or truncated"),
    "2D image": (lambda d, t: write_image(t / "slice.nrrd", np.zeros((20, 30), np.int16)), "2D image"),
    "single slice": (lambda d, t: write_image(t / "one.nii.gz", np.zeros((1, 20, 30), np.int16)), "a single slice"),
    "4D image": (lambda d, t: write_image(t / "4d.nii.gz", np.zeros((3, 4, 5, 6), np.int16)), "4D image"),
    "RGB image": (lambda d, t: write_image(t / "rgb.nrrd", np.zeros((4, 5, 6, 3), np.uint8), vector=True),
                  "RGB or vector"),
    "NaN voxels": (lambda d, t: write_image(t / "nan.nrrd", np.where(np.eye(6)[None] > 0, np.nan, 1.0)
                                            .repeat(4, 0).astype(np.float32)), "24 voxels are NaN or infinite"),
    "Inf voxels": (lambda d, t: write_image(t / "inf.mha", np.full((3, 4, 5), np.inf, np.float64)),
                   "NaN or infinite"),
    "empty folder": (lambda d, t: (t / "empty").mkdir() or t / "empty", "empty folder"),
    "folder without DICOM": (lambda d, t: (t / "other").mkdir() or shutil.copy(d / SMALL_CT, t / "other") and
                             t / "other", "no DICOM files in this folder"),
    "folder with only a DICOM SEG": (lambda d, t: (t / "seg").mkdir() or shutil.copy(
        d / "dicom/ct_3slice/liver_SEG.dcm", t / "seg") and t / "seg", "no DICOM image series"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(data_dir, tmp_path, case):
    make, problem = BAD_INPUTS[case]
    path = make(data_dir, tmp_path)
    with pytest.raises(InputError) as info:
        read_volume(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message, message


def test_four_d_with_one_time_point_is_a_3d_volume(tmp_path):
    array = np.arange(60, dtype=np.int16).reshape(1, 3, 4, 5)
    volume = read_volume(write_image(tmp_path / "t1.nii.gz", array))
    assert volume.shape_ijk == (5, 4, 3) and np.array_equal(volume.array, array[0])


def test_dicom_folder_with_a_damaged_or_unevenly_spaced_slice_is_refused(data_dir, tmp_path):
    files = dicom_series_files(data_dir / "dicom/ct_3slice")
    for name in files:
        shutil.copy(name, tmp_path)
    truncated_copy(tmp_path / "02.dcm", tmp_path / "02.dcm")
    with pytest.raises(InputError, match=r"02.dcm: a DICOM file of this series that cannot be decoded"):
        read_volume(tmp_path)
    shutil.copy(data_dir / "dicom/ct_3slice/02.dcm", tmp_path)
    # move one slice 1.5 mm further: gaps of 1 and 2.5 mm, which ITK would average into one spacing silently
    moved = pydicom.dcmread(tmp_path / "01.dcm")
    moved.ImagePositionPatient[2] += 1.5
    moved.save_as(tmp_path / "01.dcm")
    with pytest.raises(InputError, match="unevenly spaced"):
        read_volume(tmp_path)


def test_folder_with_two_series_asks_which(data_dir, tmp_path):
    for folder in DICOM_SERIES:
        for name in dicom_series_files(data_dir / folder):
            shutil.copy(name, tmp_path / f"{Path(folder).name}_{Path(name).name}")
    with pytest.raises(InputError, match="holds 2 DICOM image series"):
        read_volume(tmp_path)
    assert read_volume(tmp_path / "mr_3slice_1-002.dcm").modality == "MR"
    ct_uid = pydicom.dcmread(tmp_path / "ct_3slice_01.dcm").SeriesInstanceUID
    assert read_volume(tmp_path, series_uid=ct_uid).modality == "CT"
    assert np.allclose(read_volume(tmp_path, series_uid=ct_uid).origin_ras,
                       LPS_FROM_RAS @ pydicom.dcmread(tmp_path / "ct_3slice_03.dcm").ImagePositionPatient)


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".nhdr", ".nrrd", ".nii"])
def test_every_itk_format_round_trips_an_oblique_volume(data_dir, tmp_path, suffix):
    """The shared data has no MetaImage or detached NRRD: write the small CT in each, on an oblique flipped grid."""
    image = sitk.ReadImage(str(data_dir / SMALL_CT))
    c, s = np.cos(np.radians(25)), np.sin(np.radians(25))
    image.SetDirection(tuple((np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1, -1, -1])).ravel()))
    sitk.WriteImage(image, str(tmp_path / f"ct{suffix}"))
    volume = read_volume(tmp_path / f"ct{suffix}")
    assert_matches_sitk(volume, sitk.ReadImage(str(tmp_path / f"ct{suffix}")))
    # and the oblique axes survived the file (NIfTI keeps float32 geometry, hence the tolerance)
    assert np.allclose(volume.direction_lps, np.reshape(image.GetDirection(), (3, 3)), atol=1e-5)
    assert np.allclose(volume.origin_lps, image.GetOrigin(), atol=1e-3)
