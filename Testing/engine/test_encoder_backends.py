"""The image encoder through ONNX Runtime / OpenVINO: the same embeddings and masks as torch on a real slice, the
fallback to torch when a runtime is missing, the export cache reused, and a corrupted export refused and rebuilt.

The cache tests use a TinyViT of a tiny configuration (random weights, seeded): exporting it takes seconds; the
real-slice test exports LiteMedSAM's real encoder once (about a minute on 2 threads) and skips when its weights or
the runtime are absent.
"""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch

from medsegx_core.inference import encoder_backends as backends
from medsegx_core.modeling.tiny_vit import TinyViT, TinyViTConfig

RUNTIMES = ("onnxruntime", "openvino")
TINY = TinyViTConfig(image_size=64, embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                     window_sizes=(7, 7, 7, 7), out_chans=16)


def require(backend: str) -> None:
    missing = backends.missing_packages(backend)
    if missing:
        pytest.skip(f"{backend} backend needs {', '.join(missing)}: {backends.INSTALL_HINT}")


def tiny_encoder(seed: int = 0) -> TinyViT:
    torch.manual_seed(seed)
    encoder = TinyViT(TINY).eval()
    with torch.no_grad():       # BatchNorm statistics away from the identity, so every layer matters
        for module in encoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return encoder


def images(count: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def warnings_of(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.name == "medsegx" and r.levelno >= logging.WARNING]


# ---- real weights on a real slice -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def litemedsam():
    from medsegx_core.weights import litemedsam as weights

    if weights.wheel_checkpoint() is None:
        pytest.skip(f"LiteMedSAM's weights are absent: {weights.INSTALL_HINT}")
    return weights.load_litemedsam()


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder-exports")     # one export of the real encoder for both runtimes


@pytest.mark.parametrize("backend", RUNTIMES)
def test_runtime_gives_torch_embeddings_and_masks_on_a_real_slice(litemedsam, export_folder, data_dir, backend):
    require(backend)
    from medsegx_core.data.readers import read_volume
    from medsegx_core.inference.slice_preprocessing import (box_to_model, litemedsam_input, litemedsam_window,
                                                            logits_to_slice)

    volume = read_volume(data_dir / "ct" / "totalseg_ct_small.nii.gz")
    kidney = read_volume(data_dir / "ct" / "totalseg_ct_small_labels.nii.gz").array == 2   # TotalSegmentator: kidney_right
    k = int(np.argmax(kidney.sum(axis=(1, 2))))
    image = litemedsam_input(litemedsam_window(volume.array, "CT").apply(volume.array[k]))[None]
    rows, cols = np.nonzero(kidney[k])
    box = torch.from_numpy(box_to_model(np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32),
                                        kidney.shape[1:]))[None]

    encoder = backends.make_image_encoder(litemedsam, backend, cache_dir=export_folder, threads=2)
    assert encoder.backend == backend, encoder.describe()
    with torch.inference_mode():
        expected = litemedsam.encode(image)
        found = encoder(image)
        masks = [logits_to_slice(litemedsam.decode(e, box).logits, kidney.shape[1:])[0] > 0 for e in (expected, found)]
    assert found.shape == expected.shape == (1, 256, 64, 64) and found.dtype == torch.float32
    assert float((found - expected).abs().max()) <= backends.EXPORT_TOLERANCE
    assert masks[0].sum() > 100 and bool(torch.equal(masks[0], masks[1]))

    # a batch gives each slice's own embedding, in order
    batch = torch.cat([litemedsam_input(litemedsam_window(volume.array, "CT").apply(volume.array[j]))[None]
                       for j in (k + 2, k, k - 2)])
    together = encoder(batch)
    assert together.shape == (3, 256, 64, 64)
    assert float((together[1:2] - found).abs().max()) <= backends.EXPORT_TOLERANCE
    assert float((together[0:1] - encoder(batch[:1])).abs().max()) <= backends.EXPORT_TOLERANCE
    assert float((together[0] - together[2]).abs().max()) > 10 * backends.EXPORT_TOLERANCE


