"""Standard names, codes and colours for common structures, as Slicer and DICOM SEG expect them.

Slicer stores a segment's meaning as a terminology entry (category, type, optional modifier, SNOMED CT codes) in
the ``SegmentN_Tags`` of a .seg.nrrd; DICOM SEG requires the same codes in every segment description. This is a
small table of common structures with the codes and colours of Slicer's "3D Slicer General Anatomy list", found
from a name such as ``"liver"``, ``"Left kidney"`` or TotalSegmentator's ``"kidney_left"``. Unknown names get no
terminology (Slicer then shows the plain name) and a colour from a fixed palette.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

SLICER_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

Color = Tuple[float, float, float]


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme (``SCT`` = SNOMED CT), code value, human meaning."""

    scheme: str
    value: str
    meaning: str

    def as_list(self) -> list:
        return [self.scheme, self.value, self.meaning]


ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
TISSUE = Code("SCT", "85756007", "Tissue")  # the neutral entry Slicer gives a segment it knows nothing about
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")


@dataclass(frozen=True)
class Terminology:
    category: Code
    type: Code
    type_modifier: Optional[Code] = None
    context: str = SLICER_CONTEXT

    def to_slicer_string(self) -> str:
        """The ``TerminologyEntry`` tag value Slicer writes: context~category~type~modifier~anatomy~region~mod."""
        def coded(code):
            return "^".join(code.as_list()) if code else "^^"
        return "~".join([self.context, coded(self.category), coded(self.type), coded(self.type_modifier),
                         ANATOMIC_CONTEXT, "^^", "^^"])

    def to_slicerio(self) -> dict:
        entry = {"contextName": self.context, "category": self.category.as_list(), "type": self.type.as_list()}
        if self.type_modifier:
            entry["typeModifier"] = self.type_modifier.as_list()
        return entry

    @property
    def label(self) -> str:
        """``"Kidney, Left"``-style readable name."""
        return self.type.meaning + (f", {self.type_modifier.meaning}" if self.type_modifier else "")


def _organ(value: str, meaning: str, rgb: Tuple[int, int, int], category: Code = ANATOMICAL_STRUCTURE):
    return Code("SCT", value, meaning), category, tuple(c / 255.0 for c in rgb)


# name -> (type code, category, colour). Colours as in Slicer's General Anatomy list (0..255 there, 0..1 here).
STRUCTURES = {
    "liver": _organ("10200004", "Liver", (221, 130, 101)),
    "spleen": _organ("78961009", "Spleen", (157, 108, 162)),
    "kidney": _organ("64033007", "Kidney", (185, 102, 83)),
    "pancreas": _organ("15776009", "Pancreas", (249, 180, 111)),
    "gallbladder": _organ("28231008", "Gallbladder", (139, 150, 98)),
    "stomach": _organ("69695003", "Stomach", (216, 132, 105)),
    "aorta": _organ("15825003", "Aorta", (224, 97, 76)),
    "inferior vena cava": _organ("64131007", "Inferior vena cava", (0, 151, 206)),
    "portal vein": _organ("32764006", "Portal vein", (0, 151, 206)),
    "esophagus": _organ("32849002", "Esophagus", (211, 171, 143)),
    "adrenal gland": _organ("23451007", "Adrenal gland", (249, 186, 150)),
    "urinary bladder": _organ("89837001", "Urinary bladder", (222, 154, 132)),
    "duodenum": _organ("38848004", "Duodenum", (255, 253, 229)),
    "small intestine": _organ("30315005", "Small intestine", (205, 167, 142)),
    "colon": _organ("71854001", "Colon", (204, 168, 143)),
    "heart": _organ("80891009", "Heart", (206, 110, 84)),
    "lung": _organ("39607008", "Lung", (197, 165, 145)),
    "trachea": _organ("44567001", "Trachea", (182, 228, 255)),
    "brain": _organ("12738006", "Brain", (250, 250, 225)),
    "prostate": _organ("41216001", "Prostate", (230, 158, 140)),
    "thyroid gland": _organ("69748006", "Thyroid gland", (220, 160, 30)),
    "spinal cord": _organ("2748008", "Spinal cord", (244, 214, 49)),
    "mass": _organ("4147007", "Mass", (230, 220, 70), ALTERED_STRUCTURE),
    "lesion": _organ("52988006", "Lesion", (230, 220, 70), ALTERED_STRUCTURE),
}
ALIASES = {
    "gall bladder": "gallbladder", "ivc": "inferior vena cava", "oesophagus": "esophagus", "bladder": "urinary bladder",
    "adrenal": "adrenal gland", "tumor": "mass", "tumour": "mass", "thyroid": "thyroid gland",
    "portal vein and splenic vein": "portal vein", "kidneys": "kidney", "lungs": "lung",
}
SIDES = {"left": LEFT, "right": RIGHT}

# Distinct, readable colours for structures the table does not know (cycled by segment index).
PALETTE = tuple(tuple(c / 255.0 for c in rgb) for rgb in [
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101),
    (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0), (255, 250, 220), (230, 220, 70),
    (200, 200, 235), (250, 250, 210), (244, 214, 49), (0, 151, 206), (216, 132, 105), (183, 156, 220),
])


def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name).lower().split())


def lookup(name: str) -> Optional[Tuple[Terminology, Color]]:
    """Terminology and colour for a structure name, or ``None`` if the table does not know it."""
    words = _normalise(name).split()
    sides = [w for w in words if w in SIDES]
    key = " ".join(w for w in words if w not in SIDES)
    key = ALIASES.get(key, key)
    if key not in STRUCTURES or len(sides) > 1:
        return None
    code, category, color = STRUCTURES[key]
    return Terminology(category, code, SIDES[sides[0]] if sides else None), color


def default_color(name: str, index: int) -> Color:
    known = lookup(name)
    return known[1] if known else PALETTE[index % len(PALETTE)]


def default_terminology(name: str) -> Optional[Terminology]:
    known = lookup(name)
    return known[0] if known else None


GENERIC_TERMINOLOGY = Terminology(TISSUE, TISSUE)
