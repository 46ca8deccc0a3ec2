"""Benchmark (not a test): seconds of a text prompt on the slice-wise path (text localiser + LiteMedSAM).

On the 512 x 512 thorax CT (133 slices) by default: the first structure (volume set, slices encoded for the
localiser and the zoom-in, decoded), then each further structure on the same volume (the localiser's maps and
most slices come from the cache). For each encoder backend asked for (``auto``: OpenVINO or ONNX Runtime when
installed, ``torch``: the model's own encoder), in one run, with the ratio of the first structure's seconds
to the first run's (the first backend and zoom-in given).

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_text.py [--volume ct/thorax_abdomen_ct.nii.gz]
        [--texts liver spleen "right kidney" "left kidney"] [--backends auto torch] [--threads 2]
        [--strides 1 3] [--zoom-in boxes sampled]
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import SHARED  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", default="ct/thorax_abdomen_ct.nii.gz", help="relative to the shared data")
    parser.add_argument("--texts", nargs="+", default=["liver", "spleen", "right kidney", "left kidney"])
    parser.add_argument("--backends", nargs="+", default=["auto", "torch"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zoom-in", nargs="+", default=["sampled"],
                        help="text zoom-ins to time (VolumeSlicePredictor text_zoom_in), each on a fresh predictor")
    parser.add_argument("--strides", type=int, nargs="+", default=[3],
                        help="the localiser's coarse strides to time (1: it reads every sampled slice)")
    args = parser.parse_args()
    data = SHARED / "data"
    if not (data / args.volume).is_file():
        print(f"{data / args.volume} not found (set MEDSEGX_SHARED)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from medsegx_core.data.readers import read_volume
    from medsegx_core.prompts import Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    volume = read_volume(data / args.volume)
    print(f"{args.volume}: {volume.array.shape[::-1]} voxels (i, j, k), {args.threads} threads")
    firsts = {}
    for backend in args.backends:
        for stride, zoom_in in itertools.product(args.strides, args.zoom_in):
            run = f"{backend}/stride {stride}/{zoom_in}"
            predictor = VolumeSlicePredictor(load_litemedsam(), encoder_backend=backend, text_zoom_in=zoom_in)
            predictor.localiser_stride = stride
            started = time.perf_counter()
            predictor.set_volume(volume)
            for index, text in enumerate(args.texts):
                begin = time.perf_counter()
                result = predictor.segment(Prompts(text=text))
                seconds = time.perf_counter() - (started if index == 0 else begin)
                if index == 0:
                    firsts[run] = seconds
                print(f"  {run:24s} {'first' if index == 0 else 'next ':5s} {text:13s} {seconds:6.1f} s "
                      f"({result.encoded} slices encoded, {result.decoded} decoded; {predictor.describe_encoder()})",
                      flush=True)
    reference = next(iter(firsts))
    for run, seconds in firsts.items():
        print(f"first structure, {run}: {seconds:.1f} s = {firsts[reference] / seconds:.2f}x {reference}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
