"""Benchmark (not a test): LiteMedSAM's TinyViT image encoder on the CPU, every way we can run it, against eager
fp32 torch in the same run: seconds per slice, speed-up, embedding difference and the masks they decode to.

Variants (``inference/encoder_backends.py`` builds the runtimes; ``--only`` keeps some of them):

* ``eager``: the encoder as loaded (fp32, channels-first): the reference;
* ``channels-last``: the same weights and input in channels-last memory (``VolumeSlicePredictor``'s path today);
* ``bf16`` (``--bf16``): channels-last under ``torch.autocast("cpu", bfloat16)`` (emulated, slow, on CPUs without
  AMX or AVX512_BF16);
* ``compile``: ``torch.compile`` of the channels-last encoder (``--compile``: its compilation takes minutes);
* ``onnxruntime``, ``openvino``: the encoder's ONNX export run by each runtime in float32;
* ``openvino-bf16``: the same export run by OpenVINO in bf16 (``--precision bf16`` on the CPU), on
  CPUs with native bf16 only (AMX or AVX512_BF16);
* ``experts`` (``--experts PACK``, e.g. ``abdominal_mr``): the channels-last encoder with a LiteMedSAM expert pack
  loaded, routed as a box without text routes it (the modality alone, ``--experts-modality``): what a pack costs
  per slice (the runtimes export the base encoder only, so a pack runs in torch); its masks differ from eager's
  by design;
* ``ort-int8``, ``ov-int8`` (``--int8``): the export quantised statically (ONNX Runtime's QDQ, per-channel int8
  weights, uint8 activations, MinMax calibration on the first case's benchmark slices, Conv/MatMul/Gemm) run by
  each runtime.

Timing: for each batch size, every variant runs once to warm up, then ``--repeats`` rounds each run every variant
in turn on the same batch (interleaved, so a change of load from other processes hits all of them alike). The
table gives the median seconds per slice and the speed-up as the median over rounds of eager's time / the
variant's time in that round.

Masks: the liver on ``--slices`` axial slices spread over its extent in each case (``eval_box``'s cases and
reading), each decoded with the label's 2D box on that slice by the same fp32 prompt encoder and decoder from the
variant's embedding and from eager's; the table gives the largest |embedding difference| and the smallest and mean
Dice of the masks against eager's (two empty masks agree). Usage (several minutes on 2 threads)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_encoder.py [--threads 2] [--batches 1 4] [--repeats 5]
        [--slices 6] [--cases totalseg_ct thorax_abdomen_ct chaos_10] [--bf16] [--compile] [--int8]
        [--only openvino] [--cache-dir FOLDER] [--experts abdominal_mr]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import SHARED, case_structures, read_case, selected_cases  # noqa: E402

ORGAN = "liver"
DEFAULT_CASES = ("totalseg_ct", "thorax_abdomen_ct", "chaos_10")
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")

# (variant, runtime, encoder precision): bf16 is what the predictors ask for with --precision bf16 on the CPU
RUNTIME_VARIANTS = (("onnxruntime", "onnxruntime", "fp32"), ("openvino", "openvino", "fp32"),
                    ("openvino-bf16", "openvino", "bf16"))
Encoder = Callable[[np.ndarray], np.ndarray]     # float32 (B, 3, S, S) -> float32 (B, C, S/4, S/4)


@dataclass
class Slices:
    """Real model inputs with the label's box on each, and what decoding needs to go back to the slice."""
    images: np.ndarray                          # (N, 3, S, S) float32
    boxes: np.ndarray                           # (N, 4) model pixels
    shapes: List[Tuple[int, int]] = field(default_factory=list)
    names: List[str] = field(default_factory=list)


def liver_slices(data: Path, keys: Sequence[str], per_case: int) -> Slices:
    from medsegx_core.data.hierarchy import load_hierarchy
    from medsegx_core.data.orientation import AxisReorientation
    from medsegx_core.inference.slice_preprocessing import box_to_model, litemedsam_input, litemedsam_window

    images, boxes, shapes, names = [], [], [], []
    for case in selected_cases(data, keys):
        volume, labels = read_case(data, case)
        value = dict(case_structures(data, case))[ORGAN]
        orientation = AxisReorientation.to_radiological(volume.direction_ras, volume.shape_ijk)
        working = orientation.array_to_working(volume.array)
        truth = orientation.array_to_working(labels) == value
        window = litemedsam_window(volume.array, load_hierarchy().resolve_modality(case.modality).name)
        present = np.flatnonzero(truth.any(axis=(1, 2)))
        chosen = present[np.unique(np.linspace(0, len(present) - 1, per_case).round().astype(int))]
        for k in chosen:
            images.append(litemedsam_input(window.apply(working[k])).numpy())
            rows, cols = np.nonzero(truth[k])
            box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)
            boxes.append(box_to_model(box, working.shape[1:]))
            shapes.append(tuple(working.shape[1:]))
            names.append(f"{case.key}:{k}")
    return Slices(np.stack(images), np.stack(boxes), shapes, names)


