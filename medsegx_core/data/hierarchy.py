"""The anatomy hierarchy: a tree of named structures, and free text -> node -> context indices.

The tree (``resources/hierarchy.json``) is MedSegDB's, extended with the structures our data uses:
modality in parallel with root "human body" -> level 1 body part -> level 2 subregion -> level 3 organ/tissue
-> task. MedSegDB's nodes keep MedSegDB's indices, so MedSegX's published context-embedding tables map row for
row; our additions take the rows after them. Every level's table ends with an explicit "unknown" row, used for
whatever the text (or the lack of it) does not determine: a level-3 term such as "kidney" has an unknown task,
an image without text has everything unknown.

Resolution of free text, in order:
1. exact: the text, normalised, is a node's name or display name;
2. synonym: its bag of words equals that of a name, a source label (MedSegDB ``LeftKidney``, TotalSegmentator
   ``kidney_left``, FreeSurfer ``Left-Kidney``) or a listed synonym, after rules that make ``L kidney``,
   ``kidney (left)``, ``Kidneys, left`` and ``left kidney`` the same (case, CamelCase, separators, L/R/lh/rh,
   British spellings, plurals, word order);
3. fuzzy: the closest name when it is clearly the closest and names the same side; otherwise
   ``UnknownTermError`` with the closest names as suggestions.

A list of structures ("liver, spleen; left kidney", repeated ``--text`` options, the Slicer module's text field
and its presets) resolves through ``resolve_structures``, the one rule every entry point shares.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

from ..errors import InputError, PromptError, UnknownTermError

HIERARCHY_FILE = Path(__file__).resolve().parents[1] / "resources" / "hierarchy.json"

# Level numbers: 0 root, 1 body part, 2 subregion, 3 organ/tissue, 4 task.
LEVEL_NAMES = ("root", "level1", "level2", "level3", "task")
LEVEL_TITLES = ("root", "body part", "subregion", "organ/tissue", "task")
UNKNOWN = "unknown"

FUZZY_ACCEPT = 0.85    # a fuzzy match this close, and clearly closer than the next node, is taken
FUZZY_MARGIN = 0.04
SUGGEST_CUTOFF = 0.6
MAX_SUGGESTIONS = 5


# ------------------------------------------------------------------------------------------- normalisation
_SIDE = {"l": "left", "lt": "left", "lh": "left", "left": "left", "r": "right", "rt": "right", "rh": "right",
         "right": "right"}
_SPELLING = {"tumour": "tumor", "tumours": "tumor", "oesophagus": "esophagus", "oesophageal": "esophageal",
             "haemorrhage": "hemorrhage", "oedema": "edema", "ischaemic": "ischemic", "grey": "gray",
             "coeliac": "celiac", "haemangioma": "hemangioma", "caecum": "cecum", "vertebrae": "vertebra",
             "ventricular": "ventricle", "centre": "center", "fibre": "fiber", "anaemia": "anemia",
             "paediatric": "pediatric", "foetal": "fetal", "leukaemia": "leukemia", "lobes": "lobe"}
_STOPWORDS = {"the", "of", "a", "an", "and", "in", "segment", "segmentation", "structure", "mask", "label"}
# CamelCase boundaries, and a number after a word ('Rib1'), but not inside codes such as 'L3' or 'C7'
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[a-z]{2})(?=[0-9])")
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _tokens(text: str) -> list[str]:
    """Words of a label after the rules every comparison shares (order kept)."""
    words = _SEPARATORS.split(_CAMEL.sub(" ", text.strip()).lower())
    out = []
    for word in words:
        if not word or word in _STOPWORDS:
            continue
        word = _SIDE.get(word, word)
        word = _SPELLING.get(word, word)
        # plural -> singular, applied to both sides of every comparison so over-stripping is harmless
        if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "as")):
            word = word[:-1]
        out.append(word)
    return out


def normalise(text: str) -> str:
    """The text as canonical words in their own order: 'Left-Kidney' -> 'left kidney'."""
    return " ".join(_tokens(text))


def word_key(text: str) -> str:
    """Order-free key: 'kidney_left', 'LeftKidney', 'L kidney' and 'kidney (left)' all give 'kidney left'."""
    return " ".join(sorted(_tokens(text)))


def _correct_sides(key: str) -> str:
    """Fix a misspelt 'left'/'right' ('rigth kidney', 'lfet lung') so the side stays a hard constraint."""
    words = []
    for word in key.split():
        if word not in ("left", "right") and len(word) >= 3:
            close = difflib.get_close_matches(word, ("left", "right"), n=1, cutoff=0.75)
            word = close[0] if close else word
        words.append(word)
    return " ".join(sorted(words))


def _words_covered(key: str, node: "Node") -> bool:
    """Every query word is a misspelling or an abbreviation of a word of one of the node's spellings, so that
    'left ventricular picardium' is not taken for 'left ventricular myocardium' on overall similarity alone."""
    for spelling in node.spellings():
        words = word_key(spelling).split()
        if all(any(w == c or (len(w) >= 3 and c.startswith(w))
                   or difflib.SequenceMatcher(None, w, c).ratio() >= 0.75 for c in words) for w in key.split()):
            return True
    return False


def _sides(key: str) -> frozenset[str]:
    return frozenset(word for word in key.split() if word in ("left", "right"))


# ------------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ContextIndices:
    """Rows of the context-embedding tables for one sample (ConMoAE's routing input).

    Every field is a row index into that level's table; each table's last row is "unknown"."""
    level1: int
    level2: int
    level3: int
    task: int
    modality: int
    root: int = 0

    def rows(self) -> tuple[int, int, int, int, int, int]:
        """(root, level1, level2, level3, task, modality): the order MedSegX stores its context embeddings."""
        return (self.root, self.level1, self.level2, self.level3, self.task, self.modality)


@dataclass(frozen=True, eq=False)
class Node:
    level: int                       # 0 root .. 4 task
    index: int                       # row in that level's table
    name: str                        # canonical display name ("left kidney"), also the SegVol text
    key: str                         # name as in the tree file (parents refer to it)
    parent: Optional["Node"] = None
    medsegdb: Optional[str] = None   # MedSegDB's own name of this node, if it has one
    source_labels: tuple[str, ...] = ()     # TotalSegmentator / FreeSurfer label names
    synonyms: tuple[str, ...] = ()
    group: Optional[str] = None      # display grouping inside a level-3 node (FreeSurfer families)
    children: list["Node"] = field(default_factory=list, repr=False)

    @property
    def path(self) -> tuple[str, ...]:
        node, names = self, []
        while node is not None:
            names.append(node.name)
            node = node.parent
        return tuple(reversed(names))

    def ancestor(self, level: int) -> Optional["Node"]:
        node = self
        while node is not None and node.level > level:
            node = node.parent
        return node if node is not None and node.level == level else None

    def spellings(self) -> tuple[str, ...]:
        """Everything this node may be called, before normalisation."""
        own = (self.name, self.key) + ((self.medsegdb,) if self.medsegdb else ())
        return own + self.source_labels + self.synonyms

    def __repr__(self) -> str:
        return f"Node({LEVEL_NAMES[self.level]} {self.index}: {self.name!r})"


@dataclass(frozen=True)
class Modality:
    name: str              # "CT", "MRI", ... or "unknown"
    index: int             # row in the modality table (the last row is unknown)
    display: str

    @property
    def known(self) -> bool:
        return self.name != UNKNOWN


@dataclass(frozen=True)
class ResolvedTerm:
    """What a text prompt means: the node, its display name and its context (modality unknown until given)."""
    query: str
    node: Node
    context: ContextIndices
    match: str                       # "exact", "synonym", "fuzzy" or "new" (a new leaf under a known node)
    new_name: Optional[str] = None   # for a new leaf: the user's name for it

    @property
    def name(self) -> str:
        return self.new_name or self.node.name

    @property
    def path(self) -> tuple[str, ...]:
        return self.node.path + ((self.new_name,) if self.new_name else ())

    @property
    def level(self) -> int:
        return 4 if self.new_name else self.node.level

    def with_modality(self, modality: Union[Modality, str, None]) -> "ResolvedTerm":
        modality = modality if isinstance(modality, Modality) else load_hierarchy().resolve_modality(modality)
        return replace(self, context=replace(self.context, modality=modality.index))


# ------------------------------------------------------------------------------------------------- the tree
class Hierarchy:
    """The loaded tree with its lookup tables. Use ``load_hierarchy()`` for the packaged one (cached)."""

    def __init__(self, data: dict, source: str = "<dict>"):
        self.source = source
        self.version: str = str(data["version"])
        self.root = Node(level=0, index=0, name=data["root"], key=data["root"])
        self.levels: list[list[Node]] = [[self.root], [], [], [], []]
        self.reserved_rows = {name: list(rows) for name, rows in data.get("reserved_rows", {}).items()}
        self._build_levels(data)
        self.modalities = [Modality(m["name"], int(m["index"]), m.get("display", m["name"]))
                           for m in data["modalities"]]
        self._modality_aliases = self._build_modality_aliases(data["modalities"])
        self._build_lookup()

    # ---- construction
    def _build_levels(self, data: dict) -> None:
        by_key: list[dict[str, Node]] = [{self.root.key: self.root}, {}, {}, {}, {}]
        for level, field_name in enumerate(("level1", "level2", "level3", "tasks"), start=1):
            for entry in data[field_name]:
                parent_key = entry.get("parent", self.root.key)
                parent = by_key[level - 1].get(parent_key)
                if parent is None:
                    raise InputError(f"{self.source}: {LEVEL_TITLES[level]} {entry['name']!r} has unknown parent "
                                     f"{parent_key!r}; fix the hierarchy file")
                labels = tuple(entry.get("totalsegmentator", ())) + tuple(entry.get("freesurfer", ()))
                node = Node(level=level, index=int(entry["index"]), name=entry.get("display", entry["name"]),
                            key=entry["name"], parent=parent, medsegdb=entry.get("medsegdb"),
                            source_labels=labels, synonyms=tuple(entry.get("synonyms", ())),
                            group=entry.get("group"))
                if node.key in by_key[level]:
                    raise InputError(f"{self.source}: duplicate {LEVEL_TITLES[level]} {node.key!r}")
                by_key[level][node.key] = node
                parent.children.append(node)
                self.levels[level].append(node)
        for level, nodes in enumerate(self.levels):
            rows = sorted([n.index for n in nodes] + self.reserved_rows.get(LEVEL_NAMES[level], []))
            if rows != list(range(len(rows))):
                raise InputError(f"{self.source}: {LEVEL_TITLES[level]} indices are not 0..{len(rows) - 1}")

    @staticmethod
    def _build_modality_aliases(entries: Sequence[dict]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for m in entries:
            for alias in [m["name"], m.get("display", "")] + list(m.get("aliases", ())) + list(m.get("dicom", ())):
                if alias:
                    aliases[normalise(alias)] = m["name"]
        return aliases

    def _build_lookup(self) -> None:
        # exact: normalised name/display -> nodes; synonym: order-free key -> nodes. Deeper nodes win ties
        # ("liver" is both the level-3 organ and the MedSegDB task; the task is the more specific meaning).
        self._exact: dict[str, list[Node]] = {}
        self._by_key: dict[str, list[Node]] = {}
        for node in self.nodes():
            for text in (node.name, node.key):
                self._add(self._exact, normalise(text), node)
            for text in node.spellings():
                self._add(self._by_key, word_key(text), node)
        self._fuzzy_keys = sorted(self._by_key)

    @staticmethod
    def _add(table: dict[str, list[Node]], key: str, node: Node) -> None:
        if key and node not in table.setdefault(key, []):
            table[key].append(node)

    # ---- sizes and unknowns
    def table_rows(self, level: str) -> int:
        """Rows of a context table, the trailing unknown row included: level in root/level1/../task/modality."""
        if level == "modality":
            return len(self.modalities) + 1
        number = LEVEL_NAMES.index(level)
        return len(self.levels[number]) + len(self.reserved_rows.get(level, [])) + 1

    def table_sizes(self) -> dict[str, int]:
        return {name: self.table_rows(name) for name in ("modality",) + LEVEL_NAMES}

    def unknown_index(self, level: str) -> int:
        return self.table_rows(level) - 1

    @property
    def unknown_modality(self) -> Modality:
        return Modality(UNKNOWN, self.unknown_index("modality"), UNKNOWN)

    def unknown_context(self) -> ContextIndices:
        """Nothing known: no text, or a structure that fits nowhere in the tree."""
        return ContextIndices(root=self.unknown_index("root"), level1=self.unknown_index("level1"),
                              level2=self.unknown_index("level2"), level3=self.unknown_index("level3"),
                              task=self.unknown_index("task"), modality=self.unknown_index("modality"))

    def context_of(self, node: Node, modality: Union[Modality, str, None] = None) -> ContextIndices:
        """Indices of the node and its ancestors; the levels below it are unknown."""
        rows = {}
        for level in range(1, 5):
            ancestor = node.ancestor(level)
            rows[LEVEL_NAMES[level]] = ancestor.index if ancestor is not None else self.unknown_index(LEVEL_NAMES[level])
        modality = modality if isinstance(modality, Modality) else self.resolve_modality(modality)
        return ContextIndices(modality=modality.index, root=0, **rows)

    # ---- iteration and search
    def nodes(self, level: Optional[int] = None) -> Iterator[Node]:
        for number, nodes in enumerate(self.levels):
            if level is None or level == number:
                yield from nodes

    def node_at(self, level: str, index: int) -> Optional[Node]:
        for node in self.levels[LEVEL_NAMES.index(level)]:
            if node.index == index:
                return node
        return None

    def search(self, text: str) -> list[Node]:
        """Nodes whose spellings contain the text's words (any order), then fuzzy neighbours; tree order."""
        words = _tokens(text)
        hits = [node for node in self.nodes()
                if any(all(w in word_key(s).split() or any(w in part for part in word_key(s).split())
                           for w in words) for s in node.spellings())]
        if not hits:
            hits = self._suggest(word_key(text))
        return hits

    # ---- resolution
    def resolve(self, text: str) -> ResolvedTerm:
        if text is None or not normalise(str(text)):
            raise PromptError(f"empty text prompt {text!r}: give a structure name such as 'liver' "
                              f"(run 'medsegx categories' to list them)")
        exact = self._exact.get(normalise(text), [])
        # exact and synonym hits compete by depth: 'Pituitary' is level-3 'pituitary' by name but MedSegDB's task
        # 'Pituitary' by synonym, and the task is the more specific meaning
        node = self._pick(exact + [n for n in self._by_key.get(word_key(text), []) if n not in exact], text)
        if node is not None:
            match = "exact" if node in exact else "synonym"
            return ResolvedTerm(query=text, node=node, context=self.context_of(node), match=match)
        key = _correct_sides(word_key(text))
        node = self._pick(self._by_key.get(key, []), text)
        if node is not None:   # only a misspelt "left"/"right"
            return ResolvedTerm(query=text, node=node, context=self.context_of(node), match="fuzzy")
        scored = self._scored(key)
        if scored:
            best_score, best = scored[0]
            runner_up = next((s for s, n in scored[1:] if n is not best), 0.0)
            if (best_score >= FUZZY_ACCEPT and best_score - runner_up >= FUZZY_MARGIN
                    and _words_covered(key, best)):
                return ResolvedTerm(query=text, node=best, context=self.context_of(best), match="fuzzy")
        raise UnknownTermError(text, [n.name for n in self._suggest(key)])

    def new_leaf(self, name: str, parent_text: str) -> ResolvedTerm:
        """A structure not in the tree, placed under a known node: known ancestors, unknown task row."""
        parent = self.resolve(parent_text).node
        if parent.level == 4:   # a task's new sibling shares its organ, not its task row
            parent = parent.parent
        context = self.context_of(parent)
        return ResolvedTerm(query=name, node=parent, context=context, match="new", new_name=normalise(name) or name)

    def _pick(self, nodes: list[Node], text: str) -> Optional[Node]:
        if not nodes:
            return None
        deepest = max(n.level for n in nodes)
        candidates = [n for n in nodes if n.level == deepest]
        if len(candidates) > 1:
            raise UnknownTermError(text, [n.name for n in candidates])  # ambiguous: the user must choose
        return candidates[0]

    def _scored(self, key: str) -> list[tuple[float, Node]]:
        """(similarity, node) for nodes with the same left/right words as the query, best first."""
        sides = _sides(key)
        matcher = difflib.SequenceMatcher(b=key, autojunk=False)
        best: dict[int, tuple[float, Node]] = {}
        for candidate in self._fuzzy_keys:
            if _sides(candidate) != sides:
                continue
            matcher.set_seq1(candidate)
            if matcher.real_quick_ratio() < SUGGEST_CUTOFF or matcher.quick_ratio() < SUGGEST_CUTOFF:
                continue
            score = matcher.ratio()
            if score < SUGGEST_CUTOFF:
                continue
            node = self._deepest(self._by_key[candidate])
            if node.name not in best or best[node.name][0] < score:
                best[node.name] = (score, node)
        return sorted(best.values(), key=lambda sn: (-sn[0], -sn[1].level, sn[1].name))

    @staticmethod
    def _deepest(nodes: list[Node]) -> Node:
        return max(nodes, key=lambda n: n.level)

    def _suggest(self, key: str) -> list[Node]:
        scored = self._scored(key)
        if not scored:  # a misspelt side word: retry ignoring sides so the user still gets suggestions
            sideless = " ".join(w for w in key.split() if w not in ("left", "right"))
            scored = [sn for sn in self._scored_any_side(sideless)]
        return [node for _, node in scored[:MAX_SUGGESTIONS]]

    def _scored_any_side(self, key: str) -> list[tuple[float, Node]]:
        names = difflib.get_close_matches(key, self._fuzzy_keys, n=MAX_SUGGESTIONS * 3, cutoff=SUGGEST_CUTOFF)
        seen, out = set(), []
        for candidate in names:
            node = self._deepest(self._by_key[candidate])
            if node.name not in seen:
                seen.add(node.name)
                out.append((difflib.SequenceMatcher(None, key, candidate).ratio(), node))
        return out

    # ---- modality
    def resolve_modality(self, text: Optional[str], strict: bool = False) -> Modality:
        """A modality name, alias or DICOM Modality code ('CT', 'MR', 'MRI', 'ultrasound') -> Modality.

        None/'' /'unknown' -> the unknown modality. Anything else not recognised is unknown too (DICOM codes
        such as 'PT' have no row), unless ``strict`` (a user's explicit choice), where it is a PromptError."""
        if text is None or normalise(str(text)) in ("", UNKNOWN, "auto", "ot"):
            return self.unknown_modality
        name = self._modality_aliases.get(normalise(str(text)))
        if name is None:
            if strict:
                known = ", ".join(m.name for m in self.modalities)
                raise PromptError(f"unknown modality {text!r}: use one of {known} (or 'unknown')")
            return self.unknown_modality
        return next(m for m in self.modalities if m.name == name)


# ------------------------------------------------------------------------------------------ module API
@lru_cache(maxsize=None)
def _load(path: str) -> Hierarchy:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the anatomy hierarchy {path}: {exc}") from exc
    return Hierarchy(data, source=path)


def load_hierarchy(path: Union[str, Path, None] = None) -> Hierarchy:
    """The packaged hierarchy (or another file in the same format), loaded once per process."""
    return _load(str(Path(path) if path is not None else HIERARCHY_FILE))


def resolve_term(text: str) -> ResolvedTerm:
    """Free text -> ResolvedTerm (.name, .context, .path); raises UnknownTermError with suggestions."""
    return load_hierarchy().resolve(text)


# names in a list are separated by commas, semicolons or new lines (a multi-line text field)
_LIST_SEPARATORS = re.compile(r"[,;\n]+")


def resolve_structures(text: Union[str, Sequence[str], None],
                       presets: Optional[Mapping[str, Sequence[str]]] = None) -> list[ResolvedTerm]:
    """Every structure a free-text list names, resolved: order kept, duplicates after resolution dropped
    ("liver, Liver" or "kidney_left, left kidney" is one structure); [] when it names none.

    ``text``: one string or several (repeated command-line options), each split on commas, semicolons and new
    lines. ``presets`` maps a lower-case name ("abdominal organs") to the structures it stands for. The first
    unknown name raises ``UnknownTermError`` naming it (with suggestions), before any work starts."""
    items = [text] if isinstance(text, str) else list(text or [])
    terms, seen = [], set()
    for item in (part.strip() for value in items for part in _LIST_SEPARATORS.split(str(value))):
        if not item:
            continue
        preset = (presets or {}).get(item.lower())
        for name in (preset if preset is not None else (item,)):
            term = resolve_term(name)
            if term.name not in seen:
                seen.add(term.name)
                terms.append(term)
    return terms


def resolve_modality(text_or_dicom_modality: Optional[str], strict: bool = False) -> Modality:
    return load_hierarchy().resolve_modality(text_or_dicom_modality, strict=strict)


def context_indices(term: Union[str, ResolvedTerm, None], modality: Union[Modality, str, None] = None
                    ) -> ContextIndices:
    """Context for (term, modality); ``term=None`` gives unknown anatomy, ``modality=None`` unknown modality."""
    hierarchy = load_hierarchy()
    modality = modality if isinstance(modality, Modality) else hierarchy.resolve_modality(modality)
    if term is None:
        return replace(hierarchy.unknown_context(), modality=modality.index)
    resolved = term if isinstance(term, ResolvedTerm) else hierarchy.resolve(term)
    return replace(resolved.context, modality=modality.index)


def resolve_task_folder(folder: str) -> tuple[ResolvedTerm, Modality]:
    """MedSegDB's dataset folder convention 'Modality_Task' (e.g. 'CT_LeftKidney', 'MRI_Prostate2')."""
    modality_text, _, task_text = folder.partition("_")
    task_text = re.sub(r"\d+$", "", task_text.replace("_", ""))
    modality = resolve_modality(modality_text, strict=True)
    return resolve_term(task_text).with_modality(modality), modality


def iter_terms(level: Optional[int] = None) -> Iterable[Node]:
    return load_hierarchy().nodes(level)
