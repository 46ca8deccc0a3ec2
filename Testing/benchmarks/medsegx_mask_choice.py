"""Benchmark (not a test): how often MedSegX slice mode's mask choice (the IoU head's best of three) picks what the
official evaluation's oracle (best Dice against the label, which a user does not have) picks, and what it costs.

Two sets, both through ``SlicePredictor`` (the user's path):
* the parity fixture's cases (``../shared/fixtures/medsegx_parity``): the oracle index the official code recorded;
* real slices: labelled structures of real CT and MR volumes of ``../shared/data``, every ``--step``-th slice
  where the structure has at least ``--min-pixels`` pixels, box = the label's tight box on that slice, text = the
  structure's name, modality from the volume.
Per set: agreement of the IoU pick with the oracle, mean Dice of the oracle, of the IoU pick and of each fixed
output, and the mean Dice lost by choosing without the label.

Default weights: the fixture's tiny random model (the only MedSegX weights here), so the Dice values mean nothing
anatomically and the agreement figure only exercises the measurement; run it with the official weights imported
('medsegx weights import SAM_CKPT --trained medsegx_vit_b.pth') for the real figure::

    OMP_NUM_THREADS=2 python Testing/benchmarks/medsegx_mask_choice.py [--weights FOLDER_OR_FILE] [--step 4]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", ROOT.parent / "shared"))
FIXTURE = Path(os.environ.get("MEDSEGX_MEDSEGX_FIXTURE", SHARED / "fixtures" / "medsegx_parity")) / "public"
# (volume, labels, {label id: structure name}, modality)
REAL_SETS = [
    ("ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz",
     {5: "liver", 1: "spleen", 2: "right kidney", 3: "left kidney", 6: "stomach"}, "CT"),
    ("mri/chaos_t2spir/chaos_t2_01_mr.nii.gz", "mri/chaos_t2spir/chaos_t2_01_label.nii.gz",
     {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}, "MRI"),
]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def summarise(name: str, rows: list) -> None:
    """rows: (oracle index, IoU pick, Dice of the three outputs)."""
    if not rows:
        print(f"{name}: no samples")
        return
    oracle = np.array([r[0] for r in rows])
    picked = np.array([r[1] for r in rows])
    dices = np.array([r[2] for r in rows])
    agree = float((oracle == picked).mean())
    chosen = dices[np.arange(len(rows)), picked]
    print(f"{name}: {len(rows)} samples; IoU head picks the oracle's output in {agree:.1%} "
          f"({int((oracle == picked).sum())}/{len(rows)}); chance level 1/{dices.shape[1]}")
    fixed = "  ".join(f"output {i} {dices[:, i].mean():.3f}" for i in range(dices.shape[1]))
    print(f"  mean Dice: oracle {dices.max(axis=1).mean():.3f}  IoU pick {chosen.mean():.3f}  {fixed}  "
          f"(lost by choosing without the label: {np.mean(dices.max(axis=1) - chosen):.3f})")


def main(argv=None) -> int:
    import torch

    from medsegx_core.data.readers import read_labelmap, read_volume
    from medsegx_core.modeling.medsegx2d import box_from_label
    from medsegx_core.prompts import BoxPrompt, Prompts
    from medsegx_core.slice_predictor import SlicePredictor
    from medsegx_core.weights.medsegx2d import load_medsegx_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=FIXTURE / "model.safetensors")
    parser.add_argument("--decoder-heads", type=int, default=None,
                        help="for a checkpoint file (default: the fixture's config.json, else 8)")
    parser.add_argument("--step", type=int, default=4, help="every step-th labelled slice of the real volumes")
    parser.add_argument("--min-pixels", type=int, default=30)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    heads = args.decoder_heads
    if heads is None:
        config = FIXTURE / "config.json"
        heads = json.loads(config.read_text())["architecture"]["mask_decoder"]["num_heads"] \
            if args.weights.parent == FIXTURE and config.is_file() else 8
    predictor = SlicePredictor(load_medsegx_weights(args.weights, decoder_heads=heads), device=args.device)
    print(f"weights {args.weights} (device {predictor.device})")

    record = json.loads((FIXTURE / "fixtures.json").read_text())
    rows = []
    volume = read_volume(SHARED / "data" / "ct" / "totalseg_ct.nii.gz")
    predictor.set_volume(volume, modality="CT")
    for case, entry in sorted(record["cases"].items()):
        if "task_folder" not in entry:
            continue
        reference = np.load(FIXTURE / f"case_{case}.npz")
        z = int(entry["slice_index_z"])
        x0, y0, x1, y1 = (float(v) for v in reference["box_native"][0])
        task = str(reference["task_folder"]).partition("_")[2]
        out = predictor.segment(Prompts(text=task, box=BoxPrompt((x0, y0, z), (x1, y1, z), space="ijk"))).slices[0]
        rows.append((int(reference["oracle_best_index"]), out.chosen, np.asarray(reference["dice"], float)))
    summarise("parity fixture cases (oracle index recorded by the official code)", rows)

    for volume_name, labels_name, structures, modality in REAL_SETS:
        volume = read_volume(SHARED / "data" / volume_name)
        labels = read_labelmap(SHARED / "data" / labels_name, volume).array
        predictor.set_volume(volume, modality=modality)
        rows = []
        for label, name in structures.items():
            present = [k for k in range(labels.shape[0]) if (labels[k] == label).sum() >= args.min_pixels]
            for k in present[:: args.step]:
                truth = labels[k] == label
                x0, y0, x1, y1 = (float(v) for v in box_from_label(truth))
                out = predictor.segment(Prompts(text=name, box=BoxPrompt((x0, y0, k), (x1, y1, k), space="ijk")))
                scores = np.array([dice(m, truth) for m in out.slices[0].masks])
                rows.append((int(np.argmax(scores)), out.slices[0].chosen, scores))
        summarise(f"real slices of {volume_name} ({', '.join(structures.values())}; every {args.step}th slice)",
                  rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
