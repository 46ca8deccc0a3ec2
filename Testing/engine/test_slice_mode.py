"""MedSegX slice mode through the user's path: the fixture's checkpoints in every layout imported into our folder
format, loaded back, and run by ``SlicePredictor`` on the real CT the fixture was cut from (a box given as a user
gives it, the context from a structure name and a modality) reproduce the official numbers of every fixture case;
2D images (a PNG and a DICOM slice written from real scans), propagation, and the refusals.

Every case, slice index, box, structure and tolerance comes from the fixture folder (``fixtures.json``,
``case_*.npz``, ``config.json``). The fixture's model is tiny and random: outputs are checked for numbers,
geometry and plumbing, not for anatomy."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fixture_paths import MEDSEGX_FIXTURE, fixture_record, is_default_fixture
from medsegx_core.data.readers import is_2d_image, read_image_2d, read_volume
from medsegx_core.data.volume import Volume
from medsegx_core.errors import Cancelled, InputError, PromptError, WeightsError
from medsegx_core.progress import CancelToken
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts
from medsegx_core.slice_predictor import SlicePredictor, box_of_mask
from medsegx_core.weights.medsegx2d import import_medsegx, load_medsegx_weights
from medsegx_core.weights.store import CONFIG_FILE, load_model, verify_folder

LAYOUTS = {"split": ("sam_base.pth", "medsegx_trained.pth"), "merged": ("full_model.pth", None),
           "safetensors": ("model.safetensors", None)}
NEAR_THRESHOLD = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny model: see Testing/conftest.py


def evaluation_cases() -> list:
    return sorted(n for n, c in fixture_record(MEDSEGX_FIXTURE).get("cases", {}).items() if "task_folder" in c)


def tolerance(record: dict, name: str) -> float:
    """A max-abs tolerance of ``fixtures.json -> proposed_tolerances`` (its text says '<= 1e-3')."""
    entry = next(text for key, text in record["proposed_tolerances"].items()
                 if name in [part.strip() for part in key.split(",")])
    return float(re.search(r"<=\s*([0-9.eE-]+)", entry).group(1))


@pytest.fixture(scope="module")
def public(medsegx_fixture):
    return medsegx_fixture / "public"


@pytest.fixture(scope="module")
def record(medsegx_fixture):
    return fixture_record(medsegx_fixture)


@pytest.fixture(scope="module")
def heads(public):
    return json.loads((public / "config.json").read_text())["architecture"]["mask_decoder"]["num_heads"]


@pytest.fixture(scope="module")
def folders(public, heads, tmp_path_factory):
    """Each layout imported into our folder format, as 'medsegx weights import' does."""
    root = tmp_path_factory.mktemp("medsegx2d")
    return {name: import_medsegx(public / weights, root / name, trained=public / trained if trained else None,
                                 decoder_heads=heads) for name, (weights, trained) in LAYOUTS.items()}


@pytest.fixture(scope="module")
def predictors(folders):
    return {name: SlicePredictor(load_medsegx_weights(folder, verify=True), device="cpu")
            for name, folder in folders.items()}


@pytest.fixture(scope="module")
def case_volume(reference_ct, medsegx_fixture):
    """The volume the fixture's slices were cut from (the reference CT), read as a user's file."""
    if not is_default_fixture(medsegx_fixture):
        pytest.skip("another fixture folder: its source volume is not the reference CT")
    return read_volume(reference_ct)


def case_prompts(case: dict, record_case: dict):
    """What a user gives for a fixture case: a box on slice z (ijk), the structure and modality of its folder."""
    z = int(record_case["slice_index_z"])
    x0, y0, x1, y1 = (float(v) for v in case["box_native"][0])
    modality, _, task = str(case["task_folder"]).partition("_")
    return z, Prompts(text=task, box=BoxPrompt((x0, y0, z), (x1, y1, z), space="ijk")), modality


# ---- weights ------------------------------------------------------------------------------------------------------
def test_every_layout_imports_to_the_same_folder_model(folders, public, heads):
    states = {}
    for name, folder in folders.items():
        recorded = json.loads((folder / CONFIG_FILE).read_text())
        assert recorded["kind"] == "medsegx2d" and recorded["source"]["layout"] == ("split" if name == "split"
                                                                                    else "merged")
        assert len(recorded["source"]["files"]) == (2 if name == "split" else 1)
        verify_folder(folder)
        states[name] = load_medsegx_weights(folder).state_dict()
    reference = load_medsegx_weights(public / "model.safetensors", decoder_heads=heads).state_dict()
    for name, state in states.items():
        assert set(state) == set(reference)
        assert all(torch.equal(state[k], reference[k]) for k in state), name


def test_our_folder_and_its_safetensors_reimport(folders, tmp_path):
    source = folders["safetensors"]
    again = import_medsegx(source / "model.safetensors", tmp_path / "again")
    original = load_medsegx_weights(source).state_dict()
    assert all(torch.equal(t, original[k]) for k, t in load_medsegx_weights(again).state_dict().items())
    with pytest.raises(Exception, match="already exists"):
        import_medsegx(source, tmp_path / "again")


def test_weights_of_the_wrong_kind_are_refused(folders, fixtures_dir):
    with pytest.raises(WeightsError, match="not a volumetric SegVol model"):
        load_model(folders["merged"])
    starter_like = fixtures_dir / "segvol_parity" / "public" / "model.safetensors"
    with pytest.raises(WeightsError):
        load_medsegx_weights(starter_like)
    with pytest.raises(InputError, match="MedSegX's 2D model"):
        SlicePredictor(load_model(starter_like, tokenizer=fixtures_dir / "segvol_parity" / "tokenizer"))


# ---- parity through the user path --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", evaluation_cases())
def test_user_path_reproduces_the_official_numbers(layout, case, predictors, case_volume, public, record):
    reference = dict(np.load(public / f"case_{case}.npz"))
    z, prompts, modality = case_prompts(reference, record["cases"][case])
    assert np.array_equal(case_volume.array[z], reference["raw_slice"])
    predictor = predictors[layout]
    predictor.set_volume(case_volume, modality=modality)
    result = predictor.segment(prompts)
    out = result.slices[0]
    rows, cols = reference["raw_slice"].shape
    assert out.slice_index == z and out.logits.shape == (3, rows, cols)
    assert result.context.rows() == tuple(reference["embedding_rows"][0])
    ref_logits = reference["logits_label_res"][0][:, :rows, :cols]
    assert np.abs(out.logits - ref_logits).max() <= tolerance(record, "logits_label_res")
    assert np.abs(out.iou_pred - reference["iou_pred"][0]).max() <= tolerance(record, "iou_pred")
    differing = out.masks != reference["masks_label_res"][0][:, :rows, :cols]
    assert not (differing & (np.abs(ref_logits) >= NEAR_THRESHOLD)).any()
    assert out.chosen == int(np.argmax(reference["iou_pred"][0]))          # the IoU head's pick
    expected = np.zeros(case_volume.array.shape, dtype=np.uint8)
    expected[z] = out.masks[out.chosen]
    np.testing.assert_array_equal(result.mask, expected)                   # only the box's slice


def test_a_fixed_output_is_taken_when_asked(predictors, case_volume, public, record):
    case = evaluation_cases()[0]
    reference = dict(np.load(public / f"case_{case}.npz"))
    z, prompts, modality = case_prompts(reference, record["cases"][case])
    fixed = SlicePredictor(predictors["merged"].model, device="cpu", choice=int(reference["oracle_best_index"]))
    fixed.set_volume(case_volume, modality=modality)
    out = fixed.segment(prompts).slices[0]
    assert out.chosen == int(reference["oracle_best_index"])
    with pytest.raises(InputError, match="mask choice"):
        SlicePredictor(fixed.model, choice=7)


# ---- 2D images ------------------------------------------------------------------------------------------------------
def test_a_real_ct_slice_saved_as_png_is_a_one_slice_volume(predictors, case_volume, tmp_path):
    """A real image: slice 60 of the reference CT, windowed to 8 bits and written as PNG (grey) and as colour."""
    grey = np.round((np.clip(case_volume.array[60], -160, 240) + 160) / 400 * 255).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(tmp_path / "slice.png"))
    colour = np.stack([grey, grey // 2, 255 - grey], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "colour.png"))
    predictor = predictors["merged"]
    for name in ("slice.png", "colour.png"):
        assert is_2d_image(tmp_path / name)
        volume, rgb = read_image_2d(tmp_path / name)
        assert volume.array.shape == (1,) + grey.shape and volume.modality is None
        predictor.set_volume(volume, rgb=rgb)
        assert predictor.modality.name == "unknown"
        result = predictor.segment(Prompts(text="liver", box=BoxPrompt((40, 25, 0), (100, 80, 0), space="ijk")))
        assert result.mask.shape == volume.array.shape and result.mask.any()
        assert any("modality unknown" in note for note in result.notes)
        np.testing.assert_array_equal(predictor.slice_pixels(0), rgb[0] if rgb is not None
                                      else np.repeat(grey[..., None], 3, axis=-1))
    # JPEG and TIFF through the same reader (SimpleITK's ITK IO): one slice, colours kept (JPEG is lossy)
    for name in ("colour.jpg", "colour.tif"):
        sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / name))
        volume, rgb = read_image_2d(tmp_path / name)
        assert is_2d_image(tmp_path / name) and volume.array.shape == (1,) + grey.shape
        assert rgb.shape == (1,) + colour.shape and np.abs(rgb[0].astype(int) - colour).mean() < 8
    # the grey PNG given as CT: 8-bit values are taken as they are (no HU window on a picture)
    volume, _ = read_image_2d(tmp_path / "slice.png")
    predictor.set_volume(volume, modality="CT")
    assert predictor.intensity.startswith("8-bit") and predictor.modality.name == "CT"


def test_a_single_dicom_slice_is_a_2d_image(predictors, data_dir, tmp_path):
    source = data_dir / "dicom" / "mr_3slice" / "1-001.dcm"
    assert not is_2d_image(source)                  # a member of a 3-slice series: a volume
    shutil.copyfile(source, tmp_path / "one.dcm")
    assert is_2d_image(tmp_path / "one.dcm")        # alone, as an X-ray comes: one image
    volume, rgb = read_image_2d(tmp_path / "one.dcm")
    assert rgb is None and volume.modality == "MR" and volume.array.shape == (1, 512, 512)
    reference = sitk.ReadImage(str(source))
    np.testing.assert_allclose(volume.origin_ras[:2], -np.asarray(reference.GetOrigin()[:2]))
    predictor = predictors["merged"]
    predictor.set_volume(volume)
    assert predictor.modality.name == "MRI" and predictor.intensity.startswith("percentile")
    result = predictor.segment(Prompts(box=BoxPrompt((200, 200, 0), (300, 320, 0), space="ijk")))
    assert result.name is None and result.mask.shape == volume.array.shape
    assert any("unknown' anatomy" in note for note in result.notes)


# ---- propagation ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ct(data_dir):
    return read_volume(data_dir / "ct" / "totalseg_ct_small.nii.gz")


def test_propagation_fills_neighbouring_slices_on_the_volume_grid(predictors, small_ct):
    predictor = predictors["merged"]
    predictor.set_volume(small_ct)
    assert predictor.modality.name == "CT"         # guessed from the HU values of a NIfTI
    k = 12
    ras_box = BoxPrompt(*small_ct.ijk_to_ras_points(np.array([[40.0, 25.0, k], [100.0, 80.0, k]])))
    fractions = []
    result = predictor.segment(Prompts(text="liver", box=ras_box), propagate=True,
                               progress=lambda f, m: fractions.append(f))
    assert result.mask.shape == small_ct.array.shape and result.mask.dtype == np.uint8
    assert result.slices[0].slice_index == k
    # this random model never gives an empty mask: propagation runs to both ends of the volume, one slice at a
    # time, each box taken from the previous slice's mask
    assert result.slice_indices == list(range(small_ct.array.shape[0]))
    assert [n for n in result.notes if n.startswith("propagated")] == [
        f"propagated up from slice {k} to the volume's end", f"propagated down from slice {k} to the volume's end"]
    by_slice = {o.slice_index: o for o in result.slices}
    np.testing.assert_array_equal(by_slice[k + 1].box, box_of_mask(by_slice[k].mask, predictor.propagation_margin))
    np.testing.assert_array_equal(by_slice[k - 1].box, box_of_mask(by_slice[k].mask, predictor.propagation_margin))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > small_ct.array.shape[0]


def test_propagation_stops_where_the_mask_vanishes(predictors, small_ct):
    """A real model whose masks are all empty (hypernetwork outputs zeroed: every logit 0, sigmoid 0.5, not > 0.5):
    nothing on the box's slice, so nothing is propagated."""
    model = load_medsegx_weights(predictors["merged"].model.weights_folder)
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    silent = SlicePredictor(model, device="cpu")
    silent.set_volume(small_ct)
    result = silent.segment(Prompts(text="liver", box=BoxPrompt((40, 25, 5), (100, 80, 5), space="ijk")),
                            propagate=True)
    assert [o.slice_index for o in result.slices] == [5] and not result.mask.any()
    assert any("nothing to propagate" in note for note in result.notes)


