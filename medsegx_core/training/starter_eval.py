"""Evaluation of the starter model as a user meets it: the real Predictor on a whole volume, prompts from the
reference labels, Dice on the volume's own grid.

Prompts a user would give for a structure (``evaluation_prompts``):
* box: the structure's tight voxel bounding box (as if drawn exactly around it);
* point: one positive click at the structure's most interior voxel (largest distance to its surface, in mm);
* text: the structure's name.

The held-out design of the shipped model (``HELD_OUT``) is defined here once, so the training command, the
benchmark and the model card cannot disagree about it. One row is no held-out data but a probe of scan coverage:
20 slices of the training CT (as many as the held-out abdominal MR has), given to the model as a volume of their
own, so the model sees the same organs with the field of view of a scan that covers only part of the abdomen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..data.hierarchy import resolve_term
from ..data.readers import read_labelmap, read_volume
from ..data.volume import Volume
from ..progress import CancelToken, ProgressCallback, check, report
from ..prompts import BoxPrompt, PointPrompt, Prompts
from .starter_data import CLASS_MAP_FILE

PROMPT_KINDS = ("box", "point", "text")

# The patients and structures the shipped starter model never saw in training (train_starter.py arguments).
HELD_OUT_PATIENTS = ("ct-patient-2", "mr-patient-1")
HELD_OUT_STRUCTURES = ("gallbladder", "urinary bladder", "duodenum")


@dataclass(frozen=True)
class EvaluationVolume:
    """A labelled volume to evaluate on and which of its structures to score, with how each was held out."""

    key: str
    image: str                  # relative to the data folder
    labels: str
    names: str                  # JSON beside the labels, or "class_map:<key>"
    structures: Dict[str, str]  # raw label name -> design ("held-out patient", "held-out structure", "trained")
    slices: Optional[Tuple[int, int]] = None    # only slices first <= k < stop, as a volume of their own


EVALUATION_VOLUMES = (
    EvaluationVolume("ct-patient-1 abdomen", "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz",
                     "class_map:total",
                     {"liver": "trained", "spleen": "trained", "kidney_left": "trained", "kidney_right": "trained",
                      "gallbladder": "held-out structure", "urinary_bladder": "held-out structure",
                      "duodenum": "held-out structure"}),
    EvaluationVolume("ct-patient-1 20-slice slab", "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz",
                     "class_map:total",
                     {"liver": "trained, partial coverage", "spleen": "trained, partial coverage",
                      "kidney_left": "trained, partial coverage", "kidney_right": "trained, partial coverage"},
                     slices=(77, 97)),
    EvaluationVolume("ct-patient-2 chest", "ct/chest_ct_aorta_crop.nii.gz", "ct/chest_ct_aorta_crop_labels.nii.gz",
                     "ct/chest_ct_aorta_crop_labels.json",
                     {"aorta": "held-out patient", "vertebrae_T12": "held-out patient"}),
    EvaluationVolume("ct-patient-2 heart", "ct/chest_ct_pulmonary_crop.nii.gz",
                     "ct/chest_ct_pulmonary_crop_labels.nii.gz", "ct/chest_ct_pulmonary_crop_labels.json",
                     {"heart": "held-out patient"}),
    EvaluationVolume("mr-patient-1 abdomen", "mri/totalseg_mr.nii.gz", "mri/totalseg_mr_labels.nii.gz",
                     "class_map:total_mr",
                     {"liver": "held-out patient", "spleen": "held-out patient", "kidney_left": "held-out patient",
                      "kidney_right": "held-out patient"}),
)


@dataclass
class DiceRow:
    volume: str
    structure: str
    design: str
    kind: str
    dice: float
    seconds: float


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & truth).sum()) / total


def interior_voxel_ijk(mask_kji: np.ndarray, spacing_ijk: Sequence[float]) -> np.ndarray:
    """(i, j, k) of the voxel farthest (in mm) from the structure's surface: where a user would click."""
    import SimpleITK as sitk

    where = np.argwhere(mask_kji)
    lo, hi = where.min(0), where.max(0) + 1
    box = np.pad(mask_kji[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.uint8), 1)
    image = sitk.GetImageFromArray(box)
    image.SetSpacing(tuple(float(s) for s in spacing_ijk))
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True))[1:-1, 1:-1, 1:-1]
    kji = np.asarray(np.unravel_index(int(np.argmax(distance)), distance.shape)) + lo
    return kji[::-1].astype(np.float64)


