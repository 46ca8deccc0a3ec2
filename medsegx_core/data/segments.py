"""Named segments, the unit every output writer takes (the engine and the Slicer module produce these).

A segment is either its own mask or one label of a shared labelmap. The second form lets a 188-label FreeSurfer
labelmap become 188 segments without 188 full-size masks in memory, and lets writers keep its label values.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import GeometryError, InputError
from .terminology import Color, Terminology, default_color, default_terminology


@dataclass
class Segment:
    name: str
    mask: Optional[np.ndarray] = field(default=None, repr=False)  # (k, j, i), nonzero = inside
    color: Optional[Color] = None  # RGB in 0..1; None: from the terminology table or the palette
    terminology: Optional[Terminology] = None  # None: from the table when the name is known
    id: Optional[str] = None  # None: derived from the name, unique within the output
    label: Optional[int] = None  # this segment is ``labelmap == label``
    labelmap: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"a segment needs a non-empty name, got {self.name!r}")
        if (self.mask is None) == (self.labelmap is None or self.label is None):
            raise InputError(f"segment {self.name!r}: give either a mask or a labelmap and its label value")
        if self.color is not None:
            color = tuple(float(c) for c in self.color)
            if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
                raise InputError(f"segment {self.name!r}: colour must be 3 numbers in 0..1, got {self.color!r}")
            self.color = color

    @property
    def shape(self) -> tuple:
        return (self.mask if self.mask is not None else self.labelmap).shape

    def binary_mask(self) -> np.ndarray:
        """Bool ``(k, j, i)`` mask (computed from the labelmap for a label segment)."""
        if self.mask is not None:
            return np.asarray(self.mask) != 0
        return self.labelmap == self.label


def segments_from_labelmap(labelmap: np.ndarray, names: Mapping[int, str], include_absent: bool = False,
                           colors: Optional[Mapping[int, Color]] = None) -> List[Segment]:
    """One segment per label value present in the labelmap, in label order.

    Labels without a name become ``"label N"``; named labels absent from the map are left out unless
    ``include_absent`` (then they are empty segments, as a fixed class list may want).
    """
    labelmap = np.asarray(labelmap)
    values = {int(v) for v in np.unique(labelmap) if v != 0}
    if include_absent:
        values |= {int(v) for v in names if int(v) != 0}
    colors = colors or {}
    return [Segment(name=str(names.get(v, f"label {v}")), label=v, labelmap=labelmap, color=colors.get(v))
            for v in sorted(values)]


def complete(segments: Sequence[Segment], shape_kji: tuple) -> List[Segment]:
    """Copies with every default filled in (id, colour, terminology), checked against the output grid."""
    if not segments:
        raise InputError("no segments to write")
    done, used_ids = [], set()
    for index, segment in enumerate(segments):
        if tuple(segment.shape) != tuple(shape_kji):
            raise GeometryError(f"segment {segment.name!r}: mask shape {tuple(segment.shape)} (k, j, i) does not "
                                f"match the reference volume's {tuple(shape_kji)}")
        segment_id = _unique(segment.id or _id_from(segment.name), used_ids)
        done.append(replace(segment, id=segment_id,
                            color=segment.color or default_color(segment.name, index),
                            terminology=segment.terminology or default_terminology(segment.name)))
    return done


def label_names(segments: Sequence[Segment]) -> Dict[int, str]:
    return {s.label: s.name for s in segments if s.label is not None}


def _id_from(name: str) -> str:
    # Slicer accepts any string as an ID; keep it readable and free of the separators its tags use.
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name.strip()) or "Segment"


def _unique(candidate: str, used: set) -> str:
    result, n = candidate, 2
    while result in used:
        result, n = f"{candidate}_{n}", n + 1
    used.add(result)
    return result


# ---- label names from the command line or a file -------------------------------------------------------------------
def read_label_names(spec: str, key: Optional[str] = None) -> Tuple[Dict[int, str], Dict[int, Color]]:
    """Label value -> name (and colour where given) from a file or an inline list.

    Accepted: a JSON object ``{"1": "liver", ...}``; one nested under a key (TotalSegmentator's class map:
    ``{"total": {...}, "total_mr": {...}}``, pick with ``key``); our NIfTI sidecar (``{"labels": [{"value",
    "name", "color"}]}``); a JSON list of names (labels 1..N); a Slicer colour table (``value name r g b a`` lines,
    .txt/.ctbl); or inline ``"liver,spleen"`` (labels 1..N) or ``"1=liver,5=spleen"``. A nested map's key can
    also follow the file name: ``class_map.json:total``.
    """
    path = Path(spec)
    if not _is_file(path) and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if _is_file(Path(head)) and tail:
            path, key = Path(head), key or tail
    if _is_file(path):
        text = path.read_text(errors="replace")
        if path.suffix.lower() in (".txt", ".ctbl"):
            return _colour_table(path, text)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); give a JSON map of label "
                             f"values to names") from None
        return _names_from_json(path, document, key)
    if spec.lower().endswith((".json", ".txt", ".ctbl")):
        raise InputError(f"{spec}: no such names file")
    return _inline_names(spec), {}


def _is_file(path: Path) -> bool:
    """``Path.is_file`` that answers False for strings that cannot be file names (a long inline list)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _names_from_json(path: Path, document, key: Optional[str]) -> Tuple[Dict[int, str], Dict[int, Color]]:
    if isinstance(document, list):
        return {i: str(n) for i, n in enumerate(document, start=1)}, {}
    if not isinstance(document, dict):
        raise InputError(f"{path}: expected a JSON object or list of names")
    if isinstance(document.get("labels"), list):  # our sidecar
        names, colors = {}, {}
        for entry in document["labels"]:
            value = _label_value(path, entry.get("value"))
            names[value] = str(entry.get("name", f"label {value}"))
            if entry.get("color") is not None:
                colors[value] = tuple(float(c) for c in entry["color"])
        return names, colors
    nested = {k: v for k, v in document.items() if isinstance(v, dict)}
    if nested:
        if key is None and len(nested) == 1:
            key = next(iter(nested))
        if key not in nested:
            raise InputError(f"{path}: holds several label maps ({', '.join(nested)}); choose one with "
                             f"--names-key")
        document = nested[key]
    return {_label_value(path, k): str(v) for k, v in document.items()}, {}


def _colour_table(path: Path, text: str) -> Tuple[Dict[int, str], Dict[int, Color]]:
    names, colors = {}, {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2:
            raise InputError(f"{path}: line {number} is not 'value name [r g b a]'")
        value = _label_value(path, fields[0])
        names[value] = fields[1]
        if len(fields) >= 5:
            colors[value] = tuple(min(max(float(c) / 255.0, 0.0), 1.0) for c in fields[2:5])
    return names, colors


def _inline_names(spec: str) -> Dict[int, str]:
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise InputError("no label names given; pass --names liver,spleen or a JSON file of names")
    if all("=" in item for item in items):
        pairs = [item.split("=", 1) for item in items]
        return {_label_value(spec, v): n.strip() for v, n in pairs}
    if any("=" in item for item in items):
        raise InputError(f"label names {spec!r}: either all 'value=name' or plain names (labels 1..N), not a mix")
    return {i: name for i, name in enumerate(items, start=1)}


def _label_value(where, value) -> int:
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        raise InputError(f"{where}: label value {value!r} is not a whole number") from None
    if number <= 0:
        raise InputError(f"{where}: label value {number} must be positive (0 is background)")
    return number