def test_propagation_can_be_cancelled(predictors, small_ct):
    predictor = predictors["merged"]
    predictor.set_volume(small_ct)
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if len(seen) == 4:
            token.cancel()
    with pytest.raises(Cancelled):
        predictor.segment(Prompts(box=BoxPrompt((40, 25, 10), (100, 80, 10), space="ijk")), propagate=True,
                          progress=progress, cancel=token)
    assert len(seen) == 4


# ---- refusals -------------------------------------------------------------------------------------------------------
def test_boxes_and_prompts_a_2d_model_cannot_take(predictors, small_ct):
    predictor = predictors["merged"]
    predictor.set_volume(small_ct)
    cases = [
        (Prompts(box=BoxPrompt((40, 25, 3), (100, 80, 9), space="ijk")), None, "a 3D box"),
        (Prompts(box=BoxPrompt((40, 25, 3.5), (100, 80, 3.5), space="ijk")), None, "on no slice"),
        (Prompts(box=BoxPrompt((40, 25, 3), (100, 80, 9), space="ijk")), 15, "does not reach slice 15"),
        (Prompts(box=BoxPrompt((40, 25, 3), (40, 80, 9), space="ijk")), None, "no width or height"),
        (Prompts(box=BoxPrompt((40, 25, 3), (100, 80, 3), space="ijk")), 99, r"slice 99 is not in .*0\.\.29"),
        (Prompts(text="liver"), None, "needs a box"),
        (Prompts(points=(PointPrompt((50, 50, 3), space="ijk"),), box=BoxPrompt((40, 25, 3), (100, 80, 3),
                                                                                space="ijk")), None, "box only"),
    ]
    for prompts, slice_index, message in cases:
        with pytest.raises(PromptError, match=message):
            predictor.segment(prompts, slice_index=slice_index)
    # the same 3D box is fine on a slice it reaches
    result = predictor.segment(Prompts(box=BoxPrompt((40, 25, 3), (100, 80, 9), space="ijk")), slice_index=6)
    assert result.slices[0].slice_index == 6


def test_colour_volumes_and_bad_colour_arrays_are_refused(predictors, small_ct, tmp_path):
    rgb_volume = np.zeros((4, 20, 30, 3), dtype=np.uint8)
    rgb_volume[..., 0] = 200
    image = sitk.GetImageFromArray(rgb_volume, isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match=r"RGB or vector image\); a single-channel"):
        read_volume(tmp_path / "rgb.nrrd")
    with pytest.raises(InputError, match="do not fit"):
        predictors["merged"].set_volume(small_ct, rgb=np.zeros((1, 4, 4, 3), np.uint8))
    flat = Volume(np.zeros((1, 8, 8), np.uint8), (1, 1, 1), (0, 0, 0), np.eye(3))
    sitk.WriteImage(sitk.GetImageFromArray(flat.array[0]), str(tmp_path / "blank.png"))
    with pytest.raises(InputError, match="blank image"):
        read_image_2d(tmp_path / "blank.png")
