"""Evaluation of the starter model as a user meets it: the real Predictor on a whole volume, prompts from the
reference labels, Dice on the volume's own grid.

Prompts a user would give for a structure (``evaluation_prompts``):
* box: the structure's tight voxel bounding box (as if drawn exactly around it);
* point: one positive click at the structure's most interior voxel (largest distance to its surface, in mm);
* text: the structure's name.

Whether a scored structure was seen in training is read from the weights' own training record (config.json
"source": its cases and held-out structures), so the benchmark and the model card cannot disagree with the
training command. Every structure is also scored with the trivial baseline a box prompt must beat: the box
itself, filled in. One row is no held-out data but a probe of scan coverage:
20 slices of the training CT (as many as the held-out abdominal MR has), given to the model as a volume of their
own, so the model sees the same organs with the field of view of a scan that covers only part of the abdomen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..data.hierarchy import resolve_term
from ..data.metrics import dice
from ..data.readers import read_labelmap, read_volume
from ..data.volume import Volume
from ..progress import CancelToken, ProgressCallback, check, report
from ..prompts import BoxPrompt, PointPrompt, Prompts
from .starter_data import CASES, CHAOS_CASES, CHAOS_EVALUATION_PATIENTS, CaseSpec, label_names

EVALUATION_KINDS = ("box", "point", "text")
# The trivial baseline a box prompt must beat: the user's box itself, filled in (scored like a prompt kind).
FILLED_BOX = "filled box"

# Designs (how a scored structure relates to the model's training data).
TRAINED = "trained"
HELD_OUT_PATIENT = "held-out patient"
HELD_OUT_STRUCTURE = "held-out structure"
UNKNOWN_DESIGN = "unknown (no training record)"

ABDOMINAL_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")


@dataclass(frozen=True)
class EvaluationVolume:
    """A labelled volume to evaluate on (a training case spec of ``starter_data``: its image, labels, names,
    patient and modality) and which of its structures to score. Whether a structure was seen in training is not
    written here but read from the weights' own record (``design``)."""

    key: str
    case: str                    # the key of a CaseSpec in starter_data.CASES or CHAOS_CASES
    structures: Tuple[str, ...]  # raw label names to score
    slices: Optional[Tuple[int, int]] = None    # only slices first <= k < stop, as a volume of their own
    group: str = "base"          # "base": the base model's evaluation; "chaos": the few-shot MR domain

    @property
    def spec(self) -> CaseSpec:
        return CASE_SPECS[self.case]

    @property
    def patient(self) -> str:
        return self.spec.patient

    @property
    def modality(self) -> str:   # routes the experts (as the file or the user would say)
        return self.spec.modality


CASE_SPECS = {spec.key: spec for spec in CASES + CHAOS_CASES}
EVALUATION_VOLUMES = (
    EvaluationVolume("ct-patient-1 abdomen", "ct_abdomen",
                     ABDOMINAL_ORGANS + ("stomach", "gallbladder", "urinary_bladder", "duodenum")),
    EvaluationVolume("ct-patient-1 20-slice slab", "ct_abdomen", ABDOMINAL_ORGANS, slices=(77, 97)),
    EvaluationVolume("ct-patient-2 chest", "ct_chest_aorta", ("aorta", "vertebrae_T12")),
    EvaluationVolume("ct-patient-2 heart", "ct_chest_heart", ("heart",)),
    EvaluationVolume("ct-patient-3 thorax-abdomen", "ct_thorax_abdomen", ABDOMINAL_ORGANS + ("stomach", "aorta")),
    EvaluationVolume("ct-patient-4 spleen", "ct_spleen_msd", ("spleen",)),
    EvaluationVolume("mr-patient-1 abdomen", "mr_abdomen", ABDOMINAL_ORGANS),
) + tuple(EvaluationVolume(f"chaos-{nn} T2-SPIR", f"mr_chaos_{nn}", ABDOMINAL_ORGANS, group="chaos")
          for nn in CHAOS_EVALUATION_PATIENTS)
EVALUATION_GROUPS = tuple(sorted({spec.group for spec in EVALUATION_VOLUMES}))


def trained_patients(source: Optional[dict]) -> Optional[set]:
    """The patients whose volumes the weights were trained on, from the training record in their config.json
    (``source``: train_starter's; each stage continues the previous one and re-uses its cases), or None."""
    if not source or "cases" not in source:
        return None
    return {CASE_SPECS[key].patient for key in source["cases"] if key in CASE_SPECS}


def design(spec: EvaluationVolume, raw_name: str, source: Optional[dict]) -> str:
    """How the structure ``raw_name`` of ``spec`` relates to the training data recorded in ``source``."""
    patients = trained_patients(source)
    if patients is None:
        return UNKNOWN_DESIGN
    if spec.patient not in patients:
        return HELD_OUT_PATIENT
    if resolve_term(raw_name).name in set(source.get("held_out_structures", ())):
        return HELD_OUT_STRUCTURE
    return TRAINED + (", partial coverage" if spec.slices else "")


