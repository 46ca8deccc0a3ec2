"""The real volumes the bundled starter model learns from, preprocessed exactly as inference feeds the model.

Each case is one image + labelmap from ``../shared/data`` (see its README), with the names of its labels. Loading
runs the inference preprocessing itself (``inference.preprocessing.preprocess``, canonical profile: RAS+
reorientation, foreground normalisation, min-max, foreground crop), and puts the labelmap through the same
reorientation and crop, so a training sample is, voxel for voxel, what the predictor would show the model.

Label names are resolved through the hierarchy (``resolve_term``) to the canonical names the predictor puts in
the text template at inference ("kidney_left" -> "left kidney"), so text prompts match between training and use.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..data.hierarchy import resolve_term
from ..errors import InputError, UnknownTermError
from ..progress import CancelToken, ProgressCallback, check, report
from .dataset import LabelledCase, Structure
from .dataset import load_case as load_labelled_case

# FreeSurfer's aparc+aseg also holds ~70 cortical parcels (labels >= 1000); the starter model learns only the
# whole-brain (aseg) structures below this value.
FREESURFER_PARCEL_START = 1000
# Structures smaller than this (voxels in the stored grid) are too small to learn at the starter's resolution.
MIN_STRUCTURE_VOXELS = 200


@dataclass(frozen=True)
class CaseSpec:
    """Where one training case lives under the data folder and how its labels are named."""

    key: str                    # short unique name, e.g. "ct_abdomen"
    patient: str                # cases of the same patient share this (held-out designs split on it)
    image: str                  # path relative to the data folder
    labels: str
    names: str                  # a JSON {value: name} beside the labels, or "class_map:<key>" in the shared map
    modality: str               # "CT" or "MR"
    weight: float = 1.0         # relative sampling frequency
    max_label: Optional[int] = None


# The cases of ../shared/data. totalseg_ct_small is the same patient and slices as totalseg_ct, so it is left out.
CASES: Tuple[CaseSpec, ...] = (
    CaseSpec("ct_abdomen", "ct-patient-1", "ct/totalseg_ct.nii.gz", "ct/totalseg_ct_labels.nii.gz",
             "class_map:total", "CT", weight=4.0),
    CaseSpec("ct_chest_aorta", "ct-patient-2", "ct/chest_ct_aorta_crop.nii.gz",
             "ct/chest_ct_aorta_crop_labels.nii.gz", "ct/chest_ct_aorta_crop_labels.json", "CT", weight=1.0),
    CaseSpec("ct_chest_heart", "ct-patient-2", "ct/chest_ct_pulmonary_crop.nii.gz",
             "ct/chest_ct_pulmonary_crop_labels.nii.gz", "ct/chest_ct_pulmonary_crop_labels.json", "CT", weight=0.7),
    # A clinical contrast CT at 0.7 mm in-plane (chest and upper abdomen) and a portal-venous abdominal CT at
    # 7.5 mm slices: other scanners, phases, fields of view and slice thicknesses than patient 1's.
    CaseSpec("ct_thorax_abdomen", "ct-patient-3", "ct/thorax_abdomen_ct.nii.gz",
             "ct/thorax_abdomen_ct_labels.nii.gz", "ct/thorax_abdomen_ct_labels.json", "CT", weight=4.0),
    CaseSpec("ct_spleen_msd", "ct-patient-4", "ct/msd_spleen_8_ct.nii.gz", "ct/msd_spleen_8_ct_labels.nii.gz",
             "ct/msd_spleen_8_ct_labels.json", "CT", weight=1.0),
    CaseSpec("mr_abdomen", "mr-patient-1", "mri/totalseg_mr.nii.gz", "mri/totalseg_mr_labels.nii.gz",
             "class_map:total_mr", "MR", weight=2.0),
    CaseSpec("mr_brain", "mr-patient-2", "mri/brain_t1.mgz", "mri/brain_t1_aparc_aseg.mgz",
             "mri/brain_t1_aparc_aseg_labels.json", "MR", weight=1.3, max_label=FREESURFER_PARCEL_START - 1),
    CaseSpec("mr_brain_tumour", "mr-patient-3", "mri/brain_tumor_t1.nrrd", "mri/brain_tumor_t1_label.nrrd",
             "inline:brain tumor", "MR", weight=0.7),
)
CLASS_MAP_FILE = "totalsegmentator_class_map.json"

# CHAOS abdominal T2-SPIR MR patients: the new domain for ConMoAE few-shot adaptation, never in the base model.
# Experts are fine-tuned on k of CHAOS_ADAPTATION_PATIENTS and evaluated on CHAOS_EVALUATION_PATIENTS.
CHAOS_ADAPTATION_PATIENTS = ("01", "02", "03", "05", "08")
CHAOS_EVALUATION_PATIENTS = ("10", "13", "15", "19", "20")
CHAOS_CASES: Tuple[CaseSpec, ...] = tuple(
    CaseSpec(f"mr_chaos_{nn}", f"chaos-{nn}", f"mri/chaos_t2spir/chaos_t2_{nn}_mr.nii.gz",
             f"mri/chaos_t2spir/chaos_t2_{nn}_label.nii.gz", "mri/chaos_t2spir/labels.json", "MR")
    for nn in CHAOS_ADAPTATION_PATIENTS + CHAOS_EVALUATION_PATIENTS)


@dataclass
class TrainingCase:
    """One preprocessed case (the fine-tuning ``LabelledCase``: crop + labels on one grid) and its spec."""

    spec: CaseSpec
    labelled: LabelledCase

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def structures(self) -> List[Structure]:
        return self.labelled.structures


def case_specs(keys: Optional[Sequence[str]] = None, exclude_patients: Sequence[str] = ()) -> List[CaseSpec]:
    """The cases to use: all, or those named by ``keys``, minus any case of an excluded patient."""
    known = {spec.key: spec for spec in CASES}
    if keys:
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise InputError(f"unknown training case(s) {', '.join(unknown)}; known cases: {', '.join(known)}")
        chosen = [known[k] for k in keys]
    else:
        chosen = list(CASES)
    patients = {spec.patient for spec in CASES}
    unknown_patients = [p for p in exclude_patients if p not in patients]
    if unknown_patients:
        raise InputError(f"unknown patient(s) {', '.join(unknown_patients)}; known: {', '.join(sorted(patients))}")
    return [spec for spec in chosen if spec.patient not in set(exclude_patients)]


def label_names(data_dir: Path, spec: CaseSpec) -> Dict[int, str]:
    """{label value: raw name} for a case, from its JSON, the shared TotalSegmentator map or inline."""
    if spec.names.startswith("inline:"):
        return {1: spec.names.split(":", 1)[1]}
    if spec.names.startswith("class_map:"):
        path, key = data_dir / CLASS_MAP_FILE, spec.names.split(":", 1)[1]
    else:
        path, key = data_dir / spec.names, None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the label names ({exc}); the training data folder is incomplete")
    if key is not None:
        table = table[key]
    return {int(value): name for value, name in table.items() if int(value) > 0}


def load_case(data_dir: Path, spec: CaseSpec) -> TrainingCase:
    """Read and preprocess one case with the fine-tuning loader (inference's preprocessing, labels through the
    same reorientation and crop), keeping the structures the hierarchy can name that are big enough to learn."""
    data_dir = Path(data_dir)
    names = {}
    for value, raw in label_names(data_dir, spec).items():
        if spec.max_label is not None and value > spec.max_label:
            continue
        try:
            resolve_term(raw)
        except UnknownTermError:
            continue  # a label no text prompt could ask for ("Unknown"): it stays background
        names[value] = raw
    # The names go to the loader as a JSON file (an inline "1=a,2=b" list this long trips its path check).
    with tempfile.TemporaryDirectory(prefix="medsegx-starter-") as folder:
        names_file = Path(folder) / "names.json"
        names_file.write_text(json.dumps({str(v): n for v, n in sorted(names.items())}), encoding="utf-8")
        labelled = load_labelled_case(data_dir / spec.image, data_dir / spec.labels, str(names_file),
                                      modality=spec.modality)
    labelled.structures = [s for s in labelled.structures if labelled.voxels[s.label] >= MIN_STRUCTURE_VOXELS]
    return TrainingCase(spec, labelled)


def load_cases(data_dir: Path, specs: Sequence[CaseSpec], progress: Optional[ProgressCallback] = None,
               cancel: Optional[CancelToken] = None) -> List[TrainingCase]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"training data folder {data_dir}: not found; pass --data pointing at the shared data "
                         f"folder (the one holding ct/ and mri/)")
    cases = []
    for index, spec in enumerate(specs):
        check(cancel)
        report(progress, index / max(len(specs), 1), f"loading {spec.key}")
        cases.append(load_case(data_dir, spec))
    report(progress, 1.0, "training data loaded")
    return cases


def structure_vocabulary(cases: Sequence[TrainingCase]) -> List[str]:
    """All canonical structure names of the cases, sorted (the rows of the text-embedding table)."""
    return sorted({s.name for case in cases for s in case.structures})
