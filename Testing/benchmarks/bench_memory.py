"""Benchmark (not a test): peak memory of LiteMedSAM's slice-wise path with a 512 x 512 x 300 CT fully encoded.

The 512 x 512 thorax CT (133 real slices) is repeated along its slice axis to ``--slices`` slices (300: the size
the issue names), set on a ``VolumeSlicePredictor`` and every slice encoded (``encode_ahead`` of a box on one slice
with ``propagate``: the whole volume, nearest first), then a 3D box over its liver is segmented from the cache.
It prints the process's peak resident memory (``ru_maxrss``), the embedding cache's bytes and budget, the seconds,
and the same peak measured after the volume is set and before anything is encoded (what the model and the volume
take), so that the cache's share is the difference.

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_memory.py [--slices 300] [--threads 2] [--backend auto]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import SHARED, tight_box_ijk  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: kilobytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto", help="encoder backend (auto: OpenVINO/ONNX Runtime if installed)")
    args = parser.parse_args()

    import torch

    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.data.volume import Volume
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    data = SHARED / "data"
    ct = read_volume(data / "ct/thorax_abdomen_ct.nii.gz")
    labels = read_labelmap(data / "ct/thorax_abdomen_ct_labels.nii.gz", ct).array
    names = json.loads((data / "ct/thorax_abdomen_ct_labels.json").read_text(encoding="utf-8"))
    liver = labels == next(int(value) for value, name in names.items() if name == "liver")
    repeats = -(-args.slices // ct.array.shape[0])
    array = np.concatenate([ct.array] * repeats, axis=0)[:args.slices]     # (k, j, i): k the slices
    tall = Volume(np.ascontiguousarray(array), ct.spacing, ct.origin_ras, ct.direction_ras, modality="CT",
                  source=f"thorax CT x{repeats}")
    print(f"volume {tall.array.shape[::-1]} (i, j, k), {tall.array.nbytes / 2**20:.0f} MiB as stored")

    started = time.perf_counter()
    predictor = VolumeSlicePredictor(load_litemedsam(), encoder_backend=args.backend)
    predictor.set_volume(tall, modality="CT")
    before = peak_mib()
    lo, hi = tight_box_ijk(liver)
    middle = (lo[2] + hi[2]) // 2
    flat = Prompts(box=BoxPrompt((lo[0], lo[1], middle), (hi[0], hi[1], middle), space="ijk"))
    encoded = predictor.encode_ahead(flat, propagate=True)
    encode_s = time.perf_counter() - started
    result = predictor.segment(Prompts(box=BoxPrompt(lo, hi, space="ijk")))
    print(f"encoder {predictor.describe_encoder()}; {encoded} slices encoded in {encode_s:.0f} s; the liver box "
          f"then decoded {result.decoded} slices, encoded {result.encoded}")
    print(f"embedding cache: {predictor.cache.bytes / 2**20:.0f} MiB held, budget "
          f"{predictor.cache.budget_bytes / 2**20:.0f} MiB (cap {predictor.cache.cap_bytes / 2**20:.0f} MiB)")
    print(f"peak resident memory: {before:.0f} MiB with the model and the volume set, {peak_mib():.0f} MiB with "
          f"every slice encoded (goal: <= 2048 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