def evaluation_prompts(volume: Volume, mask_kji: np.ndarray, name: str, kind: str) -> Prompts:
    """The prompt a user would give for the structure ``mask_kji`` of ``volume`` (see the module docstring)."""
    if kind == "text":
        return Prompts(text=name)
    if kind == "box":
        where = np.argwhere(mask_kji)
        lo, hi = where.min(0)[::-1], where.max(0)[::-1]
        return Prompts(box=BoxPrompt(tuple(float(v) for v in lo), tuple(float(v) for v in hi), space="ijk"))
    if kind == "point":
        point = interior_voxel_ijk(mask_kji, volume.spacing)
        return Prompts(points=(PointPrompt(tuple(float(v) for v in point), positive=True, space="ijk"),))
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {', '.join(PROMPT_KINDS)}")


def read_names(data_dir: Path, spec: str) -> Dict[str, int]:
    """raw name -> label value for an evaluation volume."""
    if spec.startswith("class_map:"):
        table = json.loads((data_dir / CLASS_MAP_FILE).read_text(encoding="utf-8"))[spec.split(":", 1)[1]]
    else:
        table = json.loads((data_dir / spec).read_text(encoding="utf-8"))
    return {name: int(value) for value, name in table.items()}


def evaluate(predictor, data_dir: Path, volumes: Iterable[EvaluationVolume] = EVALUATION_VOLUMES,
             kinds: Sequence[str] = PROMPT_KINDS, structures: Optional[Sequence[str]] = None,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> List[DiceRow]:
    """Dice per (volume, structure, prompt kind) with ``predictor`` (a ``Predictor`` around the model)."""
    import time

    data_dir = Path(data_dir)
    volumes = list(volumes)
    rows: List[DiceRow] = []
    for number, spec in enumerate(volumes):
        check(cancel)
        wanted = {raw: design for raw, design in spec.structures.items()
                  if not structures or raw in structures or resolve_term(raw).name in structures}
        if not wanted:
            continue
        report(progress, number / len(volumes), f"evaluating {spec.key}")
        volume = read_volume(data_dir / spec.image)
        labels = read_labelmap(data_dir / spec.labels, volume).array
        if spec.slices is not None:
            volume, labels = volume.slab(*spec.slices), labels[spec.slices[0]:spec.slices[1]]
        values = read_names(data_dir, spec.names)
        predictor.set_volume(volume)
        for raw, design in wanted.items():
            truth = labels == values[raw]
            name = resolve_term(raw).name
            for kind in kinds:
                check(cancel)
                start = time.perf_counter()
                mask = predictor.segment(evaluation_prompts(volume, truth, name, kind)).mask
                rows.append(DiceRow(spec.key, name, design, kind, dice(mask, truth), time.perf_counter() - start))
    report(progress, 1.0, "evaluated")
    return rows


def dice_table(rows: Sequence[DiceRow]) -> str:
    """A Markdown table: one line per (volume, structure), one column per prompt kind."""
    kinds = [k for k in PROMPT_KINDS if any(r.kind == k for r in rows)]
    lines = ["| volume | structure | held out as | " + " | ".join(f"Dice ({k})" for k in kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    seen: Dict[tuple, Dict[str, float]] = {}
    designs: Dict[tuple, str] = {}
    for row in rows:
        seen.setdefault((row.volume, row.structure), {})[row.kind] = row.dice
        designs[(row.volume, row.structure)] = row.design
    for key, by_kind in seen.items():
        cells = " | ".join(f"{by_kind[k]:.3f}" if k in by_kind else "-" for k in kinds)
        lines.append(f"| {key[0]} | {key[1]} | {designs[key]} | {cells} |")
    return "\n".join(lines)
