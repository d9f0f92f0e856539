"""The Run page's Export: a run's checkpoint as a standalone model (`python -m graphs.export`'s
own code), zipped in memory for a download.

The run folder (its `run_dir` tag, relative to where it trained: tried from the store's folder
and from here) is used when it is in the store's folder with a checkpoint, as the CLI would;
otherwise the run's MLflow artifacts (graph.yaml and checkpoint/). The files are found through
app/runfiles.py, so a run naming a path outside the store's folder is refused, not read, and
copied into a private folder first: the export reads those copies and nothing else.
"""
from __future__ import annotations

import io
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from app import runfiles, store

FILES = ("graph.yaml", "result.json", "model.safetensors", "state.json")


class ExportFailed(Exception):
    """The run cannot be exported; the message says why (no checkpoint, no graph, ...)."""


@dataclass
class Exported:
    name: str                # the zip's file name
    data: bytes              # the zip
    files: list[str]         # paths inside it
    source: str              # the run folder or "MLflow artifacts"
    note: str | None = None  # why a run folder the run names was not read


def _zip(out: Path) -> tuple[bytes, list[str]]:
    buf, names = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(out.rglob("*")):
            if f.is_file() and not f.is_symlink():
                name = f.relative_to(out).as_posix()
                z.write(f, name)
                names.append(name)
    return buf.getvalue(), names


def zip_name(tags: dict, run_id: str) -> str:
    """The download's file name: the run's name reduced to safe characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tags.get("mlflow.runName") or "").strip(".-")[:80]
    return f"{slug or run_id[:8]}-export.zip"


def _from_artifacts(uri: str, run_id: str, dest: Path, note: str | None) -> dict:
    why = f" ({note})" if note else ""
    graph = runfiles.fetch(uri, run_id, "graph.yaml", dest)
    if graph is None:
        raise ExportFailed(f"run {run_id} has no graph.yaml artifact: it is not a training run{why}")
    found = {"graph.yaml": graph, "result.json": None,
             "model.safetensors": runfiles.fetch(uri, run_id, "checkpoint/model.safetensors", dest),
             "state.json": runfiles.fetch(uri, run_id, "checkpoint/state.json", dest)}
    if found["model.safetensors"] is None:
        raise ExportFailed(f"run {run_id} has no checkpoint: its folder is not in the store's "
                           f"folder on this machine and it logged no checkpoint/ artifact{why}")
    return found


def _copy(found: dict, dest: Path) -> dict:
    """The checked files copied into `dest` (the checkpoint's beside each other, as the export
    reads state.json next to model.safetensors)."""
    (dest / "ckpt").mkdir(parents=True)
    places = {"graph.yaml": dest / "graph.yaml", "result.json": dest / "result.json",
              "model.safetensors": dest / "ckpt" / "model.safetensors",
              "state.json": dest / "ckpt" / "state.json"}
    for k in ("graph.yaml", "result.json", "state.json"):  # small files; the weights may be large
        if found.get(k) is not None and found[k].stat().st_size > runfiles.TEXT_LIMIT:
            raise store.StoreError(f"{k} of the run is {found[k].stat().st_size:,} bytes: too large")
    return {k: shutil.copyfile(found[k], places[k]) if found.get(k) else None for k in FILES}


def export_run(uri: str, run_id: str, formats: str = "standalone") -> Exported:
    """Export one MLflow run to a zip (formats: the CLI's --format list)."""
    tags = store.run_detail(uri, run_id)["tags"]
    with tempfile.TemporaryDirectory(prefix="lm-export-") as tmp:
        try:
            folder, note = runfiles.run_folder(uri, run_id, tags)
            found = (runfiles.checkpoint_files(folder, runfiles.store_folder(uri), run_id)
                     if folder is not None else {})
            source = str(folder)
            if not (found.get("graph.yaml") and found.get("model.safetensors")):
                found = _from_artifacts(uri, run_id, Path(tmp) / "artifacts", note)
                source = "MLflow artifacts"
            copies = _copy(found, Path(tmp) / "run")
        except (store.StoreError, OSError) as e:
            raise ExportFailed(" ".join(str(e).split())) from None
        out = Path(tmp) / "model"
        shown = (str(found["model.safetensors"]) if source != "MLflow artifacts"
                 else "checkpoint/model.safetensors (MLflow artifact)")
        _write(copies, f"MLflow run {run_id} ({source})", shown, out, formats)
        data, names = _zip(out)
    return Exported(zip_name(tags, run_id), data, names, source, note)


def _write(files: dict, label: str, shown: str, out: Path, formats: str) -> None:
    import graphs
    from graphs.errors import GraphError
    from graphs.export import ExportError
    from graphs.export.__main__ import Source, export_source, json_object

    try:
        graph = graphs.load(files["graph.yaml"])
        result = json_object(files["result.json"]) if files["result.json"] else None
        src = Source(graph.resolve() if graph.space() else graph, files["model.safetensors"],
                     result, label, shown=shown)
        export_source(src, out, [f.strip() for f in formats.split(",") if f.strip()])
    except (GraphError, ExportError, OSError, ValueError) as e:
        raise ExportFailed(" ".join(str(e).split())) from None
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line on the page, not a traceback
        raise ExportFailed(f"internal error ({store.brief(e)}); please report it") from None
