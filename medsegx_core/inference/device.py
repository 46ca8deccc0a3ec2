"""Where and in which precision the model runs, and what happens when the GPU runs out of memory.

* device ``"auto"``: CUDA when torch sees a GPU, else the CPU.
* precision ``"auto"``: on CUDA bf16 autocast where the GPU supports it, else fp16; on the CPU bf16 autocast
  where the processor has native bf16 instructions (AMX or AVX512_BF16; without them bf16 is emulated and
  slower than fp32), else fp32. ``"fp32"`` forces full precision (the parity tests use it).
* CUDA out of memory: the caller catches it with ``is_out_of_memory``, tells the user through the progress
  callback and the ``medsegx`` logger, and continues on the CPU (``Runtime.cpu_fallback``).

``use_fused_attention`` switches MONAI attention blocks to PyTorch's fused ``scaled_dot_product_attention``:
same mathematics, no materialised 2048x2048 attention matrix per head, about twice as fast on the CPU.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, WeightsError
from .choices import DEVICES, PRECISIONS

LOG = logging.getLogger("medsegx")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AMX or AVX512_BF16)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:  # torch reports "AVX512" on CPUs that also have AVX512_BF16: read the flags (Linux)
        flags = Path("/proc/cpuinfo").read_text(errors="ignore").split()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for but torch sees no CUDA GPU; use --device auto or cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")


def resolve_precision(precision: str, device: torch.device) -> str:
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise InputError("precision 'fp16' is for CUDA GPUs; on the CPU use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class Runtime:
    """A device and a precision; ``autocast()`` is the context the model's forwards run in."""

    device: torch.device
    precision: str

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto") -> "Runtime":
        resolved = resolve_device(device)
        return cls(resolved, resolve_precision(precision, resolved))

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype cached activations are kept in: the autocast dtype (half the memory), else float32."""
        return _AUTOCAST_DTYPES.get(self.precision, torch.float32)

    def cpu_fallback(self) -> "Runtime":
        """The runtime to continue with after CUDA ran out of memory (fp32 stays fp32)."""
        cpu = torch.device("cpu")
        precision = "fp32" if self.precision == "fp32" else resolve_precision("auto", cpu)
        return Runtime(cpu, precision)

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}"


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc))


def release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc (macOS, Windows, musl): nothing to do
        return None


def release_freed_memory() -> None:
    """Give the memory the C allocator holds as free back to the system (glibc only; elsewhere a no-op).

    glibc keeps freed blocks of its heaps mapped for re-use, so resident memory stays at its high-water mark:
    after the fp32 -> bf16 weight cast about 100 MB of the freed float32 weights, after each encoder forward
    about 100 MB of activations (measured with SegVol's widths). The peak of a long run is the sum of such
    left-overs and the next forward's needs; a trim takes milliseconds, an encoder forward seconds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def use_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI self-attention block in ``model`` to fused SDPA; returns how many were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "use_flash_attention") and hasattr(module, "qkv"):
            if getattr(module, "save_attn", False) or getattr(module, "rel_positional_embedding", None) is not None:
                continue  # the fused path cannot return attention maps or add relative positions
            module.use_flash_attention = bool(enabled)
            switched += 1
    return switched


def _patch_expanding_forward(module: nn.ConvTranspose3d, x: torch.Tensor) -> torch.Tensor:
    """ConvTranspose3d with kernel == stride as one matrix product: each input voxel independently writes its
    own k*k*k output block, so the layer is ``x @ W`` followed by a rearrangement (no overlap to add up)."""
    batch, channels, depth, height, width = x.shape
    out_channels = module.out_channels
    kd, kh, kw = module.kernel_size
    weight = module.weight.reshape(channels, out_channels * kd * kh * kw)
    blocks = x.flatten(2).transpose(1, 2) @ weight.to(x.dtype)
    blocks = blocks.reshape(batch, depth, height, width, out_channels, kd, kh, kw)
    out = blocks.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, out_channels, depth * kd, height * kh, width * kw)
    return out if module.bias is None else out + module.bias.to(out.dtype).view(1, -1, 1, 1, 1)


def use_matmul_transposed_convolutions(model: nn.Module) -> int:
    """Run every non-overlapping ConvTranspose3d (kernel == stride, SegVol's decoder upscaling) as a matrix
    product: the same result (float32 summation order aside), about twice as fast as PyTorch's CPU kernel in
    bf16. Parameters and state-dict keys are untouched. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if (isinstance(module, nn.ConvTranspose3d) and tuple(module.kernel_size) == tuple(module.stride)
                and tuple(module.padding) == (0, 0, 0) and tuple(module.output_padding) == (0, 0, 0)
                and tuple(module.dilation) == (1, 1, 1) and module.groups == 1):
            module.forward = _patch_expanding_forward.__get__(module)
            switched += 1
    return switched


_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                   nn.ConvTranspose3d)


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of linear and convolution layers in ``dtype``; returns how many layers changed.

    Under autocast these layers compute in the autocast dtype anyway, so storing their weights in it gives the
    same results while halving the model's memory and saving a weight cast per call (autocast cannot cache
    casts under ``inference_mode``). Normalisation layers, embeddings and buffers keep float32.
    """
    current = {m.weight.dtype for m in model.modules() if isinstance(m, _MATMUL_MODULES)}
    if dtype == torch.float32 and current - {torch.float32}:
        raise WeightsError("this model's weights were converted to reduced precision by a Predictor using "
                           "bf16/fp16; converting them back would not restore float32 values: load the model "
                           "again (or give the bf16 Predictor a copy) for fp32 results")
    changed = 0
    for module in model.modules():
        if isinstance(module, _MATMUL_MODULES) and module.weight.dtype != dtype:
            module.to(dtype)
            changed += 1
    return changed


def own_storage(model: nn.Module) -> None:
    """Give every parameter and buffer a copy of its own memory.

    Weights loaded from a safetensors file live in its memory map, and the pages read stay resident (the whole
    checkpoint, 0.7 GB at SegVol's widths) as long as any tensor refers to the mapping: after a reduced-precision
    cast the float32 matrix weights are gone but the norms and embeddings still hold it. Copying those (0.1 GB)
    lets it go. (Not done for float32, where the mapping is the model and copying it would only double it.)"""
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or tensor.is_meta:
                        continue
                    copy = tensor.detach().clone()
                    store[name] = nn.Parameter(copy, tensor.requires_grad) if isinstance(
                        tensor, nn.Parameter) else copy


def warn(message: str, progress=None, fraction: float = 0.0) -> None:
    """A warning the user sees: the ``medsegx`` logger and, when there is one, the progress callback."""
    LOG.warning(message)
    if progress is not None:
        progress(fraction, f"warning: {message}")


__all__ = ["DEVICES", "PRECISIONS", "Runtime", "resolve_device", "resolve_precision", "cpu_has_native_bf16",
           "is_out_of_memory", "release_cuda_memory", "release_freed_memory", "use_fused_attention",
           "use_matmul_transposed_convolutions", "cast_matmul_weights", "warn"]
