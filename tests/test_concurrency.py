"""Four worker processes on one study, finishing its trial count with every trial run once,
one MLflow child run per trained trial under one parent run, and no lock error reaching the user.

On SQLite, one `--workers 4` command with Optuna and MLflow in one folder: the workers contend
for both files' locks. On a real PostgreSQL server, the same command started twice with
`--workers 2`, as on two machines: Optuna on the server, MLflow still on one SQLite file (its
contention is the same, and an MLflow database on the server would add a schema migration the CI
budget does not have).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
GPT2 = str(ROOT / "graphs" / "gpt2.yaml")
LLAMA = str(ROOT / "graphs" / "llama.yaml")
WORKERS, TRIALS = 4, 4
# what a lock failure, a storage error or a crash looks like on the user's terminal
TROUBLE = re.compile(r"database is locked|OperationalError|StorageInternalError|Traceback|"
                     r"TrackingWarning|deadlock|exited with code", re.IGNORECASE)


@dataclass
class Outcome:
    folder: Path
    storage: str
    study: str
    returncodes: list[int]
    output: str                 # stdout and stderr of every command, as the user saw them
    seconds: float

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder}/mlflow.db"


def four_workers(tmp: Path, storage: str, study: str, commands: int = 1) -> Outcome:
    """`python -m search.run` on gpt2 and llama at tiny size with four workers in all, split over
    `commands` commands started together (as on several machines). 1024 tokens and one evaluation
    of 2 KiB per trial, so a trial is seconds of work and the stores are what the workers share.
    Each worker stops after the trial it runs when the count is reached: 4 to 7 trials."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")  # four workers share two cores: no thread oversubscription
    cmd = [sys.executable, "-m", "search.run", GPT2, LLAMA, "--size", "tiny", "--trials", str(TRIALS),
           "--trial-tokens", "1024", "--evals", "1", "--eval-bytes", "2048", "--budget", "30m",
           "--workers", str(WORKERS // commands), "--storage", storage, "--study", study,
           "--pruner", "none"]
    t0 = time.time()
    procs = [subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(commands)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    return Outcome(tmp, storage, study, [p.returncode for p in procs], "\n".join(outputs),
                   time.time() - t0)


def check_one_study(run: Outcome, record) -> dict:
    """The assertions both storages share; returns the figures recorded for the run."""
    import optuna
    from mlflow.tracking import MlflowClient

    assert set(run.returncodes) == {0}, run.output[-4000:]
    trouble = sorted({m.group(0) for m in TROUBLE.finditer(run.output)})
    assert not trouble, f"{trouble} in the output:\n{run.output[-4000:]}"

    study = optuna.load_study(study_name=run.study, storage=run.storage)
    ts = study.trials
    states = Counter(t.state.name for t in ts)
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, states
    # the trial count holds: each worker stops after the trial it was running when it was reached
    assert TRIALS <= len(ts) <= TRIALS + WORKERS - 1, states
    assert states["FAIL"] == 0, [t.user_attrs.get("error") for t in ts if t.state.name == "FAIL"]
    retried = [t.number for t in ts if "failed_trial" in t.system_attrs]
    assert not retried                                       # no worker died, no trial re-queued
    pids = Counter(t.user_attrs["pid"] for t in ts)
    assert len(pids) == WORKERS                              # every worker took a share

    trained = [t for t in ts if "mlflow_run_id" in t.user_attrs]
    hashes = [t.user_attrs["graph_hash"] for t in trained]
    assert len(hashes) == len(set(hashes))                   # no concrete graph trained twice
    # workers seeded alike would draw the same start-up trials: each draws its own seed
    twins = [(t.number, t.user_attrs["duplicate_of"]) for t in ts if "duplicate_of" in t.user_attrs]
    assert not twins, twins
    baselines = sorted(t.user_attrs["graph"] for t in ts if t.user_attrs.get("baseline"))
    assert baselines == ["gpt2", "llama"]                    # enqueued once, by one command

    client = MlflowClient(run.tracking_uri)
    exp = client.get_experiment_by_name("playground")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [p.info for p in parents]
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    children = [r for r in runs if r is not parents[0]]
    assert all(c.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for c in children)
    per_trial = Counter(c.data.tags["optuna.trial"] for c in children)
    assert max(per_trial.values()) == 1, per_trial           # no trial ran (or logged) twice
    assert {c.info.run_id: int(c.data.tags["optuna.trial"]) for c in children} == \
        {t.user_attrs["mlflow_run_id"]: t.number for t in trained}  # one child run per trained trial
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all("val/bpb" in c.data.metrics for c in children)

    figures = {"workers": WORKERS, "trials": len(ts), "trained": len(trained),
               "states": dict(states), "trials_per_pid": sorted(pids.values(), reverse=True),
               "retried_trials": len(retried), "child_runs": len(children),
               "seconds": round(run.seconds, 1)}
    for k, v in figures.items():
        record(k, v)
    print(f"{run.storage.split(':')[0]}: {figures}")
    return figures


def test_four_workers_share_sqlite_optuna_and_mlflow_stores(tmp_path, record_property):
    run = four_workers(tmp_path, f"sqlite:///{tmp_path}/optuna.db", "c4")
    check_one_study(run, record_property)


def test_two_commands_of_two_workers_share_a_postgres_study(tmp_path, postgres_url, record_property):
    # the same command on two machines: one study, one set of baselines, one parent run
    run = four_workers(tmp_path, postgres_url, "c4-pg", commands=2)
    check_one_study(run, record_property)


def _open_storage(urls: list, barrier) -> None:
    from search.study_store import storage
    from search.study import StudyConfig

    for url in urls:        # one new database a round; the imports are paid once
        barrier.wait(60)    # every process reaches the empty database at the same moment (a
        # process that failed a round breaks the barrier: the others stop instead of waiting)
        storage(StudyConfig(files=[GPT2], study="race", storage=url))


def test_commands_started_together_on_a_new_postgres_database_all_create_its_schema(postgres_url):
    # The schema race of a new database: each process sees no tables and creates them; without
    # the retry in search.study_store.storage the losers fail with "type studydirection already exists".
    import multiprocessing as mp

    import psycopg2

    base, _, _ = postgres_url.rpartition("/")
    port = int(base.rsplit(":", 1)[1])
    names = [f"race_{round_}" for round_ in range(3)]
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    for name in names:
        conn.cursor().execute(f"CREATE DATABASE {name}")
    conn.close()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_open_storage, args=([f"{base}/{n}" for n in names], barrier))
             for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0] * 6