@dataclass
class DiceRow:
    volume: str
    structure: str
    design: str
    kind: str
    dice: float
    seconds: float
    modality: str = "CT"


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
    raise ValueError(f"unknown prompt kind {kind!r}; choose from {', '.join(EVALUATION_KINDS)}")


def read_names(data_dir: Path, spec: CaseSpec) -> Dict[str, int]:
    """raw name -> label value of a case."""
    return {name: value for value, name in label_names(Path(data_dir), spec).items()}


def filled_box(mask_kji: np.ndarray) -> np.ndarray:
    """The structure's tight voxel box, filled in: what a box prompt gives with no model at all."""
    where = np.argwhere(mask_kji)
    lo, hi = where.min(0), where.max(0) + 1
    box = np.zeros(mask_kji.shape, dtype=bool)
    box[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return box


def select_volumes(groups: Optional[Sequence[str]] = None,
                   keys: Optional[Sequence[str]] = None) -> List[EvaluationVolume]:
    """The evaluation volumes of the named groups (default: all) and, if given, only those whose key contains
    one of ``keys``."""
    chosen = [spec for spec in EVALUATION_VOLUMES if not groups or spec.group in groups]
    return [spec for spec in chosen if not keys or any(key in spec.key for key in keys)]


def evaluate(predictor, data_dir: Path, volumes: Iterable[EvaluationVolume] = EVALUATION_VOLUMES,
             kinds: Sequence[str] = EVALUATION_KINDS, structures: Optional[Sequence[str]] = None,
             source: Optional[dict] = None, baseline: bool = True,
             progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None) -> List[DiceRow]:
    """Dice per (volume, structure, prompt kind) with ``predictor`` (a ``Predictor`` around the model), plus the
    filled-box baseline row when ``baseline``. ``source``: the weights' training record (config.json "source"),
    which says for each row whether its patient and structure were seen in training."""
    import time

    data_dir = Path(data_dir)
    volumes = list(volumes)
    rows: List[DiceRow] = []
    for number, spec in enumerate(volumes):
        check(cancel)
        wanted = [raw for raw in spec.structures
                  if not structures or raw in structures or resolve_term(raw).name in structures]
        if not wanted:
            continue
        report(progress, number / len(volumes), f"evaluating {spec.key}")
        volume = read_volume(data_dir / spec.spec.image)
        labels = read_labelmap(data_dir / spec.spec.labels, volume).array
        if spec.slices is not None:
            volume, labels = volume.slab(*spec.slices), labels[spec.slices[0]:spec.slices[1]]
        values = read_names(data_dir, spec.spec)
        predictor.set_volume(volume, modality=spec.modality)
        for raw in wanted:
            truth = labels == values[raw]
            if not truth.any():
                continue
            name, how = resolve_term(raw).name, design(spec, raw, source)
            if baseline:
                rows.append(DiceRow(spec.key, name, how, FILLED_BOX, dice(filled_box(truth), truth), 0.0,
                                    spec.modality))
            for kind in kinds:
                check(cancel)
                start = time.perf_counter()
                mask = predictor.segment(evaluation_prompts(volume, truth, name, kind)).mask
                rows.append(DiceRow(spec.key, name, how, kind, dice(mask, truth), time.perf_counter() - start,
                                    spec.modality))
    report(progress, 1.0, "evaluated")
    return rows


def summary_table(rows: Sequence[DiceRow]) -> str:
    """Mean Dice per (modality, design, structure) and prompt kind, and how often a box prompt beat the filled
    box."""
    kinds = [k for k in (FILLED_BOX,) + EVALUATION_KINDS if any(r.kind == k for r in rows)]
    groups: Dict[tuple, Dict[str, List[float]]] = {}
    for row in rows:
        groups.setdefault((row.modality, row.design, row.structure), {}).setdefault(row.kind, []).append(row.dice)
    lines = ["| modality | held out as | structure | volumes | " + " | ".join(f"mean Dice ({k})" for k in kinds)
             + " | box beats filled box |", "|---|---|---|---|" + "---|" * (len(kinds) + 1)]
    for (modality, how, name), by_kind in sorted(groups.items()):
        cells = " | ".join(f"{np.mean(by_kind[k]):.3f}" if k in by_kind else "-" for k in kinds)
        beats = "-"
        if "box" in by_kind and FILLED_BOX in by_kind:
            beats = f"{sum(b > f for b, f in zip(by_kind['box'], by_kind[FILLED_BOX]))}/{len(by_kind['box'])}"
        lines.append(f"| {modality} | {how} | {name} | {len(next(iter(by_kind.values())))} | {cells} | {beats} |")
    return "\n".join(lines)


def dice_table(rows: Sequence[DiceRow]) -> str:
    """A Markdown table: one line per (volume, structure), one column per prompt kind."""
    kinds = [k for k in (FILLED_BOX,) + EVALUATION_KINDS if any(r.kind == k for r in rows)]
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
