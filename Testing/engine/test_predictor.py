"""Predictor behaviour on the real reference CT with the fixture's tiny checkpoint: caching, prompt
combinations, window prompts, errors, cancel, progress, devices."""
from __future__ import annotations

import copy
import dataclasses
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegx_core.data.metrics import dice
from medsegx_core.data.readers import read_volume
from medsegx_core.errors import Cancelled, InputError, PromptError, UnknownTermError, WeightsError
from medsegx_core.inference.cache import AUTO_CAP_BYTES, AUTO_FLOOR_BYTES, DECODED, WINDOW
from medsegx_core.inference.device import (Runtime, cpu_has_native_bf16, release_freed_memory,
                                           resolve_precision)
from medsegx_core.modeling.conmoae import attach_experts_to_model
from medsegx_core.predictor import Predictor
from medsegx_core.progress import CancelToken
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts

from cuda_memory import fill_cuda_memory  # Testing/cuda_memory.py (Testing/ is on sys.path: conftest)

LIVER_IJK = (70.0, 55.0, 90.0)
SPLEEN_IJK = (90.0, 60.0, 60.0)
BOX_IJK = BoxPrompt((37, 25, 69), (104, 86, 111), space="ijk")


@pytest.fixture(scope="module")
def volume(reference_ct):
    return read_volume(reference_ct)


@pytest.fixture(scope="module")
def predictor(model, volume):
    predictor = Predictor(model, device="cpu", precision="fp32")
    predictor.set_volume(volume)
    return predictor


class EncoderCalls:
    """Counts what a module really ran, through a forward hook: ``count`` batch items (windows are encoded and
    decoded in batches), ``calls`` forward calls."""

    def __init__(self, module):
        self.count = 0
        self.calls = 0
        self._handle = module.register_forward_hook(self._seen)

    def _seen(self, module, args, kwargs_or_output=None):
        self.calls += 1
        first = args[0] if args else None
        self.count += first.shape[0] if isinstance(first, torch.Tensor) and first.ndim == 5 else 1

    def close(self):
        self._handle.remove()


def point(ijk, positive=True):
    return PointPrompt(ijk, positive=positive, space="ijk")


def segment_steps(predictor, prompts):
    """segment() and the products of its public steps for the same prompts (answered from the caches that
    segment() filled, so they are the intermediates of that call)."""
    result = predictor.segment(prompts)
    crop = predictor.map_prompts(prompts)
    coarse = predictor.zoom_out(crop)
    plan = predictor.plan_zoom_in(coarse, crop)
    windows = [predictor.decode_window(plan, index, crop, coarse) for index in range(len(plan))] if plan else []
    assert all(not window.decoded for window in windows)       # nothing recomputed: segment()'s own windows
    return result, coarse, plan, windows


def test_a_new_click_does_not_rerun_the_image_encoder(model, volume):
    calls = EncoderCalls(model.image_encoder)
    text_calls = EncoderCalls(model.text_encoder)
    try:
        predictor = Predictor(model, device="cpu", precision="fp32")
        predictor.set_volume(volume)
        assert calls.count == 1                       # the zoom-out view
        first = predictor.segment(Prompts(text="liver", points=(point(LIVER_IJK),)), return_logits=True)
        assert first.windows >= 1 and first.windows_encoded == first.windows
        assert calls.count == 1 + first.windows
        second = predictor.segment(Prompts(text="liver", points=(point(LIVER_IJK), point(SPLEEN_IJK, False))),
                                   return_logits=True)
        assert second.windows_encoded == 0 and calls.count == 1 + first.windows
        assert text_calls.count == 1                   # "liver" encoded once
        assert not np.array_equal(first.logits, second.logits)   # the negative click was used
        assert 1 <= second.windows_decoded <= second.windows
        decoder_calls = EncoderCalls(model.mask_decoder)
        third = predictor.segment(Prompts(text="liver", points=(point(LIVER_IJK), point(SPLEEN_IJK, False))),
                                  return_logits=True)
        assert third.windows_decoded == 0 and decoder_calls.count == 1    # only the zoom-out view
        np.testing.assert_array_equal(third.logits, second.logits)
        decoder_calls.close()
        predictor.set_volume(volume)                   # a new volume clears the caches
        assert calls.count == 2 + first.windows
    finally:
        calls.close()
        text_calls.close()