# ---- the variants ---------------------------------------------------------------------------------------------------
def torch_variant(encoder, channels_last: bool = False, autocast: bool = False) -> Encoder:
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(batch)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return encoder(images).float().numpy()
    return run


def int8_variants(onnx_path: Path, calibration: np.ndarray, threads: int, workdir: Path) -> Dict[str, Encoder]:
    """The export quantised statically (QDQ), run by ONNX Runtime and by OpenVINO."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from medsegx_core.inference.encoder_backends import INPUT_NAME, RUNNERS

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({INPUT_NAME: calibration[i:i + 1]} for i in range(len(calibration)))

        def get_next(self):
            return next(self.feeds, None)

    prepared, quantised = workdir / "prepared.onnx", workdir / "int8.onnx"
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(quantised), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax)
    return {"ort-int8": RUNNERS["onnxruntime"](quantised, threads)[0],
            "ov-int8": RUNNERS["openvino"](quantised, threads)[0]}


def build_variants(model, args, slices: Slices, workdir: Path, log) -> Tuple[Dict[str, Encoder], Dict[str, str]]:
    """(name -> encoder, name -> how it was made)."""
    import torch

    from medsegx_core.inference.encoder_backends import exported_encoder, make_image_encoder

    eager = model.image_encoder
    channels_last = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    variants: Dict[str, Encoder] = {"eager": torch_variant(eager)}
    notes = {"eager": f"torch {torch.__version__}, fp32, channels-first (reference)"}
    wanted = set(args.only or ()) | {"eager"}

    def want(name: str) -> bool:
        return not args.only or name in wanted

    if want("channels-last"):
        variants["channels-last"] = torch_variant(channels_last, channels_last=True)
        notes["channels-last"] = "torch fp32, channels-last"
    if args.experts and want("experts"):
        from medsegx_core.data.hierarchy import context_indices
        from medsegx_core.weights.expert_pack import apply_expert_pack

        adapted = copy.deepcopy(model)
        apply_expert_pack(adapted, args.experts)
        adapted.to(memory_format=torch.channels_last)
        routed = torch_variant(adapted.image_encoder, channels_last=True)
        context = context_indices(None, args.experts_modality)

        def with_experts(batch: np.ndarray) -> np.ndarray:
            with adapted.conmoae.context(context):
                return routed(batch)
        variants["experts"] = with_experts
        notes["experts"] = (f"torch fp32, channels-last, expert pack {args.experts} routed by the modality "
                            f"{args.experts_modality}")
    if args.bf16 and want("bf16"):
        variants["bf16"] = torch_variant(channels_last, channels_last=True, autocast=True)
        notes["bf16"] = "torch bf16 autocast, channels-last"
    if args.compile and want("compile"):
        started = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(channels_last))
        variants["compile"] = torch_variant(compiled, channels_last=True)
        variants["compile"](slices.images[:1])          # compiles now, not in the first timing
        notes["compile"] = f"torch.compile (inductor), channels-last; compiled in {time.perf_counter() - started:.0f} s"
    for name, backend, precision in RUNTIME_VARIANTS:
        if want(name):
            started = time.perf_counter()
            encoder = make_image_encoder(model, backend, cache_dir=args.cache_dir, threads=args.threads,
                                         precision=precision)
            if encoder.backend != backend:
                log(f"{name}: not available, skipped")
                continue
            if precision == "bf16" and "bfloat16" not in encoder.describe():
                log(f"{name}: this CPU has no native bf16 (the runtime would compute in float32), skipped")
                continue
            variants[name] = lambda batch, run=encoder: run(batch).numpy()
            notes[name] = f"{encoder.describe()}; ready in {time.perf_counter() - started:.1f} s"
    if args.int8:
        onnx_path = exported_encoder(eager, Path(args.cache_dir))
        calibration = slices.images[: args.slices]
        started = time.perf_counter()
        variants.update(int8_variants(onnx_path, calibration, args.threads, workdir))
        for name in ("ort-int8", "ov-int8"):
            notes[name] = (f"static QDQ int8 (calibrated on {len(calibration)} slices); quantised in "
                           f"{time.perf_counter() - started:.0f} s")
    return variants, notes


# ---- measuring ------------------------------------------------------------------------------------------------------
def timings(variants: Dict[str, Encoder], batch: np.ndarray, repeats: int) -> Dict[str, Tuple[float, float]]:
    """name -> (median seconds per slice, median over rounds of eager's seconds / the variant's)."""
    for run in variants.values():
        run(batch)
    seconds: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run(batch)
            seconds[name].append((time.perf_counter() - started) / len(batch))
    return {name: (statistics.median(values),
                   statistics.median(e / v for e, v in zip(seconds["eager"], values)))
            for name, values in seconds.items()}


def masks(model, embeddings: np.ndarray, slices: Slices) -> List[np.ndarray]:
    import torch

    from medsegx_core.inference.slice_preprocessing import logits_to_slice

    found = []
    with torch.inference_mode():
        for i, shape in enumerate(slices.shapes):
            logits = model.decode(torch.from_numpy(embeddings[i:i + 1]), torch.from_numpy(slices.boxes[i:i + 1])).logits
            found.append((logits_to_slice(logits, shape)[0] > 0).numpy())
    return found


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def agreement(model, variants: Dict[str, Encoder], slices: Slices, batch: int) -> Dict[str, Tuple[float, float, float]]:
    """name -> (max |embedding - eager's|, smallest Dice, mean Dice) over the slices."""
    def embed(run: Encoder) -> np.ndarray:
        return np.concatenate([run(slices.images[i:i + batch]) for i in range(0, len(slices.images), batch)])

    reference = embed(variants["eager"])
    reference_masks = masks(model, reference, slices)
    found = {}
    for name, run in variants.items():
        embeddings = reference if name == "eager" else embed(run)
        scores = [dice(a, b) for a, b in zip(masks(model, embeddings, slices), reference_masks)]
        found[name] = (float(np.abs(embeddings - reference).max()), min(scores), float(np.mean(scores)))
    return found


def cpu_description() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    present = [f for f in CPU_FLAGS if f in flags]
    absent = [f for f in CPU_FLAGS if f not in flags]
    return f"{model}; has {' '.join(present) or 'none'}; lacks {' '.join(absent) or 'none'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=6, help="liver slices per case")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="eval_box case keys")
    parser.add_argument("--bf16", action="store_true", help="also bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes to compile)")
    parser.add_argument("--int8", action="store_true", help="also the statically quantised export")
    parser.add_argument("--only", nargs="+", help="variants to run besides eager")
    parser.add_argument("--cache-dir", default=None, help="the export cache (default: a temporary folder)")
    parser.add_argument("--experts", help="also this LiteMedSAM expert pack (a file or a bundled pack's name)")
    parser.add_argument("--experts-modality", default="MR", help="the modality the pack's experts are routed by")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1

    import torch

    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:5.0f} s] {message}", file=sys.stderr, flush=True)

    model = load_litemedsam()
    slices = liver_slices(args.data, args.cases, args.slices)
    log(f"{len(slices.images)} slices: {' '.join(slices.names)}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        if args.cache_dir is None:
            args.cache_dir = str(Path(workdir) / "exports")
        variants, notes = build_variants(model, args, slices, Path(workdir), log)
        log(f"variants: {', '.join(variants)}")
        timed = {}
        for batch in args.batches:
            images = np.resize(slices.images, (batch,) + slices.images.shape[1:])
            timed[batch] = timings(variants, images, args.repeats)
            log(f"batch {batch} timed")
        agreed = agreement(model, variants, slices, max(args.batches))
    load_after = os.getloadavg()[0]

    print(f"LiteMedSAM TinyViT encoder, {args.threads} threads, {cpu_description()}; load average "
          f"{load_before:.1f} before / {load_after:.1f} after; {args.repeats} interleaved rounds; masks: the liver "
          f"on {len(slices.images)} slices of {', '.join(args.cases)} with the label's box, against eager's\n")
    header = "| variant | " + " | ".join(f"B={b} s/slice | B={b} speed-up" for b in args.batches)
    print(header + " | max abs emb diff | Dice min | Dice mean |")
    print("|---" * (1 + 2 * len(args.batches) + 3) + "|")
    for name in variants:
        cells = " | ".join(f"{timed[b][name][0]:.3f} | {timed[b][name][1]:.2f}x" for b in args.batches)
        diff, low, mean = agreed[name]
        print(f"| {name} | {cells} | {diff:.2e} | {low:.4f} | {mean:.4f} |")
    print()
    for name, note in notes.items():
        print(f"- {name}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
