"""A run's files on this machine: its MLflow artifacts and its run folder (the `run_dir` tag),
confined to the tracking store's folder.

A store is data, and data can be hostile: a run's `run_dir` tag, its artifact location, the
`latest` pointer of its folder or a link among its artifacts may name `../../etc/passwd`, an
absolute path or a symbolic link leading elsewhere. The app reads local files only inside the
store's folder (that of a SQLite database, or the folder holding a file store), after following
every link; anything else is refused with `OutsideStore`, naming what the store said, and is
never opened. A tracking server's runs are read through the server only; artifacts at remote
locations (s3:, mlflow-artifacts:, ...) go through MLflow as before.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from app.store import StoreError, brief, client, sqlite_file

TEXT_LIMIT = 4 << 20     # bytes of a text artifact shown on a page (graph.yaml is a few KiB)
POINTER_LIMIT = 300      # bytes of a `latest` pointer read


class OutsideStore(StoreError):
    """A path the store names leads outside the store's folder: refused, not read."""


def store_folder(uri: str) -> Path | None:
    """The folder a local store lives in, links resolved: a SQLite file's folder, or the folder
    holding a file store (the trainer keeps runs/ and mlartifacts/ beside either). None for a
    tracking server."""
    db = sqlite_file(uri)
    if db is not None:
        return Path(os.path.abspath(db)).parent.resolve()
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(unquote(parts.path)).resolve().parent
    if parts.scheme == "" and uri:
        return Path(uri).resolve().parent
    return None