def test_cached_result_equals_a_fresh_predictor(model, volume, predictor):
    prompts = Prompts(text="spleen", box=BOX_IJK)
    predictor.segment(Prompts(text="spleen"))
    cached = predictor.segment(prompts, return_logits=True)
    fresh = Predictor(model, device="cpu", precision="fp32")
    fresh.set_volume(volume)
    np.testing.assert_array_equal(fresh.segment(prompts, return_logits=True).logits, cached.logits)


def test_experts_key_the_cache_by_the_anatomy(model, volume):
    with_experts = copy.deepcopy(model)
    attach_experts_to_model(with_experts)
    calls = EncoderCalls(with_experts.image_encoder)
    predictor = Predictor(with_experts, device="cpu", precision="fp32")
    predictor.set_volume(volume)
    assert calls.count == 0                            # the zoom-out embedding waits for the context
    liver = predictor.segment(Prompts(text="liver"))
    after_liver = calls.count
    predictor.segment(Prompts(text="spleen"))
    assert calls.count > after_liver                   # another context, other embeddings
    after_spleen = calls.count
    again = predictor.segment(Prompts(text="liver"))
    assert calls.count == after_spleen
    np.testing.assert_array_equal(again.mask, liver.mask)
    calls.close()


def test_the_routing_modality_is_the_callers_else_the_files_else_guessed(model, volume, data_dir):
    """Training labels cases by the same rule; an "unknown" routing would be one no expert learned."""
    predictor = Predictor(model, device="cpu", precision="fp32")
    assert volume.modality is None                     # NIfTI stores no modality
    predictor.set_volume(volume)
    assert predictor.modality.name == "CT"             # Hounsfield units
    predictor.set_volume(read_volume(data_dir / "mri" / "totalseg_mr.nii.gz"))
    assert predictor.modality.name == "MRI"
    predictor.set_volume(volume, modality="MRI")
    assert predictor.modality.name == "MRI"
    tagged = copy.copy(volume)
    tagged.modality = "MR"
    predictor.set_volume(tagged)
    assert predictor.modality.name == "MRI"
    tagged.modality = "PT"                             # a DICOM code the hierarchy has no row for: unknown
    predictor.set_volume(tagged)
    assert predictor.modality.name == "unknown"
    # A user's explicit choice is strict, as in slice mode and training: a typo is refused, not routed as unknown.
    with pytest.raises(PromptError, match="unknown modality 'CTT'"):
        predictor.set_volume(volume, modality="CTT")


@pytest.mark.parametrize("prompts", [
    Prompts(text="liver"),
    Prompts(points=(point(LIVER_IJK),)),
    Prompts(box=BOX_IJK),
    Prompts(text="liver", points=(point(LIVER_IJK), point(SPLEEN_IJK, positive=False))),
    Prompts(text="liver", box=BOX_IJK),
    Prompts(points=(point(LIVER_IJK),), box=BOX_IJK),
    Prompts(text="liver", points=(point(LIVER_IJK),), box=BOX_IJK),
], ids=["text", "point", "box", "text+points", "text+box", "point+box", "all"])
def test_prompt_combinations(predictor, volume, prompts):
    result, coarse, _, windows = segment_steps(predictor, prompts)
    assert result.mask.shape == volume.array.shape and result.mask.dtype == np.uint8
    assert set(np.unique(result.mask)) <= {0, 1} and result.mask.any()
    assert result.name == ("liver" if prompts.text else None)
    spatial = bool(prompts.points or prompts.box)
    # Windows get a box exactly when the user gave a spatial prompt.
    assert windows and all((window.prompts.box is not None) == spatial for window in windows)
    if prompts.box is not None:
        np.testing.assert_array_equal(coarse.model_box, predictor.maps.box_to_model((69, 25, 37), (111, 86, 104)))


def test_points_go_to_every_window_that_contains_them(predictor):
    click = point(LIVER_IJK)
    _, _, plan, windows = segment_steps(predictor, Prompts(text="liver", points=(click,)))
    crop_dhw = np.array(LIVER_IJK[::-1]) - np.array(predictor.prepared.crop_lo)
    for index, window in enumerate(windows):
        points, labels = window.prompts.points, window.prompts.labels
        crop, _ = plan.readable(index)
        inside = all(s.start <= c < s.stop for s, c in zip(crop, crop_dhw))
        assert len(points) == int(inside)
        if inside:
            np.testing.assert_allclose(points[0] + plan.origins[index], crop_dhw)
            assert labels.tolist() == [1]
    assert sum(len(window.prompts.points) for window in windows) >= 1


