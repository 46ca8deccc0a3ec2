"""Training samples of the text localiser: LiteMedSAM slice embeddings and coarse structure maps, cached on disk.

Each labelled volume of the shared data (``starter_data.CASES`` and the CHAOS patients) is read as the slice-wise
predictor reads it: reoriented to the radiological axial view, the intensity window LiteMedSAM was trained with
(CT level 40 / width 400, MR percentiles), each slice made into the model input (``litemedsam_input``) and encoded
by the frozen TinyViT. Slices are taken every ``SLICE_STEP_MM`` or so (neighbouring thin slices add little). The
target of a vocabulary structure on a slice is the share of each embedding cell (4 x 4 model pixels) it covers,
computed from the label slice with the same resize and padding as the image.

Which structures a volume teaches (``known``): those its label table names (a table's class absent from the
volume is a true negative: TotalSegmentator's 'brain' in an abdominal CT), plus negatives the field of view
guarantees: no trunk organ in a head scan, no brain in a trunk scan. A structure neither named nor ruled out is
left out of that volume's loss (the MSD spleen case says nothing about the liver).

The cache (one folder per case: embeddings.npy float16, targets.npy uint8 shares x 255, meta.json) is keyed by the
encoder's weights and the vocabulary, so a changed model or vocabulary is encoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ..data.hierarchy import resolve_term
from ..data.orientation import AxisReorientation
from ..data.readers import read_labelmap, read_volume
from ..errors import UnknownTermError
from ..inference.slice_preprocessing import litemedsam_input, litemedsam_window, longest_side_to, pad_to_square
from ..progress import CancelToken, ProgressCallback, check, report
from .domain_randomisation import label_offsets
from .starter_data import CHAOS_CASES, CASES, CaseSpec, label_names

# The structures a text prompt can find on the slice-wise path: each labelled in at least two patients of the
# shared data (several in CT and MR), so that what the localiser learns can be checked on a patient it never saw.
VOCABULARY: Tuple[str, ...] = (
    "liver", "spleen", "right kidney", "left kidney", "stomach", "pancreas", "gallbladder", "aorta",
    "inferior vena cava", "heart", "esophagus", "duodenum", "small bowel", "colon", "urinary bladder",
    "right adrenal gland", "left adrenal gland", "right lung", "left lung", "brain")
# Vocabulary entries that are the union of finer labels (the lobes of TotalSegmentator's CT labels).
MEMBERS: Dict[str, Tuple[str, ...]] = {
    "right lung": ("right upper lung lobe", "right middle lung lobe", "right lower lung lobe"),
    "left lung": ("left upper lung lobe", "left lower lung lobe"),
}
HEAD_STRUCTURES = ("brain",)
# Field of view of the cases: head scans hold no trunk organ, trunk scans no brain. In the whole-brain case every
# labelled structure (FreeSurfer's aseg: cortex, white matter, deep nuclei, ventricles) is part of the brain.
HEAD_CASES = ("mr_brain", "mr_brain_tumour")
WHOLE_BRAIN_CASES = ("mr_brain",)
SLICE_STEP_MM = 4.0
GRID = 64            # the embedding's grid
CACHE_FORMAT = 1
# Training variants of a case: "native"; "coarse" for volumes with fine pixels: each slice shrunk to
# COARSE_PIXEL_MM pixels first (area averaging), so that a fine contrast CT also teaches how a coarse, thick-slice
# scan looks once the model input has enlarged it again (the held-out CT patient has 3 mm pixels); "labels": each
# labelled structure's intensities shifted by its own offset (SynthSeg-style, ``domain_randomisation.label_offsets``,
# N(0, LABEL_SHIFT_SPREAD) of the 0..255 window), drawn once per case so that an organ keeps one brightness through
# the volume: an organ is then found by its shape and place more than by how bright it is (a kidney without
# contrast: model card). Held-out patients get only "native" (they never reach training).
VARIANTS = ("native", "coarse", "labels")
COARSE_PIXEL_MM = 3.0
LABEL_SHIFT_SPREAD = 0.2


@dataclass
class CaseSlices:
    """One case's samples: what the localiser trains on."""
    key: str
    patient: str
    modality: str
    embeddings: np.ndarray        # (n, C, G, G) float16
    targets: np.ndarray           # (n, V, G, G) uint8: share of each cell x 255
    known: np.ndarray             # (V,) bool: the structures this case teaches
    slices: List[int]             # working-grid slice indices
    spacing_mm: float             # between the slices taken


def all_cases() -> Tuple[CaseSpec, ...]:
    return tuple(CASES) + tuple(CHAOS_CASES)


def case_named(key: str) -> CaseSpec:
    for spec in all_cases():
        if spec.key == key:
            return spec
    raise KeyError(key)


