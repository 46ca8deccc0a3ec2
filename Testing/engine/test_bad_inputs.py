"""Every command refuses bad input the same way: exit 1, no traceback, one line on stderr naming the file and the
problem, nothing left in the output folder and the user's files there untouched.

The corpus (Testing/bad_input_corpus.py) is written by the tests: truncated, random, empty and renamed files, 2D,
single-slice, single-voxel, RGB, 4D, NaN, Inf and blank volumes, empty and non-DICOM folders, and pickled,
malicious, truncated, mis-shaped and non-checkpoint weights. The Slicer batch script runs the same corpus in
Testing/slicer_logic/test_batch_bad_inputs.py. Also here: hostile requests (a box without size, one file named
twice, an output that cannot be written), Ctrl+C in 'finetune', and the DICOM SEG of a JPEG 2000 CT series whose
files carry an empty SOPClassUID (as some PACS export them).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bad_input_corpus as corpus
from medsegx_core.cli import main

PREFIX = "medsegx: "


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    segvol = fixtures_dir / "segvol_parity"
    return {"weights": segvol / "public" / "model.safetensors", "tokenizer": segvol / "tokenizer"}


@pytest.fixture
def good(tmp_path):
    return corpus.good_inputs(tmp_path)


def run_cli(capfd, argv):
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


VOLUME_ENTRY_POINTS = {
    "info": lambda bad, good, tiny, out: ["info", bad],
    "segment": lambda bad, good, tiny, out: ["segment", bad, "--text", "liver", "--weights", tiny["weights"],
                                             "--tokenizer", tiny["tokenizer"], "-o", out / "liver.seg.nrrd",
                                             "--labelmap", out / "liver.nii.gz"],
    "convert": lambda bad, good, tiny, out: ["convert", good["labels"], "--reference", bad, "--names", "1=liver",
                                             "-o", out / "labels.seg.nrrd"],
    "finetune": lambda bad, good, tiny, out: ["finetune", "--base", tiny["weights"], "--image", bad, "--label",
                                              good["labels"], "--names", "1=liver", "-o",
                                              out / "pack.safetensors", "--steps", "1", "--quiet"],
}


@pytest.mark.parametrize("entry", sorted(VOLUME_ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(corpus.VOLUMES))
def test_bad_volume(capfd, tmp_path, good, tiny, case, entry):
    bad = corpus.VOLUMES[case].make(tmp_path)
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, stdout, err = run_cli(capfd, VOLUME_ENTRY_POINTS[entry](bad, good, tiny, out))
    if entry == "info" and case in corpus.INFO_ACCEPTS:
        assert code == 0 and corpus.INFO_ACCEPTS[case] in stdout and err == "", (stdout, err)
    else:
        corpus.check_refusal(code, err, PREFIX, bad, corpus.VOLUMES[case].problems(entry))
    assert corpus.folder_state(out) == before


CHECKPOINT_ENTRY_POINTS = {
    "weights import": lambda bad, good, tiny, out: ["weights", "import", bad, "-o", out / "imported"],
    "segment": lambda bad, good, tiny, out: ["segment", good["ct"], "--text", "liver", "--weights", bad,
                                             "--tokenizer", tiny["tokenizer"], "-o", out / "liver.seg.nrrd"],
    "finetune": lambda bad, good, tiny, out: ["finetune", "--base", bad, "--tokenizer", tiny["tokenizer"],
                                              "--image", good["ct"], "--label", good["labels"], "--names",
                                              "1=liver", "-o", out / "pack.safetensors", "--steps", "1",
                                              "--quiet"],
}


@pytest.mark.parametrize("entry", sorted(CHECKPOINT_ENTRY_POINTS))
@pytest.mark.parametrize("case", ["pickled object", "malicious pickle", "plain Python pickle", "wrong shapes",
                                  "truncated checkpoint", "random bytes", "empty file", "a NIfTI image"])
def test_bad_weights(capfd, tmp_path, good, tiny, case, entry):
    bad = corpus.checkpoints(tiny["weights"])[case].make(tmp_path)
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, _, err = run_cli(capfd, CHECKPOINT_ENTRY_POINTS[entry](bad, good, tiny, out))
    corpus.check_refusal(code, err, PREFIX, bad, corpus.checkpoints(tiny["weights"])[case].problem)
    assert "UserWarning" not in err
    assert not (tmp_path / corpus.MALICIOUS_MARKER).exists()  # the malicious pickle never ran
    assert corpus.folder_state(out) == before


def _segment(good, tiny, out, *extra):
    return ["segment", good["ct"], "--weights", tiny["weights"], "--tokenizer", tiny["tokenizer"], *extra]


HOSTILE_REQUESTS = {
    # a box whose corners are one point (RAS of voxel 10, 12, 6's centre): nothing to segment
    "box without size": (lambda good, tiny, out: _segment(good, tiny, out, "--box", -15, -18, 18, -15, -18, 18,
                                                          "-o", out / "x.seg.nrrd"),
                         "has no size inside the volume"),
    "-o and --labelmap the same file": (
        lambda good, tiny, out: _segment(good, tiny, out, "--text", "liver", "-o", out / "o.nii.gz",
                                         "--labelmap", out / "o.nii.gz"), "named twice among the outputs"),
    "-o's names file is --labelmap's": (
        lambda good, tiny, out: _segment(good, tiny, out, "--text", "liver", "-o", out / "o.nii.gz",
                                         "--labelmap", out / "o.nii"), "named twice among the outputs"),
    "unwritable output folder": (lambda good, tiny, out: _segment(good, tiny, out, "--text", "liver", "-o",
                                                                  "/proc/liver.seg.nrrd"), "is not writable"),
    "output exists": (lambda good, tiny, out: _segment(good, tiny, out, "--text", "liver", "-o",
                                                       out / "earlier_result.seg.nrrd"), "already exists"),
    "DICOM SEG of a NIfTI volume": (lambda good, tiny, out: _segment(good, tiny, out, "--text", "liver", "-o",
                                                                     out / "liver.dcm"),
                                    "DICOM SEG needs the source DICOM series"),
    "convert to an existing file": (
        lambda good, tiny, out: ["convert", good["labels"], "--reference", good["ct"], "-o",
                                 out / "earlier_result.seg.nrrd"], "already exists"),
    "finetune history is the pack": (
        lambda good, tiny, out: ["finetune", "--base", tiny["weights"], "--image", good["ct"], "--label",
                                 good["labels"], "--names", "1=liver", "-o", out / "p.safetensors", "--history",
                                 out / "p.safetensors", "--steps", "1", "--quiet"], "named twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUESTS))
def test_hostile_request_is_refused_before_any_work(capfd, tmp_path, good, tiny, case):
    make, problem = HOSTILE_REQUESTS[case]
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, _, err = run_cli(capfd, make(good, tiny, out))
    lines = corpus.visible_lines(err)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("medsegx: error: ") and problem in lines[0], err
    assert "overwrite=True" not in err and "Traceback" not in err
    assert "zoom-out" not in err and "loading" not in err  # refused before the weights were read
    assert corpus.folder_state(out) == before


# ---- Ctrl+C in finetune -------------------------------------------------------------------------------------------
def test_finetune_interrupted_exits_130_and_leaves_nothing(tmp_path, good, tiny):
    """SIGINT once the first training state exists: exit 130, one line, no pack, no training state left."""
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    pack = out / "pack.safetensors"
    state = out / "pack.train-state.safetensors"
    process = subprocess.Popen(
        [sys.executable, "-m", "medsegx_core", "finetune", "--base", str(tiny["weights"]), "--tokenizer",
         str(tiny["tokenizer"]), "--image",
         str(good["ct"]), "--label", str(good["labels"]), "--names", "1=liver", "-o", str(pack), "--steps", "100000",
         "--val-every", "1", "--quiet", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert state.exists(), process.communicate(timeout=5)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert corpus.visible_lines(err) == ["medsegx: interrupted; nothing was written"], err
    assert corpus.folder_state(out) == before  # no pack, no training state, no temporary file


def test_an_interrupted_resume_keeps_the_training_state_it_continued(tmp_path):
    """With --resume the state existed before the run: Ctrl+C keeps it (it holds the progress) and says so."""
    from medsegx_core.cli.finetune import _after_interruption
    from medsegx_core.errors import Cancelled

    state = tmp_path / "pack.train-state.safetensors"
    state.write_bytes(b"the progress so far")
    (tmp_path / ".pack.train-state.safetensors.partial").write_bytes(b"half written")
    with pytest.raises(Cancelled, match=r"training state .* holds the progress so far \(--resume continues"):
        _after_interruption(state, state_existed=True)
    assert [p.name for p in tmp_path.iterdir()] == [state.name] and state.read_bytes() == b"the progress so far"


# ---- DICOM SEG of a JPEG 2000 series with an empty SOPClassUID ------------------------------------------------------
def jpeg2000_series_with_empty_sop_class(source: Path, folder: Path) -> Path:
    """The real CT series re-encoded as JPEG 2000 (GDCM, lossless) with the SOPClassUID element emptied, the file
    meta's MediaStorageSOPClassUID kept: how some PACS export series."""
    import locale

    import pydicom
    import SimpleITK as sitk

    folder.mkdir()
    saved_locale = locale.setlocale(locale.LC_ALL)  # ITK's GDCM writer sets the C locale and leaves it so
    try:
        _write_jpeg2000_series(source, folder, sitk, pydicom)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return folder