def test_the_slice_predictor_runs_the_fast_encoder_with_the_torch_masks(litemedsam, data_dir):
    """VolumeSlicePredictor's default (encoder_backend "auto") on the CPU: the exported runtime encodes, and a 3D box
    gives the masks of the torch encoder (Dice >= 0.99; the runtimes' float32 sums differ in the last bits)."""
    if all(backends.missing_packages(b) for b in RUNTIMES):
        pytest.skip(f"no encoder runtime installed: {backends.INSTALL_HINT}")
    from medsegx_core.data.metrics import dice
    from medsegx_core.data.readers import read_volume
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    volume = read_volume(data_dir / "ct" / "totalseg_ct_small.nii.gz")
    prompts = Prompts(box=BoxPrompt((20, 30, 10), (70, 80, 14), space="ijk"))
    masks = {}
    for backend in ("auto", "torch"):
        predictor = VolumeSlicePredictor(litemedsam, encoder_backend=backend)
        predictor.set_volume(volume)
        result = predictor.segment(prompts)
        masks[backend] = result.mask
        assert (predictor.fast_encoder() is None) == (backend == "torch")
        assert result.encoded == result.decoded and predictor.segment(prompts).encoded == 0   # each slice once
        assert predictor.describe_encoder().startswith("encoder " + ("torch" if backend == "torch" else "o"))
    assert masks["torch"].sum() > 500 and dice(masks["auto"], masks["torch"]) >= 0.99


def test_bf16_runtime_on_real_slices_and_in_the_predictor(litemedsam, export_folder, data_dir):
    """precision bf16 on a CPU with native bf16: OpenVINO computes in bf16 (its embeddings differ from float32's by
    more than an export may), the masks of real CT and MR slices with their labels' boxes stay close to float32's
    (Dice >= 0.97: not the same, which is why it is never the default), and ``VolumeSlicePredictor(precision=
    "bf16")`` on the CPU runs that encoder with the decoder in float32, while its default stays float32."""
    require("openvino")
    from medsegx_core.inference.device import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AMX or AVX512_BF16): bf16 stays float32 here")
    from medsegx_core.data.metrics import dice
    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.inference.slice_preprocessing import (box_to_model, litemedsam_input, litemedsam_window,
                                                            logits_to_slice)
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    encoders = {p: backends.make_image_encoder(litemedsam, "openvino", cache_dir=export_folder, threads=2,
                                               precision=p) for p in ("fp32", "bf16")}
    assert "bfloat16" in encoders["bf16"].describe() and "float32" in encoders["fp32"].describe()
    cases = [("ct/totalseg_ct_small.nii.gz", "ct/totalseg_ct_small_labels.nii.gz", "CT"),
             ("mri/chaos_t2spir/chaos_t2_10_mr.nii.gz", "mri/chaos_t2spir/chaos_t2_10_label.nii.gz", "MR")]
    largest, agreements = 0.0, []
    for image_file, label_file, modality in cases:
        volume = read_volume(data_dir / image_file)
        labels = read_labelmap(data_dir / label_file, volume).array
        window = litemedsam_window(volume.array, modality)
        for value in [v for v in np.unique(labels) if v][:4]:
            organ = labels == value
            k = int(np.argmax(organ.sum(axis=(1, 2))))
            rows, cols = np.nonzero(organ[k])
            box = torch.from_numpy(box_to_model(np.array([cols.min(), rows.min(), cols.max(), rows.max()],
                                                         np.float32), organ.shape[1:]))[None]
            image = litemedsam_input(window.apply(volume.array[k]))[None]
            with torch.inference_mode():
                embeddings = {p: encode(image) for p, encode in encoders.items()}
                masks = {p: logits_to_slice(litemedsam.decode(e, box).logits, organ.shape[1:])[0].numpy() > 0
                         for p, e in embeddings.items()}
            largest = max(largest, float((embeddings["bf16"] - embeddings["fp32"]).abs().max()))
            assert masks["fp32"].sum() > 50, (image_file, value)
            agreements.append(dice(masks["bf16"], masks["fp32"]))
    assert largest > backends.EXPORT_TOLERANCE and min(agreements) >= 0.97, agreements   # bf16 ran, close masks

    for precision, arithmetic in (("bf16", "bfloat16"), ("auto", "float32")):
        predictor = VolumeSlicePredictor(litemedsam, precision=precision)
        assert predictor.runner.runtime.precision == "fp32" and arithmetic in predictor.describe_encoder()


