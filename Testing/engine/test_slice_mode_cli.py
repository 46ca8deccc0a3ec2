"""MedSegX slice mode on the command line, end to end: 'medsegx weights import' of the fixture's official split
pair, 'weights list', then 'medsegx segment' on real images (a real CT slice saved as PNG, a real MR DICOM slice
read as a 2D image, the real CT with --slice and --propagate), outputs read back with SimpleITK and slicerio, and
the refusals (one line, exit 1, nothing written). The fixture's tiny random model is the only MedSegX model here:
the masks are checked for plumbing and geometry, not anatomy."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsegx_core.cli import main
from medsegx_core.data.readers import dicom_series_files, read_image_2d
from medsegx_core.prompts import BoxPrompt, Prompts
from medsegx_core.slice_predictor import SlicePredictor
from medsegx_core.weights.medsegx2d import load_medsegx_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny model: see Testing/conftest.py


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def imported(medsegx_fixture, tmp_path_factory):
    """The official split pair imported through the CLI into a folder of ours."""
    public = medsegx_fixture / "public"
    heads = json.loads((public / "config.json").read_text())["architecture"]["mask_decoder"]["num_heads"]
    folder = tmp_path_factory.mktemp("weights") / "medsegx"
    assert main(["weights", "import", str(public / "sam_base.pth"), "--trained", str(public / "medsegx_trained.pth"),
                 "--decoder-heads", str(heads), "-o", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def ct_png(reference_ct, tmp_path_factory):
    """A real image: slice 60 of the reference CT, windowed to 8 bits and saved as PNG."""
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_ct)))[60]
    grey = np.round((np.clip(hu, -160, 240) + 160) / 400 * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("png") / "ct_slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(path))
    return path


def same_geometry(image, reference) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def segment(weights, image, output, *extra):
    return main(["segment", str(image), "--weights", str(weights), "-o", str(output), *extra])


def refusal(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("medsegx: error: "), err
    return err[-1]


def test_import_and_list(imported, home, medsegx_fixture, capsys):
    public = medsegx_fixture / "public"
    assert main(["weights", "import", str(imported / "model.safetensors"), "--name", "mx2d"]) == 0   # ours again
    capsys.readouterr()
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert "mx2d" in listing and "MedSegX 2D" in listing
    assert main(["weights", "import", str(public / "medsegx_trained.pth")]) == 1
    assert "trained-only" in refusal(capsys)
    assert main(["weights", "import", str(public / "sam_base.pth")]) == 1
    assert "--trained" in refusal(capsys)


def test_png_of_a_real_ct_slice(imported, ct_png, tmp_path, capsys):
    out = tmp_path / "liver.seg.nrrd"
    assert segment(imported, ct_png, out, "--ijk", "--box", "40", "25", "0", "100", "80", "0", "--text", "liver",
                   "--modality", "CT", "--labelmap", str(tmp_path / "liver.nii.gz"),
                   "--figure", str(tmp_path / "liver.png")) == 0
    assert "MedSegX slice mode" in capsys.readouterr().out
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["liver"]
    labelmap = sitk.ReadImage(str(tmp_path / "liver.nii.gz"))
    same_geometry(labelmap, sitk.JoinSeries([sitk.ReadImage(str(ct_png))]))
    # the same mask as the engine gives for that image and prompt
    predictor = SlicePredictor(load_medsegx_weights(imported), device="cpu")
    volume, rgb = read_image_2d(ct_png)
    predictor.set_volume(volume, modality="CT", rgb=rgb)
    expected = predictor.segment(Prompts(text="liver", box=BoxPrompt((40, 25, 0), (100, 80, 0), space="ijk"))).mask
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap) > 0, expected.astype(bool))
    assert expected.any() and (tmp_path / "liver.png").stat().st_size > 0


def test_a_real_dicom_slice_as_a_2d_image(imported, data_dir, tmp_path):
    single = tmp_path / "mr.dcm"
    shutil.copyfile(data_dir / "dicom" / "mr_3slice" / "1-001.dcm", single)
    out = tmp_path / "mr.nii.gz"
    assert segment(imported, single, out, "--ijk", "--box", "200", "200", "0", "300", "320", "0") == 0
    same_geometry(sitk.ReadImage(str(out)), sitk.ReadImage(str(single)))


def test_propagation_gives_a_3d_segment_on_the_volume_grid(imported, data_dir, tmp_path, capsys):
    ct = data_dir / "ct" / "totalseg_ct_small.nii.gz"
    out = tmp_path / "liver.nii.gz"
    assert segment(imported, ct, out, "--ijk", "--box", "40", "25", "12", "100", "80", "12", "--text", "liver",
                   "--propagate", "--labelmap", str(tmp_path / "labels.nii.gz")) == 0
    assert "slices 0..29" in capsys.readouterr().out     # this random model never stops early
    written = sitk.ReadImage(str(out))
    same_geometry(written, sitk.ReadImage(str(ct)))
    filled = np.flatnonzero(sitk.GetArrayFromImage(written).reshape(written.GetSize()[2], -1).any(axis=1))
    assert list(filled) == list(range(written.GetSize()[2]))
    # --slice: a box drawn across slices, used on one of them only
    one = tmp_path / "one.nii.gz"
    assert segment(imported, ct, one, "--ijk", "--box", "40", "25", "5", "100", "80", "10", "--slice", "7") == 0
    filled = np.flatnonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(one))).any(axis=(1, 2)))
    assert list(filled) == [7]


def test_refusals(imported, data_dir, fixtures_dir, ct_png, tmp_path, capsys):
    ct = data_dir / "ct" / "totalseg_ct_small.nii.gz"
    rgb = np.zeros((4, 20, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgb[1, 5:10, 5:10] = 30
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nrrd"))
    segvol = fixtures_dir / "segvol_parity" / "public" / "model.safetensors"
    out = tmp_path / "out.seg.nrrd"
    cases = [
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "10"], imported, "a 3D box"),
        ([ct, "--ijk", "--box", "40", "25", "5.5", "100", "80", "5.5"], imported, "on no slice"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--slice", "40"], imported, "slice 40 is not"),
        ([ct, "--text", "liver"], imported, "needs a box"),
        ([tmp_path / "rgb.nrrd", "--ijk", "--box", "2", "2", "1", "20", "15", "1"], imported, "RGB"),
        ([ct_png, "--ijk", "--box", "40", "25", "0", "100", "80", "0"], segvol, "not MedSegX's 2D model"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--propagate"], segvol, "not MedSegX's 2D model"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--min-confidence", "0.5"], imported,
         "--min-confidence applies to the volumetric"),
        # every run option is honoured or refused: slice mode runs fp32 and reads slices its own way
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--precision", "bf16"], imported,
         "MedSegX slice mode runs in fp32"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--preprocessing", "official"], imported,
         "--preprocessing official is SegVol's"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--modality", "CTT"], imported,
         "unknown modality 'CTT'"),
        ([ct, "--ijk", "--box", "40", "25", "5", "100", "80", "5", "--tokenizer", tmp_path], imported,
         "a tokenizer is for SegVol's text tower"),
    ]
    for arguments, weights, message in cases:
        assert main(["segment", *map(str, arguments), "--weights", str(weights), "-o", str(out)]) == 1, message
        line = refusal(capsys)
        assert message in line, line
        assert not out.exists()
    out.write_text("the user's file")
    assert segment(imported, ct, out, "--ijk", "--box", "40", "25", "5", "100", "80", "5") == 1
    assert "already exists" in refusal(capsys) and out.read_text() == "the user's file"


def test_dicom_seg_for_a_slice_of_a_dicom_series(imported, data_dir, tmp_path):
    import pydicom

    series = data_dir / "dicom" / "ct_3slice"
    out = tmp_path / "liver.dcm"
    assert segment(imported, series, out, "--ijk", "--box", "150", "150", "1", "350", "350", "1", "--text",
                   "liver") == 0
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    slices = dicom_series_files(series)                                 # in the volume's k order
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in slices]
    referenced = {frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for frame in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {uids[1]}                                      # only slice k = 1 holds the segment
