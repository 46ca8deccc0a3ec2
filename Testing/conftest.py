"""Shared pytest fixtures: where the real data and the parity fixtures are, and skipping when they are absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSEGX_SHARED", REPO_ROOT.parent / "shared")).resolve()
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data/fixtures live in ../shared beside the checkout "
                    f"(set MEDSEGX_SHARED to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _require(FIXTURES)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI has 2 cores; keep torch from oversubscribing them.
    try:
        import torch
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    yield
