"""The SegVol parity tests read everything from their fixture folder: pointed at a folder made the same way from
another volume (an MR stored LPS, 20 slices: another modality, orientation, crop offset, window count), they run
and pass unchanged. The folder holds our engine's outputs (Testing/swap_fixture.py; the official code is not
installed here), so this checks the tests' decoupling, not parity; the public fixture checks parity."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parents[1]
PARITY_MODULES = ["test_pipeline_parity.py", "test_preprocessing_parity.py", "test_model_parity.py"]


@pytest.mark.slow
def test_parity_tests_pass_on_a_fixture_made_from_another_volume(tmp_path, data_dir, segvol_fixture):
    sys.path.insert(0, str(TESTING))
    from swap_fixture import make

    folder = make(tmp_path / "swap", data_dir / "mri" / "totalseg_mr.nii.gz",
                  data_dir / "mri" / "totalseg_mr_labels.nii.gz")
    env = dict(os.environ, MEDSEGX_SEGVOL_FIXTURE=str(folder))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "not hf_style and not github_style", *(str(TESTING / "engine" / m) for m in PARITY_MODULES)],
                          cwd=TESTING.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
