"""Labelled volumes for fine-tuning: an image, its labels, and each structure resolved through the hierarchy.

Labels are a labelmap on the image's grid (names from ``--names``: a JSON map, a colour table or ``1=liver,...``)
or a Slicer ``.seg.nrrd`` (names from the file). Each volume goes through inference's own preprocessing
(``inference.preprocessing.preprocess``) so that training sees exactly what inference feeds the model; the labels
follow the same reorientation and foreground crop.

A name the hierarchy does not know is refused (with suggestions) unless it is written ``NAME@PARENT``: a new
structure under a known node, trained with its ancestors' context and the unknown task row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from ..data.hierarchy import Modality, ResolvedTerm, load_hierarchy
from ..data.modality import routing_modality
from ..data.readers import read_labelmap, read_volume
from ..data.segments import read_label_names
from ..data.validation import check_image
from ..data.volume import Volume
from ..errors import GeometryError, InputError
from ..inference.preprocessing import preprocess

PathLike = Union[str, Path]


@dataclass
class Structure:
    label: int                   # value in the case's labelmap
    term: ResolvedTerm           # name, context (modality filled in)

    @property
    def name(self) -> str:
        return self.term.name


@dataclass
class LabelledCase:
    image: np.ndarray            # (d, h, w) float32 in [0, 1]: the preprocessed foreground crop
    labels: np.ndarray           # (d, h, w) integer labels on the same grid
    structures: List[Structure]
    modality: Modality
    source: str
    voxels: Dict[int, int] = field(default_factory=dict)   # label -> voxel count in the crop

    def mask(self, structure: Structure) -> np.ndarray:
        return self.labels == structure.label


def resolve_label_name(name: str) -> ResolvedTerm:
    """'liver' -> the hierarchy node; 'my lesion@liver' -> a new leaf under the liver."""
    hierarchy = load_hierarchy()
    if "@" in name:
        new, _, parent = name.partition("@")
        return hierarchy.new_leaf(new.strip(), parent.strip())
    return hierarchy.resolve(name)


def read_labels(label_path: PathLike, image: Volume, names_spec: Optional[str]) -> tuple[np.ndarray, Dict[int, str]]:
    """(labelmap (k, j, i) on the image grid, label -> name)."""
    label_path = Path(label_path)
    if label_path.name.lower().endswith(".seg.nrrd"):
        return _read_seg_nrrd(label_path, image)
    labelmap = read_labelmap(label_path, image).array
    if not names_spec:
        raise InputError(f"{label_path}: a labelmap needs structure names: pass --names (a JSON map such as "
                         f"{{\"1\": \"liver\"}}, a colour table, or '1=liver,2=spleen')")
    names, _ = read_label_names(names_spec)
    return labelmap, names


def _read_seg_nrrd(path: Path, image: Volume) -> tuple[np.ndarray, Dict[int, str]]:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio raises plain exceptions for unreadable files
        raise InputError(f"{path}: cannot be read as a Slicer segmentation ({exc})") from None
    voxels = np.asarray(segmentation["voxels"])
    if voxels.ndim == 4:
        raise InputError(f"{path}: overlapping segments (several layers) are not supported for fine-tuning; "
                         f"export a labelmap with one label per structure")
    labelmap = np.ascontiguousarray(voxels.transpose(2, 1, 0))       # slicerio (i, j, k) -> (k, j, i)
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=np.float64)
    if labelmap.shape != image.array.shape or not np.allclose(ijk_to_lps, image.ijk_to_lps, atol=1e-3):
        raise GeometryError(f"segmentation {path} is not on the grid of {image.source}: export it with the image "
                            f"as reference geometry (Slicer: Export to files, reference volume)")
    names = {int(s["labelValue"]): s["name"] for s in segmentation["segments"]}
    return labelmap, names


def read_labelled_volume(image_path: PathLike, label_path: PathLike, names_spec: Optional[str] = None,
                         only: Optional[Sequence[str]] = None, modality: Optional[str] = None):
    """(image, labelmap, structures present, routing modality) of one labelled volume, read and checked as every
    training entry point reads them (3D and slice-wise). ``only``: just these structures (names)."""
    image = check_image(read_volume(image_path))   # the rule every entry point applies to images
    labelmap, names = read_labels(label_path, image, names_spec)
    hierarchy = load_hierarchy()
    chosen_modality = routing_modality(image, modality)   # the rule the predictors route by
    wanted = {hierarchy.resolve(n).node for n in only} if only else None
    present = {int(v) for v in np.unique(labelmap) if v != 0}
    structures = []
    for label, name in sorted(names.items()):
        if label not in present:
            continue
        term = resolve_label_name(name).with_modality(chosen_modality)
        if wanted is None or term.node in wanted:
            structures.append(Structure(label, term))
    if not structures:
        raise InputError(f"{label_path}: none of the named structures ({', '.join(sorted(names.values()))}) is "
                         f"present" + (f" among {', '.join(only)}" if only else ""))
    return image, labelmap, structures, chosen_modality


def load_case(image_path: PathLike, label_path: PathLike, names_spec: Optional[str] = None,
              only: Optional[Sequence[str]] = None, modality: Optional[str] = None,
              profile: str = "canonical") -> LabelledCase:
    """Read, resolve and preprocess one labelled volume. ``only``: train just these structures (names)."""
    image, labelmap, structures, chosen_modality = read_labelled_volume(image_path, label_path, names_spec, only,
                                                                        modality)
    prepared = preprocess(image.array, image.direction_ras, profile=profile, name=str(image_path))
    labels = np.ascontiguousarray(prepared.orientation.array_to_working(labelmap)[prepared.crop_slices])
    counts = {s.label: int((labels == s.label).sum()) for s in structures}
    return LabelledCase(np.ascontiguousarray(prepared.cropped, dtype=np.float32), labels, structures,
                        chosen_modality, str(image_path), counts)
