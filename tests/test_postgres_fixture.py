"""The `postgres_url` fixture: a real PostgreSQL on loopback, used through SQLAlchemy and by Optuna
workers in two processes sharing one study."""
from __future__ import annotations

import multiprocessing
import uuid

import sqlalchemy as sa


def test_sqlalchemy_round_trip(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    assert postgres_url.endswith("/optuna")
    engine = sa.create_engine(postgres_url)
    try:
        table = f"t_{uuid.uuid4().hex[:8]}"
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE TABLE {table} (id serial PRIMARY KEY, name text NOT NULL)"))
            conn.execute(sa.text(f"INSERT INTO {table} (name) VALUES (:a), (:b)"),
                         {"a": "gpt2", "b": "llama"})
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT id, name FROM {table} ORDER BY id")).all()
            assert [tuple(r) for r in rows] == [(1, "gpt2"), (2, "llama")]
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "optuna"
            assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
    finally:
        engine.dispose()


def _objective(trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    return x * x


def _worker(url: str, study_name: str, barrier) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=url)
    barrier.wait(timeout=60)  # both workers optimize at the same time
    study.optimize(_objective, n_trials=3)


def test_optuna_study_shared_by_two_processes(postgres_url):
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(postgres_url)
    name = f"shared-{uuid.uuid4().hex[:8]}"
    optuna.create_study(study_name=name, storage=storage, direction="minimize")

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(postgres_url, name, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.value == t.params["x"] ** 2 for t in trials)
    storage.engine.dispose()
