"""LiteMedSAM's TinyViT image encoder through a faster CPU runtime, with the same embeddings.

```python
encode = make_image_encoder(model, backend="auto", cache_dir=medsegx_home() / "encoders")
embeddings = encode(images)        # float32 (B, 3, 256, 256) in [0, 1] -> float32 (B, 256, 64, 64) on the CPU
encode.backend, encode.describe()  # what runs: "openvino", "onnxruntime" or "torch"
```

Backends: ``torch`` (the model's own ``encode``: the reference), ``onnxruntime`` and ``openvino`` (optional
packages: ``pip install 'medsegx-core[fast]'``; imported only here, when asked for). Both run one ONNX export of
the encoder, made once per weights (``torch.onnx.export``, which needs ``onnx`` and ``onnxscript``) into
``cache_dir`` under a name keyed by the sha256 of the encoder's configuration, tensors and the torch version. The
export is written to a temporary name and renamed, with a record (``.json``) of its size and sha256 written last;
a file that does not match its record is refused and exported again. Before it is kept, an export must give the
torch encoder's embeddings within ``EXPORT_TOLERANCE`` on a fixed input of two images (which also checks the
dynamic batch). ``cache_dir=None`` exports into a temporary folder that lives as long as the encoder.

Precision: ``precision="fp32"`` (the default) asks both runtimes for float32 arithmetic (OpenVINO would otherwise
pick bf16 on CPUs with AMX or AVX512_BF16). ``"bf16"`` lets OpenVINO compute in bfloat16 where the CPU does so
natively (``device.cpu_has_native_bf16``: AMX or AVX512_BF16; elsewhere bf16 would be emulated and slower; ONNX
Runtime has no bf16 kernels for the CPU): float32 stays where it cannot. Measured on a 2-core Xeon with AMX: 2.5x
the float32 export and 5.5x eager torch per slice, but not the same masks: Dice 0.94-0.999 against float32 for 3D
boxes of 17 CT and MR organs, per slice down to 0.95, and a propagated slice box may stop on another slice
(``bench_encoder.py``, ``compare_encoder_precision.py``; the LiteMedSAM model card). So it is what ``--precision
bf16`` asks for, never the default. Both runtimes use the thread count torch uses. ``auto`` takes the first runtime of ``AUTO_ORDER`` that is
installed; ``AUTO_ORDER`` lists only runtimes measured faster than the torch encoder with masks of Dice >= 0.99
against it (``Testing/benchmarks/bench_encoder.py``). Whatever cannot be used (a package missing, a model on
the GPU, weights not float32, adapter experts hooked into the blocks, an export or a runtime that fails) falls
back to torch with one message saying why and what to do (``device.warn``: the ``medsegx`` logger and the
progress callback).

Memory: after each call through a runtime the C heap's free pages are handed back to the system
(``device.release_freed_memory``: glibc's ``malloc_trim``; elsewhere nothing is done). Both runtimes free their
per-call buffers into a fragmented heap that glibc did not return, so a process encoding slice after slice grew
3-5 MiB a slice beyond the 1 MiB each cached embedding takes (OpenVINO / ONNX Runtime, measured slice by slice);
with the trim it grows by the cache alone, for about 4 ms a call (``Testing/benchmarks/bench_memory.py``).
Setting glibc's mmap threshold instead kept the heap small too but doubled the decoder's time per slice.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch

from .device import cpu_has_native_bf16, release_freed_memory, warn

BACKENDS = ("torch", "onnxruntime", "openvino")
# Runtimes "auto" may choose, best first: faster than torch with the same masks in bench_encoder.py (on an AMD
# EPYC with AVX2 and FMA, 2 threads; the figures are in the benchmark's table).
AUTO_ORDER = ("openvino", "onnxruntime")
# The packages each runtime needs (the export needs onnx and onnxscript besides the runtime itself).
EXPORT_PACKAGES = ("onnx", "onnxscript")
# fp32: float32 everywhere; bf16: bf16 where a runtime computes it natively (``runtime_precision``), else float32
ENCODER_PRECISIONS = ("fp32", "bf16")
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",)}
INSTALL_HINT = "pip install 'medsegx-core[fast]'"
# Largest |embedding difference| an export may show against the torch encoder before it is kept (measured: a
# few 1e-6 on embeddings of magnitude ~1, for both runtimes).
EXPORT_TOLERANCE = 1e-3
# Bump when the export changes, so that older cached files are not used.
EXPORT_FORMAT = 1
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "image", "embedding"

PathLike = Union[str, Path]


class ImageEncoder:
    """A callable ``images (B, 3, S, S) float32 -> embeddings (B, C, S/4, S/4) float32`` (CPU tensors)."""

    def __init__(self, backend: str, run: Callable[[np.ndarray], np.ndarray], description: str, keep=None):
        self.backend = backend
        self._run = run
        self._description = description
        self._keep = keep            # what must live as long as the encoder (a temporary export folder)

    def __call__(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().float().numpy()
        batch = np.ascontiguousarray(images, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"images of shape {batch.shape}: expected (B, 3, S, S)")
        return torch.from_numpy(np.ascontiguousarray(self._run(batch)))

    def describe(self) -> str:
        return self._description


# ---- choosing -------------------------------------------------------------------------------------------------------
def make_image_encoder(model, backend: str = "auto", cache_dir: Optional[PathLike] = None,
                       threads: Optional[int] = None, progress=None, quiet_when_missing: bool = False,
                       precision: str = "fp32") -> ImageEncoder:
    """The image encoder of ``model`` (LiteMedSAM, or its TinyViT) run by ``backend`` in ``precision`` (fp32, or
    bf16 where the runtime and the CPU compute it natively); see the module's text. ``quiet_when_missing``:
    with ``auto``, no runtime installed is said in ``describe()`` only, not warned about (the predictors' default:
    the optional packages are optional)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"encoder backend {backend!r}: choose auto or one of {', '.join(BACKENDS)}")
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"encoder precision {precision!r}: choose one of {', '.join(ENCODER_PRECISIONS)}")
    encoder = getattr(model, "image_encoder", model)
    threads = int(threads or torch.get_num_threads())
    if backend == "torch":
        return torch_encoder(encoder)
    reason = unsupported_reason(encoder)
    if reason is not None:
        if backend != "auto":
            warn(f"the {backend} encoder backend is not used: {reason}; the encoder runs in torch", progress)
        return torch_encoder(encoder)
    candidates = runtime_candidates(backend)
    installed = [name for name in candidates if not missing_packages(name)]
    if not installed:
        needed = sorted({p for name in candidates for p in missing_packages(name)})
        if quiet_when_missing and backend == "auto":
            return torch_encoder(encoder, note=f"{INSTALL_HINT} for a faster CPU encoder")
        wanted = "a faster encoder runtime" if backend == "auto" else f"the {backend} encoder backend"
        warn(f"{wanted} needs the package{'s' if len(needed) > 1 else ''} {', '.join(needed)}, not installed; the "
             f"encoder runs in torch (slower on the CPU); install them with {INSTALL_HINT}", progress)
        return torch_encoder(encoder)
    chosen = installed[0]
    try:
        return runtime_encoder(encoder, chosen, cache_dir, threads, progress, runtime_precision(chosen, precision),
                               asked=precision)
    except Exception as exc:  # noqa: BLE001 - an optional runtime that fails must not stop segmentation
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        warn(f"the {chosen} encoder backend failed ({type(exc).__name__}: {first_line}); the encoder runs in torch",
             progress)
        return torch_encoder(encoder)


