"""Shared fixtures. GPU tests (`@pytest.mark.gpu`) are skipped where CUDA is missing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Without a GPU, Triton kernels of our own (blocks/hyper_triton.py) run in Triton's CPU
# interpreter: it is chosen when a kernel is decorated, so it is set before any test imports one.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
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


@dataclass
class DefaultStudy:
    """The outcome of `python -m search.run` with no arguments, run once per test session."""
    folder: Path            # its working directory: mlflow.db, optuna.db, studies/ngpt-tiny/
    returncode: int
    stdout: str
    stderr: str
    seconds: float          # wall time, start-up included

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder}/mlflow.db"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.folder}/optuna.db"


@pytest.fixture(scope="session")
def default_study(tmp_path_factory) -> DefaultStudy:
    """The real default study (ngpt tiny, about 4 minutes on the CPU machine), shared by the test of
    its acceptance and by the app's tests, which read the store it leaves."""
    tmp = tmp_path_factory.mktemp("default-study")
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "search.run"], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=900)
    return DefaultStudy(tmp, out.returncode, out.stdout, out.stderr, time.time() - t0)


def logits_and_loss(model, idx, targets):
    """A graph model's logits and loss on the same tokens. With a fused loss (linear_cross_entropy,
    the default of gpt2.yaml, llama.yaml and hyper.yaml) forward returns no logits when it is given
    targets; they then come from a second call without them."""
    logits, loss = model(idx, targets)
    return (model(idx)[0] if logits is None else logits), loss
