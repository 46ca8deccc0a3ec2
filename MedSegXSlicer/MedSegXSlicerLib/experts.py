""""Learn from my segments": ConMoAE expert packs trained from segmentation nodes, with the engine's fine-tuning.

Main thread (:func:`prepare_cases`): every (volume node, segmentation node) pair becomes a labelmap on the
volume's world grid, one label per segment, with each segment's name resolved through the anatomy hierarchy
(or through the user's ``mapping``: segment name -> hierarchy name, or ``"NAME@PARENT"`` for a structure the
hierarchy lacks, placed under a known node). A name that resolves nowhere is an ``UnknownTermError`` listing
every such segment with suggestions, before anything runs.

Worker thread (:func:`train`): the pairs are written to a private temporary folder and read back through the
engine's own ``training.dataset.load_case`` (so training sees exactly the preprocessing the command line's
``medsegx finetune`` sees), the base model is loaded fresh (never the one inference holds), the experts are
fine-tuned (``training.finetune.finetune``: progress with loss and validation Dice, cancel between steps), and
the pack is written atomically into ``$MEDSEGX_HOME/experts``. A cancel or a failure writes no pack.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from medsegx_core.errors import InputError, UnknownTermError


@dataclass
class TrainingPair:
    volume: object                 # medsegx_core Volume (world geometry)
    labels: np.ndarray             # (k, j, i) uint16, 0 = background
    names: Dict[int, str]          # label -> hierarchy name or NAME@PARENT
    source: str


@dataclass
class TrainingOutcome:
    pack: Path
    structures: List[str]
    initial_val_dice: Optional[float]
    best_val_dice: Optional[float]
    history: List[dict] = field(default_factory=list)


def resolve_segment_name(name: str, mapping: Optional[Mapping[str, str]] = None) -> str:
    """The name training will use for a segment (checked now): the mapping's, else the segment's own."""
    from medsegx_core.training.dataset import resolve_label_name

    chosen = (mapping or {}).get(name, name)
    resolve_label_name(chosen)   # raises UnknownTermError (or InputError for a bad NAME@PARENT)
    return chosen


def unresolved_segment_names(segmentation_nodes: Sequence, mapping: Optional[Mapping[str, str]] = None) -> Dict:
    """Segment name -> suggestions, for the names the hierarchy does not know (the widget asks for these)."""
    missing: Dict[str, List[str]] = {}
    for node in segmentation_nodes:
        segmentation = node.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            name = segmentation.GetNthSegment(index).GetName()
            try:
                resolve_segment_name(name, mapping)
            except UnknownTermError as exc:
                missing[name] = list(getattr(exc, "suggestions", []) or [])
    return missing


def prepare_pair(volume_node, segmentation_node, mapping: Optional[Mapping[str, str]] = None) -> TrainingPair:
    """One volume and its segments as a labelmap on the volume's grid (main thread: reads MRML)."""
    from . import mrml_conversion, segment_writer

    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("choose the segmentation whose segments the experts should learn")
    mrml_conversion.check_volume_node(volume_node)
    volume = mrml_conversion.volume_from_node(volume_node)
    labels = np.zeros(volume.array.shape, np.uint16)
    names: Dict[int, str] = {}
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        name = resolve_segment_name(segmentation.GetSegment(segment_id).GetName(), mapping)
        mask = segment_writer.read_segment_mask(segmentation_node, segment_id, volume.ijk_to_ras,
                                                volume.array.shape)
        if mask.any():
            label = len(names) + 1
            labels[mask > 0] = label   # overlaps: the later segment wins, as in Slicer's labelmap export
            names[label] = name
    if not names:
        raise InputError(f"segmentation '{segmentation_node.GetName()}' has no segment with voxels inside volume "
                         f"'{volume_node.GetName()}': draw or segment the structures first")
    return TrainingPair(volume, labels, names, volume_node.GetName())


def pack_path(name: str, overwrite: bool = False) -> Path:
    """Where a pack called ``name`` goes in the cache (a free name unless ``overwrite``)."""
    from .models import experts_dir

    stem = re.sub(r"[^\w.-]+", "_", name.strip()).strip("._") or "experts"
    path = experts_dir() / f"{stem}.safetensors"
    counter = 2
    while path.exists() and not overwrite:
        path = experts_dir() / f"{stem}_{counter}.safetensors"
        counter += 1
    return path


def train(pairs: Sequence[TrainingPair], weights, destination: Path, settings, load_model, progress=None,
          cancel=None, slices: bool = False) -> TrainingOutcome:
    """Fine-tune experts on ``pairs`` on top of ``weights`` and write the pack (worker thread). ``slices``: the
    base is slice-wise (LiteMedSAM): cases read and trained slice by slice, as ``medsegx finetune --base
    litemedsam`` does."""
    import SimpleITK as sitk

    from medsegx_core.progress import check, report, scaled
    from medsegx_core.training.dataset import load_case
    from medsegx_core.training.finetune import base_sha256, finetune, write_pack
    from medsegx_core.training.slice_finetune import finetune_slices
    from medsegx_core.training.slice_samples import load_slice_case

    report(progress, 0.0, "preparing the training volumes")
    with tempfile.TemporaryDirectory(prefix="medsegx-train-") as folder:
        cases = []
        for n, pair in enumerate(pairs):
            image, labels, names = (Path(folder) / f"{n}_{kind}" for kind in ("image.nii.gz", "labels.nii.gz",
                                                                               "names.json"))
            sitk.WriteImage(pair.volume.to_sitk(), str(image))
            sitk.WriteImage(pair.volume.with_array(pair.labels).to_sitk(), str(labels))
            names.write_text(json.dumps({str(k): v for k, v in pair.names.items()}), encoding="utf-8")
            read = load_slice_case if slices else load_case
            cases.append(read(image, labels, str(names), modality=pair.volume.modality))
            check(cancel)
    report(progress, 0.05, "loading the base model")
    model = load_model(weights)
    base = base_sha256(model)
    check(cancel)
    result = (finetune_slices if slices else finetune)(model, cases, settings, progress=scaled(progress, 0.1, 0.97),
                                                       cancel=cancel)
    check(cancel)
    report(progress, 0.98, f"writing {destination.name}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    write_pack(destination, model, settings, base, cases, result)
    structures = sorted({s.name for case in cases for s in case.structures})
    return TrainingOutcome(destination, structures, result.initial_val_dice, result.best_val_dice, result.history)
