"""Shared fixtures. GPU tests (`@pytest.mark.gpu`) are skipped where CUDA is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
GRAPHS = sorted((ROOT / "graphs").glob("*.yaml"))
SKETCHES = sorted((ROOT / "docs" / "sketches").glob("*.yaml"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty database `optuna`; its SQLAlchemy URL.

    Fails (never skips) when the server binaries or the driver are missing: the README's test
    command installs them, and a skip would hide a missing install step.
    """
    from pg import PostgresError, PostgresServer  # tests/pg.py

    try:
        server = PostgresServer().start()
    except PostgresError as e:
        problem = str(e)
    else:
        problem = None
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        server.create_database("optuna")
        yield server.url("optuna")
    finally:
        server.stop()
