"""The module's Slicer self-test (MedSegXSlicerTest), run here on slicer-core so its code is exercised in CI too.

Inside Slicer it runs through CTest with the real application; here the same test methods run on the real MRML
scene of the ``slicer_app`` fixture (no Qt: only the Logic is involved)."""
from __future__ import annotations

import scene_builders  # noqa: F401 - puts the module folder on sys.path, as Slicer does


def test_module_self_test_passes(slicer_app):
    import MedSegXSlicer

    result = MedSegXSlicer.MedSegXSlicerTest("runTest").run()
    assert result.wasSuccessful(), [str(e[1]) for e in result.errors + result.failures]
    assert result.testsRun == 1
