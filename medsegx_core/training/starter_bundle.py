"""The prepared starter training set in one file: preprocessed cases and the frozen sentence embeddings.

Preparing reads the volumes (SimpleITK, nibabel, ...) and runs the frozen MiniLM text tower once; training from
the bundle needs neither, so the same training command runs on a machine that has only torch, numpy and MONAI
(a GPU machine, say). The file is a NumPy ``.npz`` read with ``allow_pickle=False``: arrays per case plus one JSON
record (case keys, structures as label -> name, modality, voxel counts, the vocabulary). Structure names are
resolved through the hierarchy again on loading, as ``starter_data`` does.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from ..data.atomic import atomic_output
from ..data.hierarchy import load_hierarchy
from ..errors import InputError
from .dataset import LabelledCase, Structure, resolve_label_name
from .starter_data import CASES, TrainingCase

BUNDLE_FORMAT = "medsegx-starter-training-set/1"


def save_bundle(path: Path, cases: Sequence[TrainingCase], vocabulary: Sequence[str], pooled: np.ndarray,
                overwrite: bool = True) -> Path:
    """Write the cases and the (len(vocabulary), dim) sentence embeddings atomically."""
    arrays = {"sentence_embeddings": np.asarray(pooled, dtype=np.float32)}
    record = {"format": BUNDLE_FORMAT, "vocabulary": list(vocabulary), "cases": []}
    for index, case in enumerate(cases):
        arrays[f"image_{index}"] = case.labelled.image.astype(np.float32)
        arrays[f"labels_{index}"] = case.labelled.labels.astype(np.int32)
        record["cases"].append({
            "key": case.spec.key, "source": case.labelled.source, "modality": case.spec.modality,
            "structures": [[s.label, s.term.name] for s in case.structures],
            "voxels": {str(k): int(v) for k, v in case.labelled.voxels.items()},
        })
    arrays["record"] = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8)
    with atomic_output(Path(path), overwrite=overwrite) as temp:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return Path(path)


def load_bundle(path: Path, keys: Sequence[str] = (), exclude_keys: Sequence[str] = ()
                ) -> Tuple[List[TrainingCase], List[str], np.ndarray]:
    """(cases, vocabulary, sentence embeddings); ``keys``: only these cases, ``exclude_keys``: minus these."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            record = json.loads(bytes(data["record"]).decode("utf-8"))
            if record.get("format") != BUNDLE_FORMAT:
                raise InputError(f"{path}: not a prepared starter training set ({BUNDLE_FORMAT})")
            specs = {spec.key: spec for spec in CASES}
            hierarchy = load_hierarchy()
            cases = []
            for index, entry in enumerate(record["cases"]):
                if (keys and entry["key"] not in keys) or entry["key"] in exclude_keys:
                    continue
                modality = hierarchy.resolve_modality(entry["modality"], strict=True)
                structures = [Structure(int(label), resolve_label_name(name).with_modality(modality))
                              for label, name in entry["structures"]]
                labelled = LabelledCase(data[f"image_{index}"], data[f"labels_{index}"], structures, modality,
                                        entry["source"], {int(k): v for k, v in entry["voxels"].items()})
                cases.append(TrainingCase(specs[entry["key"]], labelled))
            pooled = np.asarray(data["sentence_embeddings"], dtype=np.float32)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read the prepared training set ({exc}); prepare it again with "
                         f"'python -m medsegx_core.training.train_starter --data DIR --prepare {path}'") from None
    return cases, list(record["vocabulary"]), pooled
