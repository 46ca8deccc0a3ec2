"""The engine's layers hold: every import (module level or inside a function) points to the same layer or one below,
and no set of modules imports itself round in a cycle. The layer list is the one in medsegx_core/DESIGN.md, read
from that file, so the document and the imports cannot drift apart.

Run alone: ``python -m pytest -q Testing/engine/test_import_layers.py`` (reads source text only; imports nothing).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "medsegx_core"
FORBIDDEN_IN_ENGINE = ("slicer", "qt", "ctk", "vtk")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Every module ``path`` imports: absolute names, relative ones resolved, ``from X import y`` counted as X.y
    when X.y is a module of the engine (``from .inference import zoom``), else as X."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def engine_graph() -> dict:
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {t for t in imports_of(path) if t in modules and t != name} for name, path in modules.items()}


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


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search, white/grey/black)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "grey"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "grey":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "black"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    # Package __init__ files that re-export their modules are edges into the package, not cycles: drop the
    # edges from a package to its own modules.
    graph = {s: {t for t in ts if not t.startswith(s + ".")} for s, ts in engine_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_imports_no_slicer_qt_or_vtk(path):
    names = {name.split(".")[0].lower() for name in imports_of(path)}
    assert not names & set(FORBIDDEN_IN_ENGINE)


def test_the_slicer_logic_imports_no_qt():
    for path in (ROOT / "MedSegXSlicer" / "MedSegXSlicerLib").rglob("*.py"):
        names = {name.split(".")[0].lower() for name in imports_of(path)}
        assert "qt" not in names and "ctk" not in names, path
