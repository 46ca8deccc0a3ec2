"""The console examples of MedSegXSlicer/README.md ("Segment" and "Several structures at once") run as written on
a slicer-core scene holding a CT as "CT" and a box "R" (tiny weights through $MEDSEGX_WEIGHTS, which take the box
too; the "Boxes" example, LiteMedSAM's, is only compiled here). To keep CI short
the CT is the 30-slice crop of the sample CT, so the example's click moves to the liver inside that crop."""
from __future__ import annotations

import re
from pathlib import Path

import slicer

import scene_builders as sb
from scene_builders import imported_weights  # noqa: F401 (fixture)

SMALL_CT_LIVER = "(65.0, 185.0, 151.0)"   # RAS mm, in the liver of the 30-slice crop
README = Path(__file__).resolve().parents[2] / "MedSegXSlicer" / "README.md"


def console_blocks() -> list:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From the Python console"):text.index("## Batch mode")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_segment_and_several_structures_examples_run(slicer_app, data_dir, imported_weights, monkeypatch):
    monkeypatch.setenv("MEDSEGX_WEIGHTS", str(imported_weights))
    ct = slicer.util.loadVolume(str(data_dir / sb.CT_SMALL), properties={"name": "CT"})
    sb.add_roi_on_voxels(slicer_app.scene, ct, (60, 30, 5), (100, 70, 25), name="R")
    blocks = console_blocks()
    assert len(blocks) == 5
    compile(blocks[2], "README box example", "exec")   # LiteMedSAM's: runs in test_litemedsam_in_slicer.py
    namespace = {"slicer": slicer}
    try:
        assert "AddControlPoint(68.0, 185.0, 391.0)" in blocks[0]
        exec(blocks[0].replace("(68.0, 185.0, 391.0)", SMALL_CT_LIVER), namespace)                                   # noqa: S102 - the documented example
        segmentation = namespace["seg"].GetSegmentation()
        assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == \
            ["liver"]                                                # liver refined, kidney undone
        exec(blocks[1], namespace)                                   # noqa: S102
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        assert names[:4] == ["liver", "liver", "spleen", "left kidney"] and names[-2:] == ["pancreas", "stomach"]
    finally:
        namespace["logic"].cleanup()
