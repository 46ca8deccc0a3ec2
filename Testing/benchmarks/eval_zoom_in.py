"""Benchmark (not a test): LiteMedSAM as the zoom-in of a SegVol-style zoom-out (``medsegx segment --zoom-in
litemedsam``) against the model's own result, for text prompts, per case and structure.

For each case of ``eval_box.py`` (CT patients, CHAOS 10 13 15 19 20) and each of its abdominal organs, the text
prompt (its name) goes through ``Predictor`` with the given SegVol-kind weights (default: the bundled starter
model, or official SegVol weights when you have them):

* own: ``Predictor.segment`` (the weights' own zoom-in, or their coarse pass where their config turns it off);
* coarse: ``Predictor.coarse_mask``, the zoom-out alone;
* litemedsam: that coarse mask's largest blob, a box per slice, LiteMedSAM on each slice
  (``VolumeSlicePredictor.segment_region``);

beside the filled box of the label (the trivial baseline a box prompt must beat). Rows whose case the weights were
trained on say so (the starter model's training record): those are not held-out figures.

    OMP_NUM_THREADS=2 python Testing/benchmarks/eval_zoom_in.py [--weights DIR] [--cases thorax chaos ...]
        [--threads 2] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_box import add_case_options, case_structures, filled_box, read_case, selected_cases  # noqa: E402

TEXT_OF = {"liver": "liver", "spleen": "spleen", "kidney_right": "right kidney", "kidney_left": "left kidney"}


def main(argv=None) -> int:
    from medsegx_core.weights.default import starter_weights_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=starter_weights_dir())
    add_case_options(parser)
    args = parser.parse_args(argv)

    import torch

    from medsegx_core.data.metrics import dice
    from medsegx_core.predictor import Predictor
    from medsegx_core.prompts import Prompts
    from medsegx_core.volume_slice_predictor import VolumeSlicePredictor
    from medsegx_core.weights.litemedsam import load_litemedsam
    from medsegx_core.weights.store import load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from medsegx_core.training.starter_eval import CASE_SPECS, trained_patients

    record = json.loads((args.weights / "config.json").read_text(encoding="utf-8")) \
        if (args.weights / "config.json").is_file() else {}
    patients = trained_patients(record.get("source")) or set()    # the weights' own training record
    trained_on = {spec.image for spec in CASE_SPECS.values() if spec.patient in patients}
    model = load_model(args.weights)
    litemedsam = load_litemedsam()
    rows: List[Dict] = []
    for case in selected_cases(args.data, args.cases):
        if case.key.startswith("chest_ct_aorta"):
            continue
        volume, labels = read_case(args.data, case)
        segvol = Predictor(model)
        segvol.set_volume(volume, modality=case.modality)
        slices = VolumeSlicePredictor(litemedsam)
        slices.set_volume(volume, modality=case.modality)
        for organ, value in case_structures(args.data, case):
            truth = labels == value
            if not truth.any() or organ not in TEXT_OF:
                continue
            prompts = Prompts(text=TEXT_OF[organ])
            own = segvol.segment(prompts).mask
            coarse = segvol.coarse_mask(prompts).mask
            zoomed = slices.segment_region(coarse, TEXT_OF[organ])
            row = dict(case=case.key, modality=case.modality, organ=organ,
                       trained=case.image in trained_on,
                       own=dice(own, truth), coarse=dice(coarse, truth), litemedsam=dice(zoomed.mask, truth),
                       filled=dice(filled_box(truth), truth))
            rows.append(row)
            print(f"[{time.perf_counter() - started:6.0f} s] {case.key} {organ}: own {row['own']:.3f}, coarse "
                  f"{row['coarse']:.3f}, LiteMedSAM zoom-in {row['litemedsam']:.3f}, filled {row['filled']:.3f}"
                  f"{' (trained on)' if row['trained'] else ''}", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print("| modality | organ | n held out | own | coarse | LiteMedSAM zoom-in | filled box |")
    print("|---|---|---|---|---|---|---|")
    for modality, organ in sorted({(r["modality"], r["organ"]) for r in rows}):
        group = [r for r in rows if (r["modality"], r["organ"]) == (modality, organ) and not r["trained"]]
        if group:
            print(f"| {modality} | {organ} | {len(group)} | " + " | ".join(
                f"{np.mean([r[k] for r in group]):.3f}" for k in ("own", "coarse", "litemedsam", "filled")) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