def test_positive_clicks_are_inside_the_region_of_interest(predictor):
    # This click lies outside the coarse result's region (d 28..83 for "liver" with these weights).
    far = (70.0, 55.0, 100.0)
    _, _, plan, _ = segment_steps(predictor, Prompts(text="liver"))
    assert not plan.roi_dhw[0] <= far[2] <= plan.roi_dhw[3]
    _, _, plan, windows = segment_steps(predictor, Prompts(text="liver", points=(point(far),)))
    assert plan.roi_dhw[0] <= far[2] <= plan.roi_dhw[3]
    assert sum(len(window.prompts.points) for window in windows) >= 1


def test_no_prompt_is_a_clear_error(predictor):
    with pytest.raises(PromptError, match="nothing to segment"):
        predictor.segment(Prompts())


def test_unknown_text_lists_close_names(predictor):
    with pytest.raises(UnknownTermError) as error:
        predictor.segment(Prompts(text="kidny stone"))
    assert "kidney tumor" in error.value.suggestions and "kidney tumor" in str(error.value)


def test_prompts_outside_the_volume(predictor, volume):
    outside_ras = volume.ijk_to_ras_points(np.array([[200.0, 50.0, 50.0]]))[0]
    with pytest.raises(PromptError, match="outside the volume"):
        predictor.segment(Prompts(points=(PointPrompt(tuple(outside_ras)),)))
    with pytest.raises(PromptError, match="outside the volume"):
        predictor.segment(Prompts(box=BoxPrompt((300, 300, 300), (400, 400, 400), space="ijk")))
    # Inside the image but in the cropped-away border (rows j >= 97 are all at the minimum value).
    with pytest.raises(PromptError, match="empty border"):
        predictor.segment(Prompts(points=(point((60.0, 99.0, 50.0)),)))


def test_segment_before_set_volume(model):
    with pytest.raises(PromptError, match="set_volume"):
        Predictor(model, device="cpu", precision="fp32").segment(Prompts(text="liver"))


def test_fp32_predictor_refuses_weights_rounded_by_a_bf16_one(model):
    rounded = copy.deepcopy(model)
    Predictor(rounded, device="cpu", precision="bf16")
    with pytest.raises(WeightsError, match="load the model again"):
        Predictor(rounded, device="cpu", precision="fp32")


def test_cancel_between_windows_keeps_the_predictor_usable(predictor):
    token = CancelToken()
    messages = []

    def progress(fraction, message):
        messages.append((fraction, message))
        if message.startswith("blending window 2"):
            token.cancel()

    with pytest.raises(Cancelled):
        predictor.segment(Prompts(text="liver"), progress=progress, cancel=token)
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions)
    done = []
    result = predictor.segment(Prompts(text="liver"), progress=lambda f, m: done.append(f))
    assert result.mask.any() and done[-1] == 1.0


def test_bf16_agrees_with_fp32(model, volume):
    masks = {}
    for precision in ("fp32", "bf16"):
        # A copy: under bf16 the Predictor stores the model's matrix weights in bf16.
        predictor = Predictor(copy.deepcopy(model), device="cpu", precision=precision)
        predictor.set_volume(volume)
        masks[precision] = predictor.segment(Prompts(text="liver", box=BOX_IJK)).mask.astype(bool)
    assert dice(masks["fp32"], masks["bf16"]) >= 0.98
    assert predictor.model.mask_decoder.output_upscaling[0].weight.dtype == torch.bfloat16
    assert model.mask_decoder.output_upscaling[0].weight.dtype == torch.float32


