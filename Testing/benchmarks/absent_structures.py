"""Benchmark (not a test): does the presence warning fire when a text prompt names a structure that is not in the
volume, and stay quiet when it is there?

Each evaluation volume with abdominal organ labels (``training.starter_eval``) is shown whole and as three slabs
of slices (bottom, middle and top third, each a volume of its own). A (slab, organ) pair is "absent" when the
slab holds none of the organ's labelled voxels, "present" when it holds at least a fifth of them (pairs in
between are partial and not scored). The organ's name is the prompt; the result's ``confidence``
(``inference/confidence.py``) is compared with the warning threshold.

Volumes of patients the weights were trained on (their record in config.json) calibrate: the script prints the
threshold that best separates present from absent there. Volumes of held-out patients measure: the hit rate
(absent pairs warned about) and the false-warning rate (present pairs warned about) at the shipped threshold.

    OMP_NUM_THREADS=2 python Testing/benchmarks/absent_structures.py [--weights DIR] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")
PRESENT_FRACTION = 0.2


def pairs(predictor, data_dir: Path, source):
    """(volume, part, organ, status, design, confidence) for every slab and organ."""
    from medsegx_core.data.hierarchy import resolve_term
    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.prompts import Prompts
    from medsegx_core.training.starter_eval import EVALUATION_VOLUMES, HELD_OUT_PATIENT, design, read_names

    for spec in EVALUATION_VOLUMES:
        names = read_names(data_dir, spec.spec)
        organs = [organ for organ in ORGANS if organ in names and organ in spec.structures]
        if spec.slices is not None or not organs:
            continue
        volume = read_volume(data_dir / spec.spec.image)
        labels = read_labelmap(data_dir / spec.spec.labels, volume).array
        depth = labels.shape[0]
        parts = {"whole": (0, depth), "bottom third": (0, depth // 3), "middle third": (depth // 3, 2 * depth // 3),
                 "top third": (2 * depth // 3, depth)}
        for part, (first, stop) in parts.items():
            slab = volume if part == "whole" else volume.slab(first, stop)
            predictor.set_volume(slab, modality=spec.modality)
            for organ in organs:
                total = int((labels == names[organ]).sum())
                here = int((labels[first:stop] == names[organ]).sum())
                status = "absent" if here == 0 else "present" if here >= PRESENT_FRACTION * total else "partial"
                if status == "partial" or total == 0:
                    continue
                result = predictor.segment(Prompts(text=resolve_term(organ).name))
                held_out = design(spec, organ, source) == HELD_OUT_PATIENT
                yield dict(volume=spec.key, part=part, organ=organ, status=status,
                           held_out=held_out, confidence=result.confidence, voxels=int(result.mask.sum()))


def rates(rows, threshold):
    absent = [r for r in rows if r["status"] == "absent"]
    present = [r for r in rows if r["status"] == "present"]
    hits = sum(r["confidence"] < threshold for r in absent)
    false = sum(r["confidence"] < threshold for r in present)
    return hits, len(absent), false, len(present)


def best_threshold(rows):
    """The threshold with the largest (hit rate - false-warning rate) on ``rows``."""
    candidates = sorted({round(r["confidence"], 4) for r in rows} | {0.5})
    def score(t):
        hits, absent, false, present = rates(rows, t)
        return (hits / max(absent, 1)) - (false / max(present, 1))
    return max(candidates, key=score)


def main(argv=None) -> int:
    import torch

    from medsegx_core.inference.confidence import PRESENCE_WARNING_BELOW
    from medsegx_core.predictor import Predictor
    from medsegx_core.weights.default import starter_weights_dir
    from medsegx_core.weights.store import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=starter_weights_dir())
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    record = json.loads((args.weights / "config.json").read_text(encoding="utf-8"))
    predictor = Predictor(load_model(args.weights), device="cpu")
    rows = list(pairs(predictor, args.data, record.get("source")))
    calibration = [r for r in rows if not r["held_out"]]
    evaluation = [r for r in rows if r["held_out"]]
    print(f"weights: {args.weights} | shipped threshold {PRESENCE_WARNING_BELOW}")
    print("| volumes | pairs present / absent | warned when absent (hit) | warned when present (false warning) |")
    print("|---|---|---|---|")
    for label, subset in (("trained patients (calibration)", calibration), ("held-out patients", evaluation)):
        hits, absent, false, present = rates(subset, PRESENCE_WARNING_BELOW)
        print(f"| {label} | {present} / {absent} | {hits}/{absent} ({hits / max(absent, 1):.0%}) | "
              f"{false}/{present} ({false / max(present, 1):.0%}) |")
    if calibration:
        print(f"best threshold on the trained patients: {best_threshold(calibration)}")
    for status in ("present", "absent"):
        values = sorted(r["confidence"] for r in evaluation if r["status"] == status)
        if values:
            print(f"held-out {status}: confidence min {values[0]:.3f} median {values[len(values) // 2]:.3f} "
                  f"max {values[-1]:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