def _write_jpeg2000_series(source: Path, folder: Path, sitk, pydicom) -> None:
    for file in sorted(source.glob("0*.dcm")):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.LoadPrivateTagsOn()
        reader.SetOutputPixelType(sitk.sitkInt16)  # stored values stay 16 bit (OpenJPEG decodes up to 31)
        image = reader.Execute()
        for key in reader.GetMetaDataKeys():
            image.SetMetaData(key, reader.GetMetaData(key))
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetImageIO("GDCMImageIO")
        writer.SetCompressor("JPEG2000")
        writer.UseCompressionOn()
        writer.SetFileName(str(folder / file.name))
        writer.Execute(image)
        dataset = pydicom.dcmread(folder / file.name)
        assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
        dataset.SOPClassUID = ""
        dataset.save_as(folder / file.name)


@pytest.fixture
def jpeg2000_series(data_dir, tmp_path):
    return jpeg2000_series_with_empty_sop_class(data_dir / "dicom" / "ct_3slice", tmp_path / "j2k")


def seg_on_ct_grid(seg_path: Path, series: Path) -> np.ndarray:
    """The DICOM SEG's first segment as a (k, j, i) mask on the CT's grid, placed frame by frame through the source
    SOP instance each frame references and checked against the frame's own position."""
    import highdicom as hd
    import pydicom

    from medsegx_core.data.readers import dicom_series_files, read_volume

    volume = read_volume(series)
    seg = hd.seg.segread(str(seg_path))
    assert seg.SegmentSequence[0].SegmentNumber == 1
    k_of_uid = {}
    for name in dicom_series_files(series):
        dataset = pydicom.dcmread(name, stop_before_pixels=True)
        ijk = volume.lps_to_ijk_points(np.asarray(dataset.ImagePositionPatient, float))
        k_of_uid[dataset.SOPInstanceUID] = int(round(ijk[2]))
    mask = np.zeros(volume.array.shape, np.uint8)
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(k_of_uid), segment_numbers=[1])
    for uid, frame in zip(k_of_uid, pixels[..., 0]):
        mask[k_of_uid[uid]] = frame
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame sits exactly on its CT slice
        position = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        ijk = volume.lps_to_ijk_points(position)
        assert np.allclose(ijk[:2], 0, atol=1e-3) and abs(ijk[2] - round(ijk[2])) < 1e-3
    return mask


