"""Benchmark (not a test): our cached Predictor vs a naive path that recomputes everything per prompt.

Same volume, same weights (SegVol's official widths, random initialisation with a fixed seed; the tokenizer
from the parity fixture), one run, side by side:

* naive: what the official inference does for every prompt: preprocess the volume, encode the zoom-out view
  and every zoom-in window, decode; fp32 and MONAI's (unfused) attention, as the official code runs.
* ours: ``Predictor`` with its defaults (device/precision "auto", fused attention): ``set_volume`` + the first
  prompt, then a re-prompt with one added point (only the prompt encoder and decoder run again).

It prints first-prompt and re-prompt times, peak resident memory (each measurement runs in its own process, so
the peak is that path's own, model included), how time grows with the volume size, and the Dice between the
reduced-precision mask and the fp32 mask on the real CT. Usage (takes minutes; use the threads you may)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_predictor.py [--threads 2] [--sizes 1 1.5 2] [--no-large]
    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_predictor.py --only-large   # issue #3's 2 GB target only

``MEDSEGX_BENCH_DEVICE=cuda`` times both paths on a GPU instead; ``MEDSEGX_SHARED`` points at another copy of the
shared folder (data/ct/totalseg_ct.nii.gz and the parity fixture's tokenizer are all it reads) and
``MEDSEGX_BENCH_CT`` at another CT (Testing/device/README.md runs it on a GPU machine with the thorax CT).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
# MEDSEGX_BENCH_CT: another CT (e.g. data/ct/thorax_abdomen_ct.nii.gz, issue 16's clinical-size volume).
CT = Path(os.environ.get("MEDSEGX_BENCH_CT", SHARED / "data" / "ct" / "totalseg_ct.nii.gz"))
TOKENIZER = SHARED / "fixtures" / "segvol_parity" / "tokenizer"
LARGE_SHAPE_IJK = (512, 512, 300)
# MEDSEGX_BENCH_DEVICE=cuda runs both paths on the GPU (naive: fp32 as the official code; ours: its defaults).
DEVICE = os.environ.get("MEDSEGX_BENCH_DEVICE", "cpu")


# ---- the measured work, run in a child process ------------------------------------------------------------------
def _volume(scale: float, shape_ijk):
    """The real CT, optionally resampled (linear) to ``scale`` times its size or to ``shape_ijk``."""
    from medsegx_core.data.volume import Volume

    try:
        import SimpleITK as sitk
    except ImportError:   # a machine with only torch + nibabel (e.g. a GPU host): the CT as stored
        if shape_ijk or scale != 1.0:
            raise SystemExit("resampled sizes need SimpleITK; run with --sizes (none) --no-large")
        from medsegx_core.data.readers import _read_freesurfer   # nibabel's reader reads NIfTI too

        volume = _read_freesurfer(CT)
        volume.modality = "CT"
        return volume
    image = sitk.ReadImage(str(CT))
    if shape_ijk or scale != 1.0:
        image = resampled_image(image, scale, shape_ijk)
    return Volume.from_sitk(image, modality="CT", source=f"{CT.name} x{scale}" if not shape_ijk else "large")


def resampled_image(image, scale: float = 1.0, shape_ijk=None, interpolator=None, default: float = -1024.0,
                    pixel=None):
    """A SimpleITK image resampled over the same extent to ``scale`` times its size or to ``shape_ijk``
    (linear, int16, -1024 outside by default; also used by bench_official.py)."""
    import SimpleITK as sitk

    size = list(shape_ijk) if shape_ijk else [round(n * scale) for n in image.GetSize()]
    spacing = [sp * n / m for sp, n, m in zip(image.GetSpacing(), image.GetSize(), size)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear if interpolator is None else interpolator,
                         image.GetOrigin(), spacing, image.GetDirection(), default,
                         sitk.sitkInt16 if pixel is None else pixel)


def _prompts(volume):
    from medsegx_core.prompts import BoxPrompt, PointPrompt, Prompts

    size = np.asarray(volume.shape_ijk, dtype=float)
    box = BoxPrompt(tuple(size * [0.30, 0.25, 0.60]), tuple(size * [0.85, 0.85, 0.98]), space="ijk")
    first = Prompts(text="liver", box=box)
    click = PointPrompt(tuple(size * [0.6, 0.5, 0.8]), space="ijk")
    return first, Prompts(text="liver", box=box, points=(click,))


def _model():
    import torch

    from medsegx_core.modeling.build import build_model

    torch.manual_seed(0)
    # MEDSEGX_BENCH_PRESET=tiny gives a quick smoke run of this script.
    return build_model(os.environ.get("MEDSEGX_BENCH_PRESET", "segvol"), tokenizer=TOKENIZER)


def worker(path: str, scale: float, large: bool, mask_out: str) -> dict:
    """One path on one volume; returns timings and this process's peak RSS."""
    from medsegx_core.predictor import Predictor

    volume = _volume(scale, LARGE_SHAPE_IJK if large else None)
    first, second = _prompts(volume)
    model = _model()
    out = {"path": path, "shape_ijk": list(volume.shape_ijk)}
    if path == "naive":
        times = []
        for prompts in (first, second):
            start = time.perf_counter()
            predictor = Predictor(model, device=DEVICE, precision="fp32", fast_kernels=False)
            predictor.set_volume(volume)
            result = predictor.segment(prompts)
            times.append(time.perf_counter() - start)
            if prompts is first:
                mask = result.mask
        out.update(first_s=times[0], reprompt_s=times[1], windows=result.windows, runtime=result.runtime)
    else:
        start = time.perf_counter()
        predictor = Predictor(model, device=DEVICE)
        predictor.set_volume(volume)
        set_volume_s = time.perf_counter() - start
        result = predictor.segment(first)
        out["first_s"] = time.perf_counter() - start
        mask = result.mask
        start = time.perf_counter()
        again = predictor.segment(second)
        out.update(reprompt_s=time.perf_counter() - start, set_volume_s=set_volume_s, windows=result.windows,
                   reprompt_windows_encoded=again.windows_encoded, reprompt_windows_decoded=again.windows_decoded,
                   runtime=result.runtime)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if DEVICE.startswith("cuda"):
        import torch

        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    if mask_out:
        np.save(mask_out, mask.astype(bool))
    return out