def resolved_names(data_dir: Path, spec: CaseSpec) -> Dict[int, str]:
    """{label value: canonical name} of a case's label table, names the hierarchy cannot resolve left out."""
    names = {}
    for value, raw in label_names(data_dir, spec).items():
        if spec.max_label is not None and value > spec.max_label:
            continue
        try:
            names[value] = resolve_term(raw).name
        except UnknownTermError:
            continue
    return names


def structure_labels(spec: CaseSpec, names: Dict[int, str], vocabulary: Sequence[str]
                     ) -> Tuple[Dict[str, List[int]], np.ndarray]:
    """({vocabulary name: label values that make it}, known (V,) bool) of one case."""
    labels: Dict[str, List[int]] = {}
    known = np.zeros(len(vocabulary), dtype=bool)
    head_case = spec.key in HEAD_CASES
    for index, structure in enumerate(vocabulary):
        wanted = {structure, *MEMBERS.get(structure, ())}
        if structure == "brain" and spec.key in WHOLE_BRAIN_CASES:
            values = sorted(names)
        else:
            values = sorted(v for v, n in names.items() if n in wanted)
        labels[structure] = values
        # a trunk organ in a head scan, or the brain in a trunk scan, is known to be absent
        ruled_out = head_case != (structure in HEAD_STRUCTURES)
        known[index] = bool(values) or ruled_out
    return labels, known


def cell_shares(mask: np.ndarray, side: int = 256, grid: int = GRID) -> np.ndarray:
    """A slice mask (H, W) -> the share of each embedding cell it covers (grid, grid) float32, after the same
    longest-side resize and bottom/right padding as the model input."""
    image = pad_to_square(longest_side_to(mask.astype(np.float32), side), side)
    return F.adaptive_avg_pool2d(image, grid)[0, 0].numpy()


def cache_key(encoder_key: str, vocabulary: Sequence[str]) -> str:
    text = json.dumps({"encoder": encoder_key, "vocabulary": list(vocabulary), "step": SLICE_STEP_MM,
                       "format": CACHE_FORMAT, "members": MEMBERS, "whole_brain": WHOLE_BRAIN_CASES,
                       "head": HEAD_CASES, "label_shift": LABEL_SHIFT_SPREAD})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def coarse_shape(shape: Tuple[int, int], pixel_mm: float) -> Tuple[int, int]:
    """The slice size once its pixels are COARSE_PIXEL_MM wide (never larger than it is)."""
    factor = min(1.0, pixel_mm / COARSE_PIXEL_MM)
    return max(8, int(round(shape[0] * factor))), max(8, int(round(shape[1] * factor)))


def _coarse(plane: np.ndarray, shape: Tuple[int, int], labels: bool) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    if labels:
        return F.interpolate(tensor, size=shape, mode="nearest")[0, 0].numpy().astype(plane.dtype)
    return F.interpolate(tensor, size=shape, mode="area")[0, 0].numpy()