def test_device_and_precision_selection():
    runtime = Runtime.resolve("auto", "auto")
    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert runtime.device.type == expected_device
    if expected_device == "cpu":
        assert runtime.precision == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(InputError, match="fp16"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(InputError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            Runtime.resolve("cuda")
    assert Runtime(torch.device("cuda"), "bf16").cpu_fallback().device.type == "cpu"
    assert Runtime(torch.device("cuda"), "fp32").cpu_fallback().precision == "fp32"


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="resident memory is read from Linux /proc; trimming is glibc's malloc_trim")
def test_release_freed_memory_returns_heap_holes_to_the_system():
    # 64 kB blocks live on glibc's heap (below its mmap threshold); small arrays kept between them pin the
    # holes, so freeing the blocks alone gives nothing back (the situation after the weight cast and after
    # each encoder forward).
    blocks, pins = [], []
    for _ in range(2000):
        blocks.append(np.ones(8 << 10))
        pins.append(np.ones(512))
    del blocks
    freed = _resident_bytes()
    release_freed_memory()
    assert freed - _resident_bytes() > 64 << 20       # most of the 128 MB of holes
    del pins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_memory_falls_back_to_the_cpu(model, volume):
    predictor = Predictor(copy.deepcopy(model), device="cuda", precision="fp32")
    predictor.set_volume(volume)
    hog = fill_cuda_memory()   # so that the next window encodings cannot allocate
    messages = []
    result = predictor.segment(Prompts(text="liver"), progress=lambda f, m: messages.append(m))
    del hog
    assert predictor.runtime.device.type == "cpu"
    assert any("ran out of memory" in m for m in messages) and result.mask.any()


def test_a_region_larger_than_the_cache_keeps_its_first_windows(model, volume):
    # One budget for everything: room for the zoom-out embedding, the text embedding (64 floats) and two windows,
    # each a tiny-model embedding (64 x 8 x 16 x 16 float32) and its decoded logits (32 x 64 x 64 float32).
    embedding, decoded = 64 * 8 * 16 * 16 * 4, 32 * 64 * 64 * 4
    budget = embedding + 2 * (embedding + decoded) + 4096
    predictor = Predictor(model, device="cpu", precision="fp32", cache_megabytes=budget / 2**20)
    predictor.set_volume(volume)
    prompts = Prompts(text="liver", box=BOX_IJK)
    first = predictor.segment(prompts)
    assert first.windows > 2 and first.windows_encoded == first.windows
    assert predictor.cache.bytes <= predictor.cache.budget_bytes
    assert predictor.cache.count(WINDOW) == 2 and predictor.cache.count(DECODED) == 2
    predictor.cache.forget(DECODED)                                # force decoding again: embeddings needed
    again = predictor.segment(prompts)
    assert again.windows_encoded == first.windows - 2           # the first two stayed cached
    np.testing.assert_array_equal(again.mask, first.mask)


def test_the_automatic_cache_budget_holds_the_whole_region(model, volume):
    predictor = Predictor(model, device="cpu", precision="fp32")      # cache_megabytes None: automatic
    predictor.set_volume(volume)
    first = predictor.segment(Prompts(text="liver", box=BOX_IJK))
    assert first.windows > 2 and predictor.cache.count(WINDOW) == first.windows
    assert predictor.cache.count(DECODED) == first.windows - first.windows_skipped
    assert predictor.cache.budget_bytes == AUTO_FLOOR_BYTES           # a small region: the floor
    # A click encodes only windows the region did not have before (it may move the coarse result and so the
    # region) and decodes only windows whose prompts changed.
    plans = []
    for prompts in (Prompts(text="liver", box=BOX_IJK), Prompts(text="liver", box=BOX_IJK, points=(point(LIVER_IJK),))):
        crop = predictor.map_prompts(prompts)
        plans.append(predictor.plan_zoom_in(predictor.zoom_out(crop), crop))
    again = predictor.segment(prompts)
    assert again.windows_encoded == len(set(plans[1].origins) - set(plans[0].origins))
    assert 1 <= again.windows_decoded < again.windows
    # The budget follows the region, up to the cap.
    predictor.cache.fit(10 * AUTO_CAP_BYTES)
    assert predictor.cache.budget_bytes == predictor.cache.cap_bytes <= AUTO_CAP_BYTES


def test_zoom_in_can_be_turned_off_by_the_model_config_or_the_caller(model, volume):
    prompts = Prompts(text="liver", box=BOX_IJK)
    refined = Predictor(model, device="cpu", precision="fp32")
    refined.set_volume(volume)
    full = refined.segment(prompts)
    coarse_only = Predictor(model, device="cpu", precision="fp32", zoom_in=False)
    coarse_only.set_volume(volume)
    coarse = coarse_only.segment(prompts)
    assert full.windows > 0 and coarse.windows == 0 and any("coarse pass only" in n for n in coarse.notes)
    # the result is the zoom-out pass mapped back, which the refinement then changes
    zoomed_out = coarse_only.zoom_out(coarse_only.map_prompts(prompts))
    assert coarse_only.plan_zoom_in(zoomed_out, coarse_only.map_prompts(prompts)) is None
    expected, on_crop = coarse_only.prepared.working_canvas(np.uint8)
    on_crop[...] = coarse_only.maps.back_to_crop(zoomed_out.logits) > 0
    np.testing.assert_array_equal(coarse.mask, coarse_only.prepared.to_stored(expected))
    assert not np.array_equal(coarse.mask, full.mask)
    model.config.zoom_in = False
    try:
        assert Predictor(model, device="cpu", precision="fp32").zoom_in is False
    finally:
        model.config.zoom_in = True


def test_a_click_reblends_only_what_it_changed_and_equals_a_fresh_predictor(model, volume):
    # The CT three times over along k: a region of interest with several rows of windows.
    tall = dataclasses.replace(volume, array=np.concatenate([volume.array] * 3, axis=0))
    first = Prompts(text="liver", points=(point(LIVER_IJK),))
    clicked = Prompts(text="liver", points=(point(LIVER_IJK), point((70.0, 50.0, 100.0), False)))
    warm = Predictor(model, device="cpu", precision="fp32", preprocessing="official")
    warm.set_volume(tall)
    before = warm.segment(first, return_logits=True)
    upsampled = []
    original = warm.runner.upsample
    warm.runner.upsample = lambda *args: upsampled.append(1) or original(*args)
    again = warm.segment(clicked, return_logits=True)
    fresh = Predictor(model, device="cpu", precision="fp32", preprocessing="official")
    fresh.set_volume(tall)
    expected = fresh.segment(clicked, return_logits=True)
    assert again.windows == expected.windows == before.windows and again.windows_encoded == 0
    assert 1 <= again.windows_decoded < again.windows
    # The zoom-out pass, then only the windows reaching into the rows of the windows decoded again.
    assert len(upsampled) - 1 < again.windows
    # Windows decoded in other batches may differ in the last bits (batched matrix products), nothing more.
    np.testing.assert_allclose(again.logits, expected.logits, rtol=0, atol=1e-5)
    differ = again.mask != expected.mask
    assert not differ.any() or np.abs(expected.logits[differ]).max() < 1e-5


def test_idle_windows_are_skipped_in_canonical_mode_only(model, volume):
    prompts = Prompts(text="liver", box=BOX_IJK)
    results = {}
    for mode in ("official", "canonical"):
        predictor = Predictor(model, device="cpu", precision="fp32", preprocessing=mode)
        predictor.set_volume(volume)
        results[mode] = predictor.segment(prompts)
        crop = predictor.map_prompts(prompts)
        coarse = predictor.zoom_out(crop)
        plan = predictor.plan_zoom_in(coarse, crop)
        empty = sum(plan.coarse_extent(coarse.foreground, predictor.maps, i) is None for i in range(len(plan)))
        assert results[mode].windows_skipped == (empty if mode == "canonical" else 0)
    # The reference CT is stored RAS+, so both modes see the same voxels: only the skipped windows differ.
    assert results["canonical"].windows == results["official"].windows
    if results["canonical"].windows_skipped:
        assert dice(results["canonical"].mask, results["official"].mask) > 0.95
    else:
        np.testing.assert_array_equal(results["canonical"].mask, results["official"].mask)


def test_windows_decoded_in_batches_equal_one_at_a_time(model, volume):
    prompts = Prompts(text="liver", box=BOX_IJK, points=(point(LIVER_IJK),))
    results = []
    for batch in (1, 3):
        predictor = Predictor(model, device="cpu", precision="fp32", preprocessing="official", window_batch=batch)
        predictor.set_volume(volume)
        results.append(predictor.segment(prompts, return_logits=True))
    assert results[0].windows >= 3 and results[1].windows_decoded == results[0].windows_decoded
    np.testing.assert_allclose(results[1].logits, results[0].logits, rtol=0, atol=1e-5)
    differ = results[1].mask != results[0].mask
    assert not differ.any() or np.abs(results[0].logits[differ]).max() < 1e-5


def test_a_reduced_precision_predictor_lets_go_of_the_checkpoint_file(fixtures_dir):
    # Loaded weights live in the safetensors file's memory map; after the bf16 cast the norms and embeddings are
    # copied out too, so nothing refers to the mapping (its pages would otherwise stay resident).
    from medsegx_core.weights.store import load_model

    segvol = fixtures_dir / "segvol_parity"
    model = load_model(segvol / "public" / "model.safetensors", tokenizer=segvol / "tokenizer")
    loaded = {name: t.data_ptr() for name, t in model.state_dict().items()}
    predictor = Predictor(model, device="cpu", precision="bf16")
    after = {name: t.data_ptr() for name, t in predictor.model.state_dict().items()}
    assert not set(loaded.values()) & set(after.values())
    fp32 = Predictor(load_model(segvol / "public" / "model.safetensors", tokenizer=segvol / "tokenizer"),
                     device="cpu", precision="fp32")
    assert fp32.model.image_encoder.norm.weight.dtype == torch.float32      # float32: the mapping is the model
