"""GPU check (not a test; CI has no GPU): the CUDA path of the Predictor on the real CT, on a machine with one.

Prints, for a small model with random weights (seed 0) and the parity fixture's tokenizer:
* what device/precision ``auto`` picks, and the runtime each segmentation reports;
* mask Dice of CUDA fp32 and CUDA auto (bf16 autocast) against the CPU fp32 mask (text, box, text + box + click);
* the out-of-memory fallback: with the GPU filled, a segmentation must finish on the CPU, say so, and give the
  CPU mask.
Exits 1 when a check fails. Needs torch with CUDA, MONAI, transformers and nibabel or SimpleITK::

    python Testing/benchmarks/check_cuda.py [--preset tiny]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_predictor import TOKENIZER, _volume  # noqa: E402  (the benchmark's real CT and tokenizer)
from cuda_memory import fill_cuda_memory  # noqa: E402  (Testing/cuda_memory.py)

from medsegx_core.data.metrics import dice  # noqa: E402
from medsegx_core.inference.device import Runtime  # noqa: E402
from medsegx_core.modeling.build import build_model  # noqa: E402
from medsegx_core.predictor import Predictor  # noqa: E402
from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; "
          f"auto picks {Runtime.resolve('auto').describe()}")
    torch.manual_seed(0)
    model = build_model(args.preset, tokenizer=TOKENIZER)
    volume = _volume(1.0, None)
    size = np.asarray(volume.shape_ijk, dtype=float)
    box = BoxPrompt(tuple(size * [0.30, 0.25, 0.60]), tuple(size * [0.85, 0.85, 0.98]), space="ijk")
    cases = {"text": Prompts(text="liver"), "box": Prompts(box=box),
             "text+box+click": Prompts(text="liver", box=box,
                                       points=(PointPrompt(tuple(size * [0.6, 0.5, 0.8]), space="ijk"),))}
    failures = []
    reference = {}
    cpu = Predictor(copy.deepcopy(model), device="cpu", precision="fp32")
    cpu.set_volume(volume)
    for name, prompts in cases.items():
        reference[name] = cpu.segment(prompts).mask.astype(bool)
    for precision in ("fp32", "auto"):
        # a copy each: a bf16 Predictor converts its model's weights in place
        gpu = Predictor(copy.deepcopy(model), device="cuda", precision=precision)
        start = time.perf_counter()
        gpu.set_volume(volume)
        for name, prompts in cases.items():
            result = gpu.segment(prompts)
            score = dice(result.mask.astype(bool), reference[name])
            limit = 0.999 if precision == "fp32" else 0.99
            print(f"cuda {precision:4s} ({result.runtime}): {name:15s} Dice vs CPU fp32 {score:.4f} "
                  f"({reference[name].sum()} voxels)")
            if score < limit:
                failures.append(f"cuda {precision} {name}: Dice {score:.4f} < {limit}")
        print(f"  {time.perf_counter() - start:.2f} s for set_volume + {len(cases)} prompts, "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB")

    gpu = Predictor(copy.deepcopy(model), device="cuda", precision="fp32")
    gpu.set_volume(volume)
    hog = fill_cuda_memory()   # so that the window encodings cannot allocate
    messages = []
    result = gpu.segment(cases["text+box+click"], progress=lambda f, m: messages.append(m))
    del hog
    said = [m for m in messages if "out of memory" in m]
    score = dice(result.mask.astype(bool), reference["text+box+click"])
    print(f"out of memory: now on {gpu.runtime.describe()}; said: {said[:1]}; Dice vs CPU {score:.4f}")
    if gpu.runtime.device.type != "cpu" or not said or score < 0.999:
        failures.append("out-of-memory fallback")
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