def test_encoder_precision_is_checked_and_bf16_only_where_native(monkeypatch, tmp_path):
    """bf16 is asked of OpenVINO only on a CPU with native bf16, and said when it cannot be had; fp32 is float32
    everywhere; ONNX Runtime refuses bf16; an unknown precision is named in the error. (The CPU query is replaced
    to see both kinds of CPU.)"""
    for native in (True, False):
        monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda native=native: native)
        assert backends.runtime_precision("openvino", "bf16") == ("bf16" if native else "fp32")
        assert backends.runtime_precision("onnxruntime", "bf16") == "fp32"
        assert backends.runtime_precision("openvino", "fp32") == "fp32"
    if not backends.missing_packages("openvino"):       # the last CPU seen has no bf16: the encoder says so
        encoder = backends.make_image_encoder(tiny_encoder(), "openvino", cache_dir=tmp_path, precision="bf16")
        assert encoder.backend == "openvino" and "float32 (bf16 needs OpenVINO on a CPU with AMX" in encoder.describe()
    with pytest.raises(ValueError, match="'half'.*fp32"):
        backends.make_image_encoder(tiny_encoder(), "torch", precision="half")
    with pytest.raises(ValueError, match="float32 only"):
        backends.onnxruntime_runner(None, 1, "bf16")


# ---- a runtime missing ----------------------------------------------------------------------------------------------
def test_the_predictors_auto_choice_is_quiet_without_a_runtime(monkeypatch, caplog, tmp_path):
    """The optional packages are optional: with none installed, ``quiet_when_missing`` (the predictors' call)
    keeps torch without a warning and says what to install in describe()."""
    for name in RUNTIMES:
        monkeypatch.setitem(sys.modules, name, None)
    chosen = backends.make_image_encoder(tiny_encoder(), "auto", cache_dir=tmp_path, quiet_when_missing=True)
    assert chosen.backend == "torch" and backends.INSTALL_HINT in chosen.describe()
    assert warnings_of(caplog) == [] and not any(tmp_path.iterdir())

def test_a_missing_runtime_falls_back_to_torch_with_one_message(monkeypatch, caplog, tmp_path):
    encoder = tiny_encoder()
    for name in RUNTIMES:
        monkeypatch.setitem(sys.modules, name, None)      # Python's own way of making a package unimportable
    told = []
    for backend in ("openvino", "auto"):
        caplog.clear()
        chosen = backends.make_image_encoder(encoder, backend, cache_dir=tmp_path,
                                             progress=lambda fraction, message: told.append(message))
        assert chosen.backend == "torch"
        messages = warnings_of(caplog)
        assert len(messages) == 1, messages
        assert "openvino" in messages[0] and "runs in torch" in messages[0] and backends.INSTALL_HINT in messages[0]
    assert len(told) == 2 and all(m.startswith("warning: ") for m in told)
    assert not any(tmp_path.iterdir())                     # nothing exported for a runtime that is not there
    batch = images(2, TINY.image_size)
    with torch.inference_mode():
        assert torch.equal(chosen(batch), encoder(batch))


def test_hooked_or_unknown_encoders_are_not_exported(caplog, tmp_path):
    require("onnxruntime")
    encoder = tiny_encoder()
    encoder.transformer_blocks[0].mlp.register_forward_hook(lambda module, inputs, output: output * 2)
    chosen = backends.make_image_encoder(encoder, "onnxruntime", cache_dir=tmp_path)
    assert chosen.backend == "torch" and "hooks" in warnings_of(caplog)[0]
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="choose auto or one of torch, onnxruntime, openvino"):
        backends.make_image_encoder(encoder, "tensorrt")


# ---- the export cache -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(encoder, cache folder, export path) after one export of the tiny encoder."""
    require("onnxruntime")
    folder = tmp_path_factory.mktemp("tiny-exports")
    encoder = tiny_encoder()
    backends.make_image_encoder(encoder, "onnxruntime", cache_dir=folder)
    path, _ = backends.cached_paths(encoder, folder)
    return encoder, folder, path


def test_the_export_is_reused_and_other_weights_get_their_own(tiny_export, caplog):
    encoder, folder, path = tiny_export
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["size"] == path.stat().st_size and record["max_abs_difference"] <= backends.EXPORT_TOLERANCE
    before = (path.stat().st_mtime_ns, path.stat().st_ino)
    caplog.clear()
    again = backends.make_image_encoder(encoder, "onnxruntime", cache_dir=folder)
    assert again.backend == "onnxruntime" and warnings_of(caplog) == []          # no export, no message
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    batch = images(3, TINY.image_size)                 # another batch size than the export's probe
    with torch.inference_mode():
        assert float((again(batch) - encoder(batch)).abs().max()) <= backends.EXPORT_TOLERANCE

    other = tiny_encoder(seed=1)
    other_path, _ = backends.cached_paths(other, folder)
    assert other_path != path
    with torch.inference_mode():
        assert float((backends.make_image_encoder(other, "onnxruntime", cache_dir=folder)(batch)
                      - other(batch)).abs().max()) <= backends.EXPORT_TOLERANCE
    assert other_path.is_file() and path.is_file()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]          # no temporary file left behind


