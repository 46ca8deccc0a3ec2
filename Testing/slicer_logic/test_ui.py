"""The module's Qt Designer file and build files, checked without Qt: the .ui parses, every widget the Widget code
uses exists in it, parameter-node bindings name real parameters, and CMake installs every script and resource."""
from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import scene_builders  # noqa: F401 - puts MedSegXSlicerLib on sys.path, as Slicer does

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegXSlicer"
RESOURCES_DIR = MODULE_DIR.parent / "Resources"
UI_FILE = RESOURCES_DIR / "UI" / "MedSegXSlicer.ui"
WIDGET_FILE = MODULE_DIR / "MedSegXSlicer.py"
QT_CLASSES = {"QWidget", "QLabel", "QLineEdit", "QPushButton", "QCheckBox", "QComboBox", "QProgressBar",
              "QSpinBox"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def widget_source():
    return ast.parse(WIDGET_FILE.read_text(encoding="utf-8"))


def widget_names(ui) -> dict:
    return {w.get("name"): w.get("class") for w in ui.iter("widget")}


def ui_attributes_used(tree) -> set:
    """Every ``self.ui.<name>`` in the Widget code."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}


def test_ui_parses_with_a_qmrmlwidget_root(ui):
    assert ui.tag == "ui" and ui.findtext("class") == "MedSegXSlicer"
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "MedSegXSlicer"


def test_every_widget_the_code_uses_exists(ui, widget_source):
    used = ui_attributes_used(widget_source)
    assert {"segmentButton", "cancelButton", "progressBar", "textLineEdit"} <= used  # the walker found them
    missing = sorted(used - set(widget_names(ui)))
    assert not missing, f"MedSegXSlicer.py uses self.ui.{missing} but the .ui has no such widget"


def test_widget_names_are_unique(ui):
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names))


def test_parameter_bindings_name_parameter_node_fields(ui, widget_source):
    wrapper = next(node for node in ast.walk(widget_source)
                   if isinstance(node, ast.ClassDef) and node.name == "MedSegXSlicerParameterNode")
    fields = {stmt.target.id for stmt in wrapper.body if isinstance(stmt, ast.AnnAssign)}
    bound = {prop.findtext("string") for prop in ui.iter("property") if prop.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, f"unknown parameters in the .ui: {sorted(bound - fields)}"


def test_custom_widgets_are_declared_and_connections_name_real_widgets(ui):
    names = widget_names(ui)
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = set(names.values()) - QT_CLASSES
    assert used <= declared, f"custom widgets without a <customwidget> entry: {sorted(used - declared)}"
    for connection in ui.iter("connection"):
        assert connection.findtext("sender") in names and connection.findtext("receiver") in names


def test_widget_loads_the_ui_file_it_ships(widget_source):
    calls = [node for node in ast.walk(widget_source) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Name) and node.func.id == "resource_path"]
    assert [ast.literal_eval(call.args[0]) for call in calls] == ["UI/MedSegXSlicer.ui"]
    assert UI_FILE.is_file()


def test_cmake_lists_every_script_and_resource():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8").replace("${MODULE_NAME}", "MedSegXSlicer")
    listed = set(re.findall(r"^\s+([\w./]+\.(?:py|png|ui|txt))\s*$", cmake, flags=re.M))
    scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    resources = {p.relative_to(RESOURCES_DIR.parent).as_posix() for p in RESOURCES_DIR.rglob("*") if p.is_file()}
    shipped = scripts | resources
    assert shipped == listed, f"not listed: {sorted(shipped - listed)}; listed but absent: {sorted(listed - shipped)}"
    assert "WITH_GENERIC_TESTS" in cmake and "slicer_add_python_unittest(SCRIPT MedSegXSlicer.py)" in cmake
    # the resources are installed from the repository root, so they land in <module dir>/Resources/...
    assert "${MEDSEGX_CORE_RESOURCES};${MODULE_PYTHON_RESOURCES}" in cmake and "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in cmake


def test_extension_metadata():
    cmake = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), f"{key} is missing or empty"
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert "add_subdirectory(MedSegXSlicer)" in cmake


def test_extension_index_requirements():
    """What the Extensions Index checks: the CMake project name is the extension's name, the icon and screenshot
    URLs name files of this repository (on its main branch), the homepage is that repository, a licence file."""
    root = MODULE_DIR.parent
    cmake = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cmake))
    assert re.search(r"^project\(MedSegX\)$", cmake, flags=re.M)
    homepage = values["EXTENSION_HOMEPAGE"]
    owner_repo = re.fullmatch(r"https://github.com/([\w.-]+/[\w.-]+)", homepage).group(1)
    assert owner_repo.split("/")[1].startswith("Slicer")      # the index's naming rule for extension repositories
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in values[key].split():
            prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
            assert url.startswith(prefix), url
            assert (root / url[len(prefix):]).is_file(), f"{key} names {url}, not a file of the repository"
    assert 40 < len(values["EXTENSION_DESCRIPTION"]) < 400
    assert values["EXTENSION_STATUS"] in {"Alpha", "Beta", "Stable"}
    licence = (root / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and len(licence) > 10000


def test_sample_ct_registration_matches_the_project_ct(reference_ct):
    import hashlib

    from MedSegXSlicerLib import sample_data
    from MedSegXSlicerLib.resources import resource_path

    source = sample_data.ABDOMINAL_CT
    assert source.uri.startswith("https://") and source.file_name.endswith(".nii.gz")
    assert source.checksum == "SHA256:" + hashlib.sha256(reference_ct.read_bytes()).hexdigest()
    assert Path(resource_path(source.thumbnail)).is_file()
    assert source.node_name == source.sample_name


def test_icon_is_a_128_pixel_png():
    header = (RESOURCES_DIR / "Icons" / "MedSegXSlicer.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


# ---- the widget stays thin: every action is one Logic call -------------------------------------------------------
#: Logic calls that only read (texts to show, lists to offer); an action may make these besides its one call.
LOGIC_READS = {"downloadOffer", "offlineInstructions", "structurePresets", "canUndo", "availableModels",
               "describeWeights", "unresolvedSegmentNames", "textCompletions", "modelLabel", "describeBoxModel"}
#: Engine and Lib internals the widget must reach only through the Logic.
LOGIC_INTERNALS = {"sessions", "mrml_conversion", "install", "segment_writer", "experts", "models", "session",
                   "worker"}


def widget_class(tree) -> ast.ClassDef:
    return next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                and node.name == "MedSegXSlicerWidget")


def logic_calls(function) -> list:
    """Names of ``self.logic.<name>(...)`` calls in a function."""
    return [node.func.attr for node in ast.walk(function) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "logic" and isinstance(node.func.value.value, ast.Name)
            and node.func.value.value.id == "self"]


def test_every_widget_action_is_one_logic_call(widget_source):
    from MedSegXSlicerLib import MedSegXSlicerLogic

    widget = widget_class(widget_source)
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    checked = 0
    for name, function in methods.items():
        calls = logic_calls(function)
        for call in calls:  # getParameterNode: from Slicer's ScriptedLoadableModuleLogic (absent without Qt)
            assert hasattr(MedSegXSlicerLogic, call) or call == "getParameterNode", f"{name} calls self.logic.{call}, which the Logic lacks"
        if name.startswith(("on", "_finish")):
            actions = [c for c in calls if c not in LOGIC_READS]
            assert len(actions) <= 1, f"{name} makes several Logic calls: {actions}"
            checked += bool(actions)
    assert checked >= 12  # the walker found the actions
    used = {node.id for node in ast.walk(widget) if isinstance(node, ast.Name)} | \
        {node.attr for node in ast.walk(widget) if isinstance(node, ast.Attribute)}
    assert not used & LOGIC_INTERNALS, f"the widget reaches past the Logic: {sorted(used & LOGIC_INTERNALS)}"


def test_shortcuts_are_bound_and_documented(widget_source):
    from MedSegXSlicerLib.shortcuts import SHORTCUTS, shortcuts_help

    handlers = next(f for f in widget_class(widget_source).body
                    if isinstance(f, ast.FunctionDef) and f.name == "_shortcutHandlers")
    table = next(node for node in ast.walk(handlers) if isinstance(node, ast.Dict))
    bound = {ast.literal_eval(key): value.attr for key, value in zip(table.keys, table.values)}
    assert set(bound) == {action for action, _key, _what in SHORTCUTS}
    methods = {f.name for f in widget_class(widget_source).body if isinstance(f, ast.FunctionDef)}
    assert set(bound.values()) <= methods
    keys = [key for _action, key, _what in SHORTCUTS]
    assert len(set(keys)) == len(keys)
    assert all(f"<b>{key}</b>" in shortcuts_help() for key in keys)
    help_calls = [node for node in ast.walk(widget_source) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name) and node.func.id == "shortcuts_help"]
    assert help_calls, "the module help text does not list the shortcuts"
