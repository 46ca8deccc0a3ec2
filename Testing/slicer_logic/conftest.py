"""Fixtures for tests that run Slicer code on a real MRML scene, without the Slicer application.

PyPI ``slicer-core`` is Slicer's own C++ core (MRML, module logics, storage nodes, ``slicer/util.py``) without Qt.
``slicer_app`` gives each test a real scene set up as Slicer's application does at startup (see
../shared/reference/slicer_core_harness.py): the application logic, the colour logic with Slicer's default colour
tables, the Volumes, Segmentations and Markups logics, and the shim ``slicer.util`` needs (``slicer.mrmlScene``,
``slicer.modules.<name>.logic()``, ``slicer.app.coreIOManager()``), so ``slicer.util.loadVolume``,
``loadSegmentation``, ``saveNode``, ``arrayFromVolume``, ``arrayFromSegmentBinaryLabelmap`` ... work unchanged.

The application is built once per session (importing slicer and creating the logics takes about 2 s); the scene
is cleared before and after every test, so each test starts from an empty scene holding only Slicer's singleton
default colour tables. The setup itself is the module's own ``MedSegXSlicerLib.standalone`` (the same code the
batch mode runs on plain Python), so tests exercise what users run.

Usage::

    def test_something(slicer_app, data_dir):
        volume_node = slicer.util.loadVolume(str(data_dir / "ct/totalseg_ct_small.nii.gz"))
        segmentation_node = slicer_app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        slicer_app.segmentations.ImportLabelmapToSegmentationNode(...)

When slicer-core is not installed, the tests in this folder are not collected (they need real MRML to mean
anything) and a note says so.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegXSlicer"
HAVE_SLICER_CORE = importlib.util.find_spec("slicer") is not None and importlib.util.find_spec("vtk") is not None

if not HAVE_SLICER_CORE:
    collect_ignore_glob = ["test_*.py"]  # noqa: F841 (read by pytest)


def pytest_report_header(config):
    if not HAVE_SLICER_CORE:
        return "Slicer-logic tests skipped: slicer-core is not installed (pip install 'medsegx-core[test]')"
    return None


SHIM_ATTRIBUTES = ("mrmlScene", "modules", "app")


@pytest.fixture(scope="session")
def _slicer_application():
    """One application (scene + logics) for the session; the shim is removed at the end."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))  # as Slicer puts a scripted module's folder on sys.path
    import slicer
    from MedSegXSlicerLib import standalone

    application = standalone.make_application()
    yield application, standalone
    for attribute in SHIM_ATTRIBUTES:
        if hasattr(slicer, attribute):
            delattr(slicer, attribute)


@pytest.fixture
def slicer_app(_slicer_application):
    """A cleared real MRML scene with Slicer's module logics and the ``slicer.util`` shim installed.

    Attributes: ``scene``, ``app_logic``, ``volumes``, ``segmentations``, ``markups``, ``colors`` (the logics),
    ``logics`` (by Slicer's module name), ``slicer`` and ``util`` (the modules).
    """
    import slicer

    application, standalone = _slicer_application
    application.scene.Clear(0)  # 0: keep singletons (the default colour tables); remove everything else
    standalone.install_application(application)  # again: a previous test may have pointed the shim elsewhere
    logics = application.logics
    yield types.SimpleNamespace(scene=application.scene, app_logic=application.app_logic, logics=logics,
                                volumes=logics["Volumes"], segmentations=logics["Segmentations"],
                                markups=logics["Markups"], colors=application.app_logic.GetColorLogic(),
                                slicer=slicer, util=slicer.util)
    application.scene.Clear(0)