def encode_case(data_dir: Path, spec: CaseSpec, encode, vocabulary: Sequence[str], batch: int = 4,
                progress: Optional[ProgressCallback] = None, cancel: Optional[CancelToken] = None,
                variant: str = "native", step_mm: float = SLICE_STEP_MM) -> CaseSlices:
    """Read one case and encode its slices about ``step_mm`` apart (``encode``: images (B, 3, S, S) ->
    embeddings (B, C, G, G)); ``variant``: one of VARIANTS."""
    data_dir = Path(data_dir)
    image = read_volume(data_dir / spec.image)
    labelmap = read_labelmap(data_dir / spec.labels, image).array
    names = resolved_names(data_dir, spec)
    labels, known = structure_labels(spec, names, vocabulary)
    orientation = AxisReorientation.to_radiological(image.direction_ras, image.shape_ijk)
    working = orientation.array_to_working(image.array)
    working_labels = orientation.array_to_working(labelmap)
    window = litemedsam_window(image.array, spec.modality)
    spacing_k = orientation.working_spacing(image.spacing)[2]
    step = max(1, int(round(step_mm / spacing_k)))
    chosen = list(range(step // 2, working.shape[0], step))
    pixel_mm = min(orientation.working_spacing(image.spacing)[:2])
    shrunk = coarse_shape(working.shape[1:], pixel_mm) if variant == "coarse" else tuple(working.shape[1:])
    offsets = None
    if variant == "labels":
        seed = int.from_bytes(hashlib.sha256(spec.key.encode()).digest()[:4], "little")     # one draw per case
        offsets = 255.0 * label_offsets(np.unique(labelmap), np.random.default_rng(seed), LABEL_SHIFT_SPREAD)

    def plane_of(array: np.ndarray, k: int, labels: bool) -> np.ndarray:
        plane = array[k]
        return plane if shrunk == tuple(plane.shape) else _coarse(plane, shrunk, labels)

    def grey_of(k: int) -> np.ndarray:
        grey = window.apply(plane_of(working, k, False))
        if offsets is not None:
            grey = np.clip(grey + offsets[plane_of(working_labels, k, True)], 0.0, 255.0)
        return grey

    embeddings, targets = [], []
    for start in range(0, len(chosen), batch):
        check(cancel)
        report(progress, start / len(chosen), f"{spec.key}: slice {start}/{len(chosen)}")
        part = chosen[start:start + batch]
        images = torch.stack([litemedsam_input(grey_of(k)) for k in part])
        embeddings.append(encode(images).numpy().astype(np.float16))
        for k in part:
            plane = plane_of(working_labels, k, True)
            maps = np.zeros((len(vocabulary), GRID, GRID), dtype=np.uint8)
            for index, structure in enumerate(vocabulary):
                values = labels[structure]
                if values:
                    maps[index] = np.round(cell_shares(np.isin(plane, values)) * 255).astype(np.uint8)
            targets.append(maps)
    report(progress, 1.0, f"{spec.key}: encoded")
    key = spec.key if variant == "native" else f"{spec.key}@{variant}"
    return CaseSlices(key, spec.patient, spec.modality, np.concatenate(embeddings), np.stack(targets), known,
                      chosen, spacing_k * step)


def save_case(folder: Path, case: CaseSlices) -> None:
    """Write one case's samples (temporary names, renamed; meta.json last marks the folder complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (("embeddings", case.embeddings), ("targets", case.targets), ("known", case.known)):
        partial = folder / f"{name}.partial.npy"
        np.save(partial, array)
        os.replace(partial, folder / f"{name}.npy")
    meta = {"key": case.key, "patient": case.patient, "modality": case.modality, "slices": case.slices,
            "spacing_mm": case.spacing_mm}
    partial = folder / "meta.partial.json"
    partial.write_text(json.dumps(meta), encoding="utf-8")
    os.replace(partial, folder / "meta.json")


def load_case(folder: Path) -> Optional[CaseSlices]:
    """A cached case, or None when the folder is incomplete. Embeddings are memory-mapped."""
    if not (folder / "meta.json").is_file():
        return None
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    return CaseSlices(meta["key"], meta["patient"], meta["modality"],
                      np.load(folder / "embeddings.npy", mmap_mode="r"), np.load(folder / "targets.npy"),
                      np.load(folder / "known.npy"), meta["slices"], meta["spacing_mm"])


def coarse_worthy(data_dir: Path, spec: CaseSpec) -> bool:
    """Whether a case's pixels are fine enough for a "coarse" variant to differ (under 2/3 of COARSE_PIXEL_MM)."""
    import SimpleITK as sitk

    path = Path(data_dir) / spec.image
    if path.suffix == ".mgz":
        return False        # the conformed 1 mm brain: its head MR variant adds nothing the tumour MR lacks
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return min(reader.GetSpacing()) < COARSE_PIXEL_MM * 2 / 3


def cached_cases(data_dir: Path, cache_dir: Path, model, specs: Sequence[CaseSpec], vocabulary: Sequence[str],
                 backend: str = "auto", progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None, variants: Sequence[str] = ("native",),
                 held_out: Sequence[str] = ()) -> List[CaseSlices]:
    """Every case of ``specs`` in each of ``variants`` (a "coarse" one only where the pixels are fine; only
    "native" for the patients in ``held_out``), from the cache where it is complete, else encoded now and cached."""
    from ..inference.encoder_backends import encoder_key, make_image_encoder
    from ..weights.hub import medsegx_home

    folder = Path(cache_dir) / cache_key(encoder_key(model.image_encoder), vocabulary)
    jobs = [(spec, variant) for spec in specs for variant in variants
            if variant == "native" or (spec.patient not in held_out
                                       and (variant != "coarse" or coarse_worthy(data_dir, spec)))]
    cases, encode = [], None
    for index, (spec, variant) in enumerate(jobs):
        name = spec.key if variant == "native" else f"{spec.key}@{variant}"
        case = load_case(folder / name)
        if case is None:
            if encode is None:
                encode = make_image_encoder(model, backend, cache_dir=medsegx_home() / "encoders")
            case = encode_case(data_dir, spec, encode, vocabulary, cancel=cancel, variant=variant,
                               progress=lambda f, m, i=index: report(progress, (i + f) / len(jobs), m))
            save_case(folder / name, case)
            case = load_case(folder / name)
        cases.append(case)
    return cases


__all__ = ["VOCABULARY", "CaseSlices", "cached_cases", "encode_case", "cell_shares", "structure_labels",
           "all_cases", "case_named", "resolved_names"]