@pytest.mark.parametrize("threads", [1, 2])
def test_openvino_gives_each_slice_of_a_batch_its_own_embedding(tiny_export, threads):
    """The OpenVINO model takes one slice at a time (its batch fixed at 1): a batch, slice after slice, gives each
    slice the torch encoder's embedding, in order, as the slices alone do."""
    require("openvino")
    encoder, _, path = tiny_export
    run, _ = backends.RUNNERS["openvino"](path, threads)
    batch = images(3, TINY.image_size, seed=5)
    with torch.inference_mode():
        expected = encoder(batch).numpy()
    together = run(batch.numpy())
    alone = np.concatenate([run(batch[index:index + 1].numpy()) for index in range(3)])
    assert together.shape == alone.shape == expected.shape
    assert float(np.abs(together - expected).max()) <= backends.EXPORT_TOLERANCE
    assert float(np.abs(alone - expected).max()) <= backends.EXPORT_TOLERANCE
    # in order: each output is nearest its own slice's embedding (the tiny encoder's differ by ~1e-4)
    for outputs in (together, alone):
        nearest = [int(np.argmin([np.abs(out - e).max() for e in expected])) for out in outputs]
        assert nearest == [0, 1, 2]


@pytest.mark.parametrize("damage", ["flipped bytes", "missing record"])
def test_a_corrupted_export_is_refused_and_rebuilt(tiny_export, caplog, damage):
    encoder, folder, path = tiny_export
    if damage == "flipped bytes":        # same size, other content: only the sha256 tells
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
        path.write_bytes(bytes(data))
    else:
        path.with_suffix(".json").unlink()
    assert backends.cache_problem(path, path.with_suffix(".json")) is not None
    caplog.clear()
    rebuilt = backends.make_image_encoder(encoder, "onnxruntime", cache_dir=folder)
    messages = warnings_of(caplog)
    assert rebuilt.backend == "onnxruntime" and len(messages) == 1
    assert str(path) in messages[0] and "exporting the encoder again" in messages[0]
    assert backends.cache_problem(path, path.with_suffix(".json")) is None
    batch = images(2, TINY.image_size, seed=5)
    with torch.inference_mode():
        assert float((rebuilt(batch) - encoder(batch)).abs().max()) <= backends.EXPORT_TOLERANCE


def test_runtimes_stay_optional():
    """The engine imports no optional runtime until one is asked for."""
    import subprocess

    code = ("import sys; import medsegx_core.inference.encoder_backends, medsegx_core.volume_slice_predictor; "
            "print(sorted(m for m in ('onnxruntime', 'openvino', 'onnx', 'onnxscript') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_heap_trim_returns_freed_fragmented_heap_pages():
    """What the runtime encoders call after each batch: free heap pages between live blocks go back to the system
    (without it both runtimes grew 3-5 MiB a slice; bench_memory.py)."""
    import ctypes
    import ctypes.util

    from medsegx_core.inference import device

    if device._malloc_trim() is None:
        pytest.skip("no malloc_trim in this C library (glibc only): nothing to return")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def resident_mib() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * backends.os.sysconf("SC_PAGE_SIZE") / 2**20

    block = 64 * 1024                   # below glibc's mmap threshold: from the heap
    blocks = [libc.malloc(block) for _ in range(3200)]      # 200 MiB
    for address in blocks:
        ctypes.memset(address, 1, block)                    # touched: resident
    for address in blocks[:-1]:
        libc.free(address)              # the last block pins the heap's top, as a live buffer does
    before = resident_mib()
    device.release_freed_memory()
    after = resident_mib()
    libc.free(blocks[-1])
    assert before - after > 150, f"resident {before:.0f} -> {after:.0f} MiB"


def test_runtime_encoders_trim_the_heap_after_each_batch(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "release_freed_memory", lambda: calls.append("trim"))
    run = backends.trimming_heap(lambda batch: calls.append("run") or batch * 2)
    assert np.array_equal(run(np.ones(3)), np.full(3, 2.0)) and calls == ["run", "trim"]
