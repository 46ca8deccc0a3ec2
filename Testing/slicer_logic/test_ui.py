"""The module's Qt Designer file and build files, checked without Qt: the .ui parses, every widget the Widget code
uses exists in it, parameter-node bindings name real parameters, and CMake installs every script and resource."""
from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegXSlicer"
RESOURCES_DIR = MODULE_DIR.parent / "Resources"
UI_FILE = RESOURCES_DIR / "UI" / "MedSegXSlicer.ui"
WIDGET_FILE = MODULE_DIR / "MedSegXSlicer.py"
QT_CLASSES = {"QWidget", "QLabel", "QLineEdit", "QPushButton", "QCheckBox", "QComboBox", "QProgressBar"}


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


def test_icon_is_a_128_pixel_png():
    header = (RESOURCES_DIR / "Icons" / "MedSegXSlicer.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    assert struct.unpack(">II", header[16:24]) == (128, 128)
