"""The engine's layers hold: every import (module level or inside a function) points to the same layer or one below.
The layer list is the one in medsegx_core/DESIGN.md, read from that file, so the document and the imports cannot
drift apart. The graph is Testing/test_import_graph.py's (one reading of import statements), which also checks
that there is no cycle anywhere in the tree.

Run alone: ``python -m pytest -q Testing/engine/test_import_layers.py`` (reads source text only; imports nothing).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_import_graph import SOURCE_TREES, import_graph, imported_names, modules_in   # Testing/ is on sys.path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "medsegx_core"
FORBIDDEN_IN_ENGINE = ("slicer", "qt", "ctk", "vtk")


def engine_graph() -> dict:
    """Engine module -> the engine modules it imports (test_import_graph's one reading of import statements)."""
    return import_graph({ROOT: ["medsegx_core"]})


def top_level_imports(path: Path) -> set:
    """The top-level package of every import in ``path`` (lower case)."""
    name = {file: module for module, file in modules_in(SOURCE_TREES).items()}[path]
    return {imported.split(".")[0].lower() for imported in imported_names(name, path)}


def documented_layers() -> list:
    """The layer list of DESIGN.md, bottom first: each line of the block after "## Layers" that starts with a
    path names that layer's members (``data/``, ``predictor.py``; several on one line share the layer)."""
    text = (ENGINE / "DESIGN.md").read_text(encoding="utf-8")
    block = text.split("## Layers", 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        if not line or line[0] == " ":
            continue
        members = re.findall(r"([a-z_0-9]+)(?:/|\.py)", line.split("  ", 1)[0])
        layers.append(["medsegx_core." + member for member in members])
    return layers[::-1]


def layer_of(module: str, layers: list) -> int:
    if module == "medsegx_core":
        return 0          # the package itself holds only __version__
    for index, members in enumerate(layers):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{module} is in no layer of medsegx_core/DESIGN.md")


def test_design_lists_every_part_of_the_engine():
    layers = documented_layers()
    assert len(layers) >= 8, layers
    for module in engine_graph():
        layer_of(module, layers)       # raises for a module the document does not place


def test_no_import_points_upward():
    layers = documented_layers()
    upward = sorted(f"{source} ({layer_of(source, layers)}) -> {target} ({layer_of(target, layers)})"
                    for source, targets in engine_graph().items() for target in targets
                    if layer_of(target, layers) > layer_of(source, layers))
    assert not upward, "imports against the layer order of DESIGN.md:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_imports_no_slicer_qt_or_vtk(path):
    assert not top_level_imports(path) & set(FORBIDDEN_IN_ENGINE)


def test_the_slicer_logic_imports_no_qt():
    for path in (ROOT / "MedSegXSlicer" / "MedSegXSlicerLib").rglob("*.py"):
        names = top_level_imports(path)
        assert "qt" not in names and "ctk" not in names, path
