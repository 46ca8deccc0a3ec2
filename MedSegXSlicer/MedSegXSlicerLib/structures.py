"""Several structures in one request: the text field's presets ("abdominal organs") and how a list is described.

The list itself ("liver, spleen; left kidney") is the engine's: ``medsegx_core.data.hierarchy.resolve_structures``
splits it, expands the presets given to it (``PRESET_STRUCTURES``), resolves every name through the anatomy
hierarchy (synonyms, typos with suggestions), drops duplicates after resolution and refuses an unknown name
(``UnknownTermError`` naming it) before any work starts; ``medsegx segment`` uses the same rule.

Presets are lists of hierarchy nodes grouped by the region the hierarchy files them under (``region``): a
test checks that every structure of a preset resolves exactly and lies under that region.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple


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

#: preset name -> its structures: what the engine's list rule (``hierarchy.resolve_structures``) expands
PRESET_STRUCTURES: Dict[str, Tuple[str, ...]] = {name: preset.structures for name, preset in PRESETS.items()}


def describe(names: Sequence[str], limit: Optional[int] = None) -> str:
    """'liver', 'liver and spleen', 'liver, spleen and left kidney' (quoted)."""
    quoted = [f"'{n}'" for n in names[:limit] if n]
    if limit is not None and len(names) > limit:
        quoted.append(f"{len(names) - limit} more")
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1] if quoted else "none"
