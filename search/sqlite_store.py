"""SQLite MLflow stores made safely: created whole or not at all (`create_sqlite_store`), under a
lock that serialises our own processes setting one up (`store_lock`). Used by the tracker
(search.track_store) and by the app (app/store.py). Nothing here imports `mlflow` at module
level."""
from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from pathlib import Path

SQLITE_TIMEOUT_S = 30  # sqlite3 busy timeout, also covering MLflow's schema migration


def sqlite_path(uri: str) -> Path | None:
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
    return None if path in ("", ":memory:") else Path(path)


def create_sqlite_store(uri: str) -> None:
    """Make a SQLite store that does not exist yet whole or not at all: its tables are created
    and migrated in a temporary file next to it, which then takes the store's name (a hard link:
    a store another program made meanwhile stays). MLflow does this in place, in some forty
    migrations whose DDL SQLite does not roll back: a process killed inside one
    (tests/test_crash.py kills a search at its start) left tables its version stamp does not
    know of, and every later command failed ("table trace_metrics already exists"). Called under
    `store_lock`, so what a killed process left (the temporary file, its journal, or its second
    name after the link) is nobody's and is removed first. On a file system without hard links
    MLflow creates the store in place, as before."""
    db = sqlite_path(uri)
    if db is None:
        return
    if db.parent.is_dir():
        for old in db.parent.glob(f".{glob.escape(db.name)}.*.creating*"):
            old.unlink(missing_ok=True)
    if db.exists():
        return
    from sqlalchemy import create_engine

    try:
        from mlflow.store.db.utils import _initialize_tables
    except ImportError:   # moved in another MLflow: it creates the store in place, as before
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.parent / f".{db.name}.{os.getpid()}.creating"
    engine = create_engine(f"sqlite:///{tmp}", connect_args={"timeout": SQLITE_TIMEOUT_S})
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    try:
        os.link(tmp, db)
    except OSError:   # made meanwhile (FileExistsError), or no hard links here
        pass
    finally:
        tmp.unlink(missing_ok=True)


def ensure_sqlite_store(uri: str) -> None:
    """`create_sqlite_store` under the store's lock, for readers that would otherwise let MLflow
    create a missing store in place (the app, at every query): a store that exists is left as
    it is, without the lock."""
    db = sqlite_path(uri)
    if db is None or db.exists():
        return
    with store_lock(uri):
        create_sqlite_store(uri)


@contextmanager
def store_lock(uri: str):
    """Exclusive across processes while one of them sets up a SQLite store (POSIX only). It locks
    the database's folder: no lock file to leave behind, and never the database file itself,
    whose closing would drop SQLite's own locks in this process."""
    db = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # Windows: retries only
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
