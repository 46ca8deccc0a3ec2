"""Benchmark (not a test): do SAM point prompts help or hurt LiteMedSAM, which was trained with boxes only?

On the widest slice of every structure of ``eval_box.py``'s cases (every shared CT patient, CHAOS MR evaluation
patients 10 13 15 19 20) it scores the slice's mask (2D Dice against the label on that slice) from
* the box: the label's 2D bounding box on the slice;
* one click alone: a positive click at the label's innermost pixel (largest distance to its border), SAM's point
  prompt with its padding point;
* three clicks alone: that click and two more at the innermost pixels of what the first mask missed / got wrong;
* the box and one click inside: the box plus the positive click;
* the box and a corrective click: the box plus one click at the innermost pixel of the box-mask's largest error
  (positive where it missed, negative where it over-segmented), as a user refines a result;
* the box and the same click as an edit, as the predictor handles clicks (``VolumeSlicePredictor.edit_slice``: a
  positive click widens the box to hold it, a negative one moves the box's nearest edge past it);
and prints the mean per (modality, prompt). Usage::

    OMP_NUM_THREADS=2 python Testing/benchmarks/clicks_litemedsam.py [--cases ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import SHARED, case_structures, read_case, selected_cases  # noqa: E402

PROMPTS = ("box", "1 click", "3 clicks", "box + click inside", "box + corrective click", "box + corrective edit")


def innermost(region: np.ndarray):
    """(x, y) of the pixel of ``region``'s largest component farthest from its border, or None."""
    labelled, count = ndimage.label(region)
    if count == 0:
        return None
    biggest = labelled == 1 + int(np.argmax(np.bincount(labelled.ravel())[1:]))
    distance = ndimage.distance_transform_edt(biggest)
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def dice2d(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    args = parser.parse_args(argv)

    import torch

    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor, mask_box
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    model = load_litemedsam()
    rows: List[Dict] = []
    for case in selected_cases(args.data, args.cases):
        volume, labels = read_case(args.data, case)
        predictor = VolumeSlicePredictor(model, device="cpu", precision="fp32")
        predictor.set_volume(volume, modality=case.modality)
        working = predictor.orientation.array_to_working(labels)
        for organ, value in case_structures(args.data, case):
            truth3d = working == value
            if not truth3d.any():
                continue
            k = int(np.argmax(truth3d.sum(axis=(1, 2))))
            truth = truth3d[k]
            box = mask_box(truth)
            inside = innermost(truth)

            def run(slice_box=None, clicks=()):
                points = np.array([c[0] for c in clicks], dtype=np.float32).reshape(-1, 2)
                labels_ = np.array([c[1] for c in clicks], dtype=np.int64)
                if slice_box is None:     # points alone: straight to the decoder (the predictor refuses them)
                    return points_alone(predictor, k, points, labels_)
                return predictor.decode_slice(k, slice_box, points, labels_)[0]

            boxed = run(box)
            one = run(None, [(inside, 1)])
            second = innermost(truth & ~one) or inside
            wrong = innermost(one & ~truth)
            three = run(None, [(inside, 1), (second, 1)] + ([(wrong, 0)] if wrong else [(inside, 1)]))
            missed, extra = truth & ~boxed, boxed & ~truth
            corrective = (innermost(missed), 1) if missed.sum() >= extra.sum() else (innermost(extra), 0)
            fixed = boxed if corrective[0] is None else run(box, [corrective])
            edited = boxed if corrective[0] is None else predictor.edit_slice(
                k, box, np.array([corrective[0]], dtype=np.float32), np.array([corrective[1]]))[0]
            rows.append(dict(case=case.key, modality=case.modality, organ=organ, **{
                name: dice2d(mask, truth) for name, mask in zip(PROMPTS, (boxed, one, three, run(box, [(inside, 1)]),
                                                                          fixed, edited))}))
            print(f"{case.key} {organ}: " + ", ".join(f"{p} {rows[-1][p]:.3f}" for p in PROMPTS), file=sys.stderr)
    print("| modality | n | " + " | ".join(PROMPTS) + " |")
    print("|---|---|" + "---|" * len(PROMPTS))
    for modality in sorted({r["modality"] for r in rows}):
        group = [r for r in rows if r["modality"] == modality]
        print(f"| {modality} | {len(group)} | " + " | ".join(f"{np.mean([r[p] for r in group]):.3f}" for p in PROMPTS)
              + " |")
    return 0


def points_alone(predictor, k: int, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    import torch

    from medsegx_core.inference.slice_preprocessing import logits_to_slice, points_to_model

    shape = predictor.working.shape[1:]
    embedding, _ = predictor.embedding(k)
    clicks = (torch.from_numpy(points_to_model(points, shape, predictor.side))[None],
              torch.as_tensor(labels, dtype=torch.long)[None])
    lowres = predictor.runner.call(lambda: predictor.model.decode(embedding, None, clicks).logits)
    return (logits_to_slice(lowres.float().cpu(), shape, predictor.side)[0] > 0).numpy()


if __name__ == "__main__":
    raise SystemExit(main())
