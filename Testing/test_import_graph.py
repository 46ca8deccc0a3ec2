"""No import cycle anywhere in the tree: the engine (``medsegx_core/``) and the Slicer module (``MedSegXSlicer/``: the
module file, the batch script and ``MedSegXSlicerLib``), with every import counted: absolute and relative,
``import a.b`` and ``from a import b``, at module level or inside a function (a lazy import still runs, so a cycle
through it still costs an import order that works by luck).

Modules are named as Python finds them: the engine from the repository root, the module's files from their own
folder (Slicer puts a scripted module's folder on ``sys.path``; the batch script does the same), so
``from MedSegXSlicerLib import models`` and ``from .models import x`` inside ``MedSegXSlicerLib`` are the same edge.
An edge from a module to a package it lies in is left out: Python has begun importing that package before the
module, so ``from . import b`` inside ``pkg.a`` is no edge back to ``pkg/__init__``. An edge from a package's
``__init__`` to the modules it re-exports is kept, because importing the package runs them: the Slicer library's
``__init__`` imports the Logic, so a module of the library importing the module file (which imports the library)
is a cycle even when no two modules import each other directly. (Testing/engine/test_import_layers.py checks the
engine's layer order on this test's graph.)

Reads source text only; imports nothing it checks. Run alone: ``python -m pytest -q Testing/test_import_graph.py``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Set

import pytest


ROOT = Path(__file__).resolve().parents[1]
#: Where each part of the tree is imported from (a ``sys.path`` entry) -> the files and folders it holds there.
SOURCE_TREES = {
    ROOT: ["medsegx_core"],
    ROOT / "MedSegXSlicer": ["MedSegXSlicer.py", "medsegx_batch.py", "MedSegXSlicerLib"],
}


def modules_in(trees: Mapping[Path, Iterable[str]]) -> Dict[str, Path]:
    """Module name -> file, for every .py file of ``trees`` (``sys.path`` entry -> members under it)."""
    modules = {}
    for entry, members in trees.items():
        for member in members:
            path = Path(entry) / member
            for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
                parts = list(file.relative_to(entry).with_suffix("").parts)
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                if name in modules:
                    raise AssertionError(f"two files are module {name}: {modules[name]} and {file}")
                modules[name] = file
    return modules


def imported_names(name: str, path: Path) -> Set[str]:
    """Every module name an import statement of ``path`` (module ``name``) may load, wherever the statement is:
    ``import a.b`` -> a, a.b; ``from a import b`` -> a and a.b (a.b counts only if it is a module); relative
    imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 > len(parts):
                    raise AssertionError(f"{path}: 'from {'.' * node.level}{node.module or ''} import' goes "
                                         f"above the top of package {package!r}")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:   # importing a.b.c runs a and a.b first
            pieces = target.split(".")
            found.update(".".join(pieces[:n]) for n in range(1, len(pieces) + 1))
    return found


def import_graph(trees: Mapping[Path, Iterable[str]] = SOURCE_TREES) -> Dict[str, Set[str]]:
    """Module -> the modules of ``trees`` it imports (itself and the packages it lies in left out)."""
    modules = modules_in(trees)
    return {name: {target for target in imported_names(name, path) if target in modules and target != name
                   and not name.startswith(target + ".")}
            for name, path in modules.items()}


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


def cycle_message(trees: Mapping[Path, Iterable[str]] = SOURCE_TREES) -> str:
    """"" when the graph has no cycle, else the cycle with each module's file."""
    cycle = find_cycle(import_graph(trees))
    if cycle is None:
        return ""
    files, top = modules_in(trees), Path(os.path.commonpath([str(entry) for entry in trees]))
    return "import cycle: " + " -> ".join(f"{module} ({files[module].relative_to(top).as_posix()})" for module in cycle)


def test_no_import_cycle_in_the_engine_or_the_slicer_module():
    graph = import_graph()
    # the walk saw the whole tree and its edges: the Slicer library, the batch script, the engine, lazy imports
    assert {"MedSegXSlicer", "medsegx_batch", "MedSegXSlicerLib.logic", "medsegx_core.predictor"} <= set(graph)
    assert "MedSegXSlicerLib.resources" in graph["MedSegXSlicer"] and "MedSegXSlicerLib" in graph["medsegx_batch"]
    assert "medsegx_core.registry" in graph["MedSegXSlicerLib.box_mode"]   # imported inside a function
    message = cycle_message()
    assert not message, message