def _pop_all(url: str, barrier, popped) -> None:
    import optuna

    from search.study_store import storage
    from search.study import StudyConfig
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="queue", storage=storage(
        StudyConfig(files=[GPT2], study="queue", storage=url)))
    barrier.wait()   # every process pops from the full queue at the same moment
    while (trial_id := study._pop_waiting_trial_id()) is not None:   # what study.ask() does first
        popped.put(trial_id)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_workers_popping_enqueued_trials_together_each_get_a_different_one(backend, tmp_path, request):
    """Enqueued trials (the baselines, retries of a killed worker's trial) go to one worker each.
    On SQLite Optuna's own pop let two workers take one (6 processes, 40 trials: 51-58 pops),
    both trained it, and the second one's tell crashed its worker ('Cannot tell a COMPLETE
    trial'; a CI failure of test_four_workers_share_sqlite_optuna_and_mlflow_stores)."""
    import multiprocessing as mp

    import optuna

    from search.study_store import storage
    from search.study import StudyConfig
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/optuna.db"
    else:
        base, _, _ = request.getfixturevalue("postgres_url").rpartition("/")
        import psycopg2
        conn = psycopg2.connect(host="127.0.0.1", port=int(base.rsplit(":", 1)[1]), user="postgres",
                                dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE queue_pop")
        conn.close()
        url = f"{base}/queue_pop"
    study = optuna.create_study(study_name="queue", storage=storage(
        StudyConfig(files=[GPT2], study="queue", storage=url)))
    for i in range(40):
        study.enqueue_trial({"x": i})
    ctx = mp.get_context("spawn")
    barrier, popped = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_pop_all, args=(url, barrier, popped)) for _ in range(6)]
    for p in procs:
        p.start()
    ids = []
    while len(ids) < 40 or any(p.is_alive() for p in procs):
        try:
            ids.append(popped.get(timeout=1))
        except Exception:   # queue.Empty
            if not any(p.is_alive() for p in procs):
                break
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    assert sorted(Counter(ids).values()) == [1] * 40, Counter(ids).most_common(3)
    assert all(t.state == optuna.trial.TrialState.RUNNING and t.datetime_start for t in study.trials)
