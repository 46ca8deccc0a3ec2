"""Where the real data and the parity fixtures are (shared by conftest.py and test modules that parametrize over a
fixture's cases at collection time).

``MEDSEGX_SHARED`` moves the whole ../shared folder; ``MEDSEGX_SEGVOL_FIXTURE`` / ``MEDSEGX_MEDSEGX_FIXTURE`` point
the parity tests at another fixture folder made with the same recipe (another volume, modality, orientation or
seed): those tests read every input, prompt, case name, expected statistic and shape from the folder's files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", REPO_ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"
SEGVOL_FIXTURE = Path(os.environ.get("MEDSEGX_SEGVOL_FIXTURE", FIXTURES / "segvol_parity")).resolve()
MEDSEGX_FIXTURE = Path(os.environ.get("MEDSEGX_MEDSEGX_FIXTURE", FIXTURES / "medsegx_parity")).resolve()
REFERENCE_CT = DATA / "ct" / "totalseg_ct.nii.gz"   # the project's real abdominal CT (stored RAS+)


def fixture_record(folder: Path) -> dict:
    """``public/fixtures.json`` of a fixture folder, or {} when the folder is absent (the tests then skip)."""
    path = folder / "public" / "fixtures.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_default_fixture(folder: Path) -> bool:
    """Whether ``folder`` is the fixture shipped beside the data (whose volume is the reference CT)."""
    return folder.resolve().parent == FIXTURES.resolve()
