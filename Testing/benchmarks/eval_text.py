"""Benchmark (not a test): text prompts on the slice-wise path (text localiser + LiteMedSAM) on held-out patients.

For each case (default: the patients the bundled localiser's recipe holds out that have labels: the CT patient
totalseg_ct and CHAOS T2 MR 10 13 15 19 20) and each of liver, spleen, right and left kidney:

* text: ``VolumeSlicePredictor.segment(Prompts(text=NAME))`` with the volume's modality read or guessed from the
  file (no ``--modality``, as users run it); Dice against the label; whether it was found;
* 3D box: the label's tight box as a box prompt (the box path), for reference;
* old text (``--old``): the SegVol text path with the default weights (the bundled starter), as before;
* filled: the label's tight box filled in, no model at all (the trivial baseline).

Absent structures: each volume is also cut into thirds (bottom, middle, top slices, each a volume of its own); an
organ with no labelled voxel in a third is "absent" there, one with at least a fifth of its voxels "present" (in
between: not scored). Besides, "brain" is asked of every trunk volume and the trunk organs of the held-out head MR
(brain_tumor_t1). A hit: an absent structure reported not found; a false warning: a present one not found.

    OMP_NUM_THREADS=2 python Testing/benchmarks/eval_text.py [--localiser DIR] [--cases chaos_10 ...] [--old]
        [--no-slabs] [--zoom-in sampled|boxes|propagate|both] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import SHARED, case_structures, filled_box, read_case, selected_cases, tight_box_ijk  # noqa: E402

ORGAN_TEXT = {"liver": "liver", "spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney"}
DEFAULT_CASES = ("totalseg_ct", "chaos_10", "chaos_13", "chaos_15", "chaos_19", "chaos_20")
HEAD_CASE = ("brain_tumor_t1", "mri/brain_tumor_t1.nrrd")
PRESENT_FRACTION = 0.2


def presence(predictor, text: str) -> dict:
    """The localiser's verdict alone (no zoom-in): found, its peak probability and blob volume."""
    places = predictor.locate(text)
    return dict(found=any(p.found for p in places), peak=max(p.peak for p in places),
                volume_ml=max(p.volume_ml for p in places))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--localiser", help="localiser weights folder (default: the bundled one)")
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES))
    parser.add_argument("--old", action="store_true", help="also the SegVol text path with the default weights")
    parser.add_argument("--no-box", action="store_true", help="skip the 3D box reference")
    parser.add_argument("--no-slabs", action="store_true", help="skip the thirds (absent-structure rows)")
    parser.add_argument("--zoom-in", choices=("boxes", "sampled", "propagate", "both"), default="sampled",
                        help="how LiteMedSAM uses the localiser's boxes (VolumeSlicePredictor text_zoom_in)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    data = SHARED / "data"
    if not data.is_dir():
        print(f"shared data not found at {data}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from medsegx_core.data.metrics import dice
    from medsegx_core.data.readers import read_volume
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam
    from medsegx_core.weights.localiser import load_localiser

    localiser = load_localiser(args.localiser)
    predictor = VolumeSlicePredictor(load_litemedsam(), localiser=localiser, text_zoom_in=args.zoom_in)
    old = None
    if args.old:
        from medsegx_core.predictor import Predictor
        from medsegx_core.weights.default import default_weights
        from medsegx_core.weights.store import load_model

        old = Predictor(load_model(default_weights().path))
    rows, absent_rows = [], []
    for case in selected_cases(data, args.cases):
        volume, labels = read_case(data, case)
        organs = [(o, v) for o, v in case_structures(data, case) if o in ORGAN_TEXT]
        predictor.set_volume(volume)
        if old is not None:
            old.set_volume(volume)
        for organ, value in organs:
            truth = labels == value
            if not truth.any():
                continue
            started = time.perf_counter()
            result = predictor.segment(Prompts(text=ORGAN_TEXT[organ]))
            row = dict(case=case.key, modality=case.modality, organ=organ, found=bool(result.found),
                       text=dice(result.mask, truth), seconds=round(time.perf_counter() - started, 1),
                       encoded=result.encoded, decoded=result.decoded, filled=dice(filled_box(truth), truth))
            if not args.no_box:
                lo, hi = tight_box_ijk(truth)
                boxed = predictor.segment(Prompts(box=BoxPrompt(lo, hi, space="ijk")))
                row["box"] = dice(boxed.mask, truth)
            if old is not None:
                row["old_text"] = dice(old.segment(Prompts(text=ORGAN_TEXT[organ])).mask, truth)
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  flush=True)
        absent_rows.append(dict(case=case.key, part="whole", organ="brain", status="absent",
                                **presence(predictor, "brain")))
        if args.no_slabs:
            continue
        depth = labels.shape[0]
        for part, (first, stop) in {"bottom third": (0, depth // 3), "middle third": (depth // 3, 2 * depth // 3),
                                    "top third": (2 * depth // 3, depth)}.items():
            predictor.set_volume(volume.slab(first, stop))
            for organ, value in organs:
                total, here = int((labels == value).sum()), int((labels[first:stop] == value).sum())
                status = "absent" if here == 0 else "present" if here >= PRESENT_FRACTION * total else "partial"
                if status == "partial" or total == 0:
                    continue
                row = dict(case=case.key, part=part, organ=organ, status=status,
                           **presence(predictor, ORGAN_TEXT[organ]))
                absent_rows.append(row)
                print(f"  {case.key} {part} {organ}: {status}, found={row['found']} (peak {row['peak']:.2f}, "
                      f"{row['volume_ml']:.1f} mL)", flush=True)
    if any(c in HEAD_CASE[0] for c in args.cases) or args.cases == list(DEFAULT_CASES):
        head = read_volume(data / HEAD_CASE[1])
        predictor.set_volume(head)
        for organ, text in ORGAN_TEXT.items():
            absent_rows.append(dict(case=HEAD_CASE[0], part="whole", organ=organ, status="absent",
                                    **presence(predictor, text)))
        absent_rows.append(dict(case=HEAD_CASE[0], part="whole", organ="brain", status="present",
                                **presence(predictor, "brain")))
    print("\nmean Dice per (modality, organ):")
    for modality in sorted({r["modality"] for r in rows}):
        for organ in ORGAN_TEXT:
            chosen = [r for r in rows if r["modality"] == modality and r["organ"] == organ]
            if not chosen:
                continue
            columns = [c for c in ("text", "box", "old_text", "filled") if c in chosen[0]]
            figures = ", ".join(f"{c} {np.mean([r[c] for r in chosen]):.3f}" for c in columns)
            print(f"  {modality} {organ:13s} n={len(chosen)}: {figures}; found {sum(r['found'] for r in chosen)}"
                  f"/{len(chosen)}; {np.mean([r['seconds'] for r in chosen]):.1f} s")
    absent = [r for r in absent_rows if r["status"] == "absent"]
    present = [r for r in absent_rows if r["status"] == "present"] + [dict(found=r["found"]) for r in rows]
    for row in absent_rows:
        print(f"  {row['case']} {row['part']} {row['organ']}: {row['status']}, found={row['found']} "
              f"(peak {row['peak']:.2f}, {row['volume_ml']:.1f} mL)")
    print(f"absent structures reported not found: {sum(not r['found'] for r in absent)}/{len(absent)}; "
          f"present structures reported not found (false warnings): {sum(not r['found'] for r in present)}"
          f"/{len(present)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "absent": absent_rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