def runtime_precision(backend: str, precision: str) -> str:
    """What ``backend`` computes in when asked for ``precision``: bf16 only from OpenVINO on a CPU with native bf16
    (elsewhere bf16 is emulated, or has no kernels, and is slower than float32)."""
    if precision == "bf16" and backend == "openvino" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def bf16_runtime_available(backend: str = "auto") -> bool:
    """Whether ``backend`` (auto: the one auto would choose) is installed and would compute the encoder in bf16
    here (found, never imported)."""
    installed = [name for name in runtime_candidates(backend) if not missing_packages(name)]
    return bool(installed) and runtime_precision(installed[0], "bf16") == "bf16"


def runtime_candidates(backend: str) -> Tuple[str, ...]:
    """The exported runtimes ``backend`` may use, best first (auto: ``AUTO_ORDER``; torch: none)."""
    return AUTO_ORDER if backend == "auto" else (backend,) if backend in RUNTIME_PACKAGES else ()


def missing_packages(backend: str) -> Tuple[str, ...]:
    """The packages ``backend`` needs that are not installed (found, never imported)."""
    needed = RUNTIME_PACKAGES[backend] + EXPORT_PACKAGES
    # sys.modules[name] = None is Python's way of blocking an import: find_spec would raise on it
    return tuple(name for name in needed
                 if (name in sys.modules and sys.modules[name] is None) or importlib.util.find_spec(name) is None)


