"""Shared pytest fixtures: where the real data and the parity fixtures are, and skipping when they are absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixture_paths import DATA, FIXTURES, MEDSEGX_FIXTURE, REFERENCE_CT, SEGVOL_FIXTURE, fixture_record


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


@pytest.fixture(scope="session")
def reference_ct() -> Path:
    """The real abdominal CT most engine tests run on (the SegVol fixture's volume; stored RAS+)."""
    return _require(REFERENCE_CT)


@pytest.fixture(scope="session")
def segvol_fixture() -> Path:
    """The SegVol parity fixture folder (``$MEDSEGX_SEGVOL_FIXTURE`` swaps in another made the same way)."""
    return _require(SEGVOL_FIXTURE)


@pytest.fixture(scope="session")
def medsegx_fixture() -> Path:
    """The MedSegX parity fixture folder (``$MEDSEGX_MEDSEGX_FIXTURE`` swaps in another made the same way)."""
    return _require(MEDSEGX_FIXTURE)


@pytest.fixture(scope="session")
def medsegx_public(medsegx_fixture) -> Path:
    return medsegx_fixture / "public"


@pytest.fixture(scope="session")
def medsegx_record(medsegx_fixture) -> dict:
    """Its ``public/fixtures.json``."""
    return fixture_record(medsegx_fixture)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny-model forwards (``pytestmark = pytest.mark.usefixtures(
    "one_torch_thread")``): a second thread only adds synchronisation, which on a loaded 2-core runner made each
    forward 30-50x slower (0.1 s -> 5 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # CI has 2 cores; keep torch from oversubscribing them.
    try:
        import torch
        # under pytest-xdist the workers share the cores: one thread each on a 2-core runner
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))
    except ImportError:
        pass
    yield