def test_convert_writes_a_dicom_seg_for_a_jpeg2000_series_with_empty_sop_class(capfd, jpeg2000_series, data_dir,
                                                                              tmp_path):
    import pydicom
    import SimpleITK as sitk

    from medsegx_core.data.readers import read_volume

    assert pydicom.dcmread(next(jpeg2000_series.iterdir())).SOPClassUID == ""
    ct = read_volume(jpeg2000_series)
    assert np.array_equal(ct.array, read_volume(data_dir / "dicom" / "ct_3slice").array)  # lossless
    labels = ((ct.array > 200) & (np.indices(ct.array.shape)[2] < 300)).astype(np.uint8)
    labels_path = tmp_path / "bone.nii.gz"
    sitk.WriteImage(ct.to_sitk(labels), str(labels_path))
    output = tmp_path / "out" / "bone.dcm"
    output.parent.mkdir()
    code, _, err = run_cli(capfd, ["convert", labels_path, "--reference", jpeg2000_series, "--names", "1=bone",
                                   "-o", output])
    assert code == 0, err
    assert np.array_equal(seg_on_ct_grid(output, jpeg2000_series), labels)
    assert sorted(p.name for p in output.parent.iterdir()) == ["bone.dcm"]


def test_segment_writes_dicom_seg_and_labelmap_for_the_jpeg2000_series(capfd, jpeg2000_series, tiny, tmp_path):
    import SimpleITK as sitk

    out = tmp_path / "out"
    code, _, err = run_cli(capfd, ["segment", jpeg2000_series, "--text", "liver", "--weights", tiny["weights"],
                                   "--tokenizer", tiny["tokenizer"], "--precision", "fp32", "-o",
                                   out / "liver.dcm", "--labelmap", out / "liver.nii.gz"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["liver.dcm", "liver.json", "liver.nii.gz"]
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "liver.nii.gz")))
    assert np.array_equal(seg_on_ct_grid(out / "liver.dcm", jpeg2000_series), (labelmap == 1).astype(np.uint8))