def unsupported_reason(encoder: torch.nn.Module) -> Optional[str]:
    """Why the encoder cannot be exported as it is, or None."""
    parameter = next(encoder.parameters())
    if parameter.device.type != "cpu":
        return f"the model is on {parameter.device.type}, and the exported runtimes are for the CPU"
    if any(p.dtype != torch.float32 for p in encoder.parameters()):
        return "the encoder's weights are not float32 (a reduced-precision runtime stored them so)"
    if any(m._forward_hooks or m._forward_pre_hooks for m in encoder.modules()):
        # adapter experts (ConMoAE) hook into the blocks and change with the prompt's context: an export would fix one
        return "hooks (adapter experts) are attached to the encoder"
    return None


def torch_encoder(encoder: torch.nn.Module, note: str = "") -> ImageEncoder:
    """The reference: the model's own forward under inference mode, channels-last when the model is."""
    # a weight in one layout only tells (1x1 and depth-wise kernels are contiguous in both)
    channels_last = any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                        for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    device = next(encoder.parameters()).device

    def run(batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(batch).to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return encoder(images).float().cpu().numpy()

    layout = "channels-last" if channels_last else "eager"
    return ImageEncoder("torch", run, f"torch {torch.__version__} ({layout})" + (f"; {note}" if note else ""))


# ---- the exported runtimes ------------------------------------------------------------------------------------------
def runtime_encoder(encoder: torch.nn.Module, backend: str, cache_dir: Optional[PathLike], threads: int,
                    progress=None, precision: str = "fp32", asked: str = "fp32") -> ImageEncoder:
    keep = None
    if cache_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="medsegx-encoder-")
        cache_dir = keep.name
    path = exported_encoder(encoder, Path(cache_dir), backend, progress)
    run, version = RUNNERS[backend](path, threads, precision)
    arithmetic = "bfloat16" if precision == "bf16" else "float32"
    if asked == "bf16" and precision != "bf16":
        arithmetic += " (bf16 needs OpenVINO on a CPU with AMX or AVX512_BF16)"
    return ImageEncoder(backend, trimming_heap(run), f"{backend} {version}, {arithmetic}, {threads} threads", keep)


def trimming_heap(run: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``run`` followed by a heap trim (the module's text: what the runtimes' freed buffers otherwise cost)."""

    def run_and_trim(batch: np.ndarray) -> np.ndarray:
        result = run(batch)
        release_freed_memory()
        return result

    return run_and_trim


def onnxruntime_runner(path: Path, threads: int, precision: str = "fp32"):
    if precision != "fp32":
        raise ValueError(f"ONNX Runtime's CPU encoder computes in float32 only, not {precision}")
    ort = importlib.import_module("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3        # errors only: its notes about unused initialisers are not the user's
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]   # sessions are thread-safe

    return run, ort.__version__


def openvino_runner(path: Path, threads: int, precision: str = "fp32"):
    """One request on every thread, one slice at a time, the export's batch fixed at 1: 11 % faster than its
    dynamic batch (``Testing/benchmarks/bench_encoder.py``, scratch runs of 2026-12-07). Measured and left out: a
    batch as concurrent requests on one-thread streams encoded 1.07-1.25x as many slices a second, but the second
    compiled model and its requests raised the peak memory of a 512 x 512 x 300 CT fully encoded from 1979 to
    2387 MiB (``bench_memory.py``), past the 2 GB the engine keeps to. ``precision`` bf16: OpenVINO's bf16
    inference (AMX / AVX512_BF16 kernels), for the callers that measured it (``runtime_precision``)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"OpenVINO encoder precision {precision!r}: choose fp32 or bf16")
    ov = importlib.import_module("openvino")
    core = ov.Core()
    model = core.read_model(str(path))
    shape = model.input(0).get_partial_shape()
    shape[0] = 1
    model.reshape(shape)
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"})
    request = compiled.create_infer_request()
    lock = threading.Lock()            # one infer request: calls from two threads take turns

    def run(batch: np.ndarray) -> np.ndarray:
        with lock:
            # share_outputs=False: a copy, as the request's own output memory is reused by the next call
            return np.concatenate([request.infer({0: batch[index:index + 1]}, share_inputs=True,
                                                 share_outputs=False)[0] for index in range(len(batch))])

    return run, ov.get_version().split("-")[0]


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