#: The tree's three layers, bottom first (each imports only its own or lower ones): the engine, the Slicer library
#: (Logic, no Qt), and the module file and the batch script, which both drive the Logic. The engine's own layers
#: are checked by Testing/engine/test_import_layers.py.
TREE_LAYERS = (("medsegx_core",), ("MedSegXSlicerLib",), ("MedSegXSlicer", "medsegx_batch"))


def tree_layer(module: str) -> int:
    return next(index for index, tops in enumerate(TREE_LAYERS) if module.split(".")[0] in tops)


def test_no_import_points_up_the_tree():
    graph = import_graph()
    assert {module.split(".")[0] for module in graph} == {top for tops in TREE_LAYERS for top in tops}
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                    if tree_layer(target) > tree_layer(source))
    assert not upward, "imports against the layers engine < Slicer library < module and batch script:\n" + \
        "\n".join(upward)


# ---- the checker on a tiny package written for the purpose ------------------------------------------------------
def write_tree(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_through_a_relative_import_inside_a_function_is_found_and_named(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "from .a import run\n",
        "pkg/a.py": "from . import b\n\ndef run():\n    return b.VALUE\n",
        "pkg/b.py": "VALUE = 1\n\ndef late():\n    from .sub.c import helper\n    return helper()\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def helper():\n    from ..a import run\n    return run\n",
    })
    trees = {tmp_path: ["pkg"]}
    assert find_cycle(import_graph(trees)) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert cycle_message(trees) == ("import cycle: pkg.a (pkg/a.py) -> pkg.b (pkg/b.py) -> pkg.sub.c "
                                    "(pkg/sub/c.py) -> pkg.a (pkg/a.py)")


def test_a_cycle_between_two_source_trees_through_absolute_imports_is_found(tmp_path):
    """A module folder on sys.path importing the engine, and the engine importing the module's library back."""
    write_tree(tmp_path, {
        "engine/__init__.py": "",
        "engine/core.py": "import engine.util\n",
        "engine/util.py": "from lib.tools import x\n",
        "module/lib/__init__.py": "",
        "module/lib/tools.py": "import engine.core as core\nx = 1\n",
        "module/script.py": "from lib import tools\n",
    })
    trees = {tmp_path: ["engine"], tmp_path / "module": ["lib", "script.py"]}
    graph = import_graph(trees)
    assert graph["script"] == {"lib", "lib.tools"}
    assert find_cycle(graph) == ["engine.core", "engine.util", "lib.tools", "engine.core"]


def test_a_package_reexporting_its_modules_and_imports_of_other_packages_are_no_cycle(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "pkg/a.py": "import os\nfrom pkg.b import B\nA = B\n",
        "pkg/b.py": "import numpy\nB = 1\n",
        "tool.py": "import pkg\nfrom pkg import a\n",
    })
    trees = {tmp_path: ["pkg", "tool.py"]}
    graph = import_graph(trees)
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": set(), "tool": {"pkg", "pkg.a"}}
    assert cycle_message(trees) == ""


def test_a_cycle_through_a_package_that_reexports_its_logic_is_found(tmp_path):
    """The shape the Slicer library would have if its worker imported the module file lazily: no two modules
    import each other, but importing the module file runs the library's __init__, which runs the worker."""
    write_tree(tmp_path, {
        "lib/__init__.py": "from .logic import Logic\n",
        "lib/logic.py": "from .worker import Worker\n\nclass Logic:\n    pass\n",
        "lib/worker.py": "class Worker:\n    def late(self):\n        import module\n",
        "module.py": "from lib import Logic\n",
    })
    assert find_cycle(import_graph({tmp_path: ["lib", "module.py"]})) == ["lib", "lib.logic", "lib.worker",
                                                                          "module", "lib"]


def test_a_relative_import_above_the_top_package_is_reported(tmp_path):
    write_tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from ... import nothing\n"})
    with pytest.raises(AssertionError, match="goes above the top of package 'pkg'"):
        import_graph({tmp_path: ["pkg"]})


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