# ---- the driver ------------------------------------------------------------------------------------------------
def measure(path: str, scale: float = 1.0, large: bool = False, mask_out: str = "") -> dict:
    command = [sys.executable, __file__, "--worker", path, "--scale", str(scale), "--mask-out", mask_out]
    if large:
        command.append("--large")
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{path} x{scale} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=float, nargs="*", default=[1.5, 2.0],
                        help="extra scales of the real CT for the growth table (ours only)")
    parser.add_argument("--no-large", action="store_true", help="skip the 512x512x300 run")
    parser.add_argument("--only-large", action="store_true",
                        help="only ours on the 512x512x300 volume (peak RSS, times, windows; about 30 min on 2 "
                             "threads)")
    parser.add_argument("--worker", choices=["naive", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--large", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mask-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(args.worker, args.scale, args.large, args.mask_out)))
        return

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.inference.device import cpu_has_native_bf16

    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}")
    preset = os.environ.get("MEDSEGX_BENCH_PRESET", "segvol")
    print(f"weights: preset {preset!r} ('segvol' = official widths), random init seed 0; volume: {CT}")
    if args.only_large:
        print(json.dumps(measure("ours", large=True)), flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        naive_mask, ours_mask = Path(scratch) / "naive.npy", Path(scratch) / "ours.npy"
        naive = measure("naive", mask_out=str(naive_mask))
        ours = measure("ours", mask_out=str(ours_mask))
        agreement = dice(np.load(naive_mask), np.load(ours_mask))
    print(f"\n== real CT {naive['shape_ijk']} (i, j, k), text 'liver' + box, then + one click; "
          f"{naive['windows']} zoom-in windows")
    print(f"{'':26}{'naive (' + naive['runtime'] + ')':>24}{'ours (' + ours['runtime'] + ')':>24}{'speed-up':>10}")
    for key, label in (("first_s", "first prompt [s]"), ("reprompt_s", "re-prompt, +1 point [s]")):
        print(f"{label:26}{naive[key]:>24.2f}{ours[key]:>24.2f}{naive[key] / ours[key]:>9.1f}x")
    print(f"{'peak RSS [GB]':26}{naive['peak_rss_gb']:>24.2f}{ours['peak_rss_gb']:>24.2f}")
    if "peak_gpu_gb" in ours:
        print(f"{'peak GPU memory [GB]':26}{naive['peak_gpu_gb']:>24.2f}{ours['peak_gpu_gb']:>24.2f}")
    print(f"ours: set_volume {ours['set_volume_s']:.2f} s; on re-prompt {ours['reprompt_windows_encoded']} "
          f"windows encoded again and {ours['reprompt_windows_decoded']} of {ours['windows']} decoded again")
    print(f"mask Dice, ours ({ours['runtime']}) vs fp32: {agreement:.4f}")

    print("\n== growth with volume size (ours)")
    print(f"{'shape (i, j, k)':>22}{'voxels':>12}{'windows':>9}{'first [s]':>11}{'re-prompt [s]':>15}"
          f"{'peak RSS [GB]':>15}")
    rows = [ours] + [measure("ours", scale) for scale in args.sizes]
    if not args.no_large:
        rows.append(measure("ours", large=True))
    for row in rows:
        voxels = int(np.prod(row["shape_ijk"]))
        print(f"{str(tuple(row['shape_ijk'])):>22}{voxels:>12}{row['windows']:>9}{row['first_s']:>11.2f}"
              f"{row['reprompt_s']:>15.2f}{row['peak_rss_gb']:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