# ---- the export and its cache ---------------------------------------------------------------------------------------
def encoder_key(encoder: torch.nn.Module) -> str:
    """sha256 of what decides the export: its format, the torch version, the configuration and every tensor."""
    digest = hashlib.sha256(f"format {EXPORT_FORMAT}; torch {torch.__version__}; opset {ONNX_OPSET}\n".encode())
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_paths(encoder: torch.nn.Module, cache_dir: Path) -> Tuple[Path, Path]:
    """(the export, its record) in ``cache_dir`` for this encoder."""
    stem = f"tinyvit-encoder-{encoder_key(encoder)[:20]}"
    return cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"


def exported_encoder(encoder: torch.nn.Module, cache_dir: Path, backend: str = "onnxruntime", progress=None) -> Path:
    """The encoder's ONNX file in ``cache_dir``: the cached one when it matches its record, else a new export
    (checked with ``backend``)."""
    path, record_path = cached_paths(encoder, cache_dir)
    problem = cache_problem(path, record_path)
    if problem is None:
        return path
    if path.exists() or record_path.exists():
        warn(f"{path}: {problem}; exporting the encoder again", progress)
    else:
        warn("exporting the image encoder for the faster runtime (once for these weights, about a minute)", progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    export_validated(encoder, path, record_path, backend)
    return path


def cache_problem(path: Path, record_path: Path) -> Optional[str]:
    """What is wrong with a cached export (None: usable)."""
    if not path.is_file():
        return "no export"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        size, sha256 = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its record is missing or unreadable"
    if path.stat().st_size != size or file_sha256(path) != sha256:
        return "the cached export does not match its record (size or sha256): it was replaced or corrupted"
    return None


def export_validated(encoder: torch.nn.Module, path: Path, record_path: Path, backend: str) -> None:
    """Export to a temporary name, check it with ``backend`` against torch, then rename it and write its record
    (last, so that an interrupted export leaves no record and is made again)."""
    side = int(getattr(getattr(encoder, "config", None), "image_size", 256))
    probe = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    handle, temporary = tempfile.mkstemp(prefix=path.stem, suffix=".onnx.tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        export_onnx(encoder, probe, temporary)
        with torch.inference_mode():
            expected = encoder(probe).float().numpy()
        run, _ = RUNNERS[backend](temporary, torch.get_num_threads())
        difference = float(np.abs(run(probe.numpy()) - expected).max())
        if not difference <= EXPORT_TOLERANCE:
            raise RuntimeError(f"the export differs from torch by {difference:.3g} (> {EXPORT_TOLERANCE:g}); "
                               f"it is not used")
        os.chmod(temporary, 0o644)        # mkstemp's 0600 would hide the export from the folder's other users
        record = {"size": temporary.stat().st_size, "sha256": file_sha256(temporary), "torch": torch.__version__,
                  "format": EXPORT_FORMAT, "opset": ONNX_OPSET, "max_abs_difference": difference}
        os.replace(temporary, path)
        write_text_atomically(record_path, json.dumps(record, indent=1))
    finally:
        temporary.unlink(missing_ok=True)


def export_onnx(encoder: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` (the torch.export-based exporter) with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # the exporter's notes (torchvision's operators not registered, deprecations inside torch) are not the user's
    exporter_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (example,), str(path), dynamo=True, external_data=False,
                              opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes={"image": {0: batch}}, verbose=False)
    finally:
        exporter_log.setLevel(level)


def write_text_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


__all__ = ["BACKENDS", "AUTO_ORDER", "ImageEncoder", "make_image_encoder", "missing_packages", "encoder_key",
           "exported_encoder", "EXPORT_TOLERANCE"]