def inside(path: Path, root: Path, what: str) -> Path:
    """`path` with every link followed, or OutsideStore when that is not in `root`."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise OutsideStore(f"{what} leads outside the store's folder {root}: refused, not read")
    return real


def _root(uri: str, what: str) -> Path:
    root = store_folder(uri)
    if root is None:
        raise OutsideStore(f"{what} is a local path, but the store is a tracking server: the app "
                           "reads this machine's files only inside a local store's folder")
    return root


def artifact_folder(uri: str, run_id: str) -> Path | None:
    """The run's artifact folder when its artifacts are local files (checked to be in the store's
    folder; it may not exist yet), None when MLflow reads them from elsewhere (s3:, a server)."""
    try:
        location = client(uri).get_run(run_id).info.artifact_uri or ""
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot read run {run_id}: {brief(e)}") from None
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return None
    what = f"run {run_id}'s artifact location {location!r}"
    if parts.netloc not in ("", "localhost"):
        raise OutsideStore(f"{what} names another host: refused")
    path = Path(unquote(parts.path) if parts.scheme else location)
    return inside(path if path.is_absolute() else Path.cwd() / path, _root(uri, what), what)


def _local_entry(folder: Path, root: Path, path: Path, run_id: str) -> dict:
    rel = path.relative_to(folder).as_posix()
    try:
        real = inside(path, root, f"artifact {rel} of run {run_id}")
    except OutsideStore:
        return {"path": rel, "bytes": None, "refused": "a link leading outside the store"}
    return {"path": rel, "bytes": real.stat().st_size if real.is_file() else None}


def artifacts(uri: str, run_id: str) -> list[dict]:
    """Every artifact file of a run (recursively): path and size in bytes; a link leading out of
    the store is listed with `refused` set, and neither followed nor measured."""
    folder = artifact_folder(uri, run_id)
    if folder is None:
        return _remote_artifacts(uri, run_id)
    root, out = store_folder(uri), []
    for dirpath, dirs, files in os.walk(folder):  # links to folders are listed, not descended
        here = Path(dirpath)
        names = files + [d for d in dirs if (here / d).is_symlink()]
        out += [_local_entry(folder, root, here / n, run_id) for n in names]
    return sorted(out, key=lambda a: a["path"])


def _remote_artifacts(uri: str, run_id: str) -> list[dict]:
    c = client(uri)
    out, todo = [], [None]
    try:
        while todo:
            for f in c.list_artifacts(run_id, todo.pop()):
                if f.is_dir:
                    todo.append(f.path)
                else:
                    out.append({"path": f.path, "bytes": f.file_size})
    except Exception as e:  # noqa: BLE001
        raise StoreError(f"cannot list the artifacts of run {run_id}: {brief(e)}") from None
    return sorted(out, key=lambda a: a["path"])


def fetch(uri: str, run_id: str, path: str, dest: Path) -> Path | None:
    """An artifact file: in place when local (links followed, and checked to stay in the store's
    folder), else downloaded by MLflow into `dest`. None when the run has no such artifact."""
    folder = artifact_folder(uri, run_id)
    if folder is not None:
        real = inside(folder / path, store_folder(uri), f"artifact {path} of run {run_id}")
        return real if real.is_file() else None
    try:
        got = Path(client(uri).download_artifacts(run_id, path, str(dest)))
    except StoreError:
        raise
    except Exception:  # noqa: BLE001 - a missing artifact is an ordinary case
        return None
    return got if got.is_file() else None


def read_text(path: Path, what: str, limit: int = TEXT_LIMIT) -> str:
    """A small text file, refusing one too large to show."""
    size = path.stat().st_size
    if size > limit:
        raise StoreError(f"{what} is {size:,} bytes, more than the {limit:,} shown")
    return path.read_text(errors="replace")


def artifact_text(uri: str, run_id: str, path: str) -> str | None:
    """A small text artifact (graph.yaml, run_config.json), or None when the run has none."""
    with tempfile.TemporaryDirectory(prefix="lm-artifact-") as tmp:
        f = fetch(uri, run_id, path, Path(tmp))
        return None if f is None else read_text(f, f"artifact {path} of run {run_id}")


def run_folder(uri: str, run_id: str, tags: dict) -> tuple[Path | None, str | None]:
    """(the run's folder, if it is in the store's folder with a graph.yaml, else None; why a
    folder the run names was not read, else None). The `run_dir` tag is relative to where the run
    trained: it is tried from the store's folder and from the working directory."""
    named = tags.get("run_dir")
    root = store_folder(uri)
    if not named or root is None:
        return None, None
    p = Path(named)
    refused = None
    for cand in dict.fromkeys([p] if p.is_absolute() else [root / p, Path.cwd() / p]):
        try:
            real = inside(cand, root, f"run {run_id}'s folder (tag run_dir={named!r})")
        except OutsideStore as e:
            refused = str(e)
            continue
        if real.is_dir() and (real / "graph.yaml").exists():
            return real, None
    return None, refused


def checkpoint_files(folder: Path, root: Path, run_id: str) -> dict[str, Path | None]:
    """graph.yaml and result.json of a run folder, and model.safetensors and state.json of the
    checkpoint its `latest` pointer names, each checked to be in the store's folder (None where
    the run has none)."""
    def check(p: Path, what: str) -> Path | None:
        if not p.is_symlink() and not p.exists():
            return None
        return inside(p, root, f"{what} of run {run_id}")

    files = {"graph.yaml": check(folder / "graph.yaml", "the graph.yaml"),
             "result.json": check(folder / "result.json", "the result.json")}
    pointer = check(folder / "latest", "the checkpoint pointer 'latest'")
    name = read_text(pointer, "latest", POINTER_LIMIT).strip() if pointer else ""
    if pointer and (name in ("", ".", "..") or Path(name).name != name):
        raise OutsideStore(f"run {run_id}'s checkpoint pointer names {name!r}, not a step folder "
                           "of the run: refused, not read")
    step = check(folder / name, f"checkpoint {name}") if name else None
    files["model.safetensors"] = check(step / "model.safetensors", "the checkpoint") if step else None
    files["state.json"] = check(step / "state.json", "the checkpoint's state.json") if step else None
    return files
