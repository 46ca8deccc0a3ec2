"""Several structures in one request: the text field's list ("liver, spleen, left kidney") and its presets.

A list is split on commas, semicolons and new lines; a preset name ("abdominal organs") stands for its
structures. Every name resolves through the anatomy hierarchy (synonyms, typos with suggestions), duplicates
(after resolution: "liver, Liver" or "kidney_left, left kidney") are dropped, and an unknown name is a
``UnknownTermError`` naming it before any work starts.

Presets are lists of hierarchy nodes grouped by the region the hierarchy files them under (``region``): a
test checks that every structure of a preset resolves exactly and lies under that region.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class Preset:
    name: str
    region: str                 # a hierarchy node every structure lies under ("abdomen", "chest", "pelvis")
    structures: Tuple[str, ...]


PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("abdominal organs", "abdomen", ("liver", "spleen", "left kidney", "right kidney", "pancreas", "stomach",
                                           "gallbladder")),
    Preset("thoracic organs", "chest", ("heart", "left lung", "right lung", "esophagus", "trachea")),
    Preset("pelvic organs", "pelvis", ("urinary bladder", "prostate")),
)}

_SEPARATORS = re.compile(r"[,;\n]+")


def preset_names() -> List[str]:
    return list(PRESETS)


def split_structure_list(text: Union[str, Sequence[str], None]) -> List[str]:
    """The names in a text field or a list, presets expanded, blanks dropped (not resolved yet)."""
    if text is None:
        return []
    items = _SEPARATORS.split(text) if isinstance(text, str) else [part for item in text
                                                                   for part in _SEPARATORS.split(str(item))]
    names: List[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        preset = PRESETS.get(item.lower())
        names.extend(preset.structures if preset is not None else (item,))
    return names


def resolve_structures(text: Union[str, Sequence[str], None]) -> list:
    """``ResolvedTerm`` of every structure named (order kept, duplicates dropped); [] for no text."""
    from medsegx_core.data.hierarchy import resolve_term

    terms, seen = [], set()
    for name in split_structure_list(text):
        term = resolve_term(name)
        if term.name not in seen:
            seen.add(term.name)
            terms.append(term)
    return terms


def describe(names: Sequence[str], limit: Optional[int] = None) -> str:
    """'liver', 'liver and spleen', 'liver, spleen and left kidney' (quoted)."""
    quoted = [f"'{n}'" for n in names[:limit] if n]
    if limit is not None and len(names) > limit:
        quoted.append(f"{len(names) - limit} more")
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1] if quoted else "none"
