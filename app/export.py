"""The Run page's Export: a run's checkpoint as a standalone model (`python -m graphs.export`'s
own code), zipped in memory for a download.

The run folder (its `run_dir` tag, relative to where it trained: tried from here and from the
SQLite store's folder) is used when it is on this machine, as the CLI does; otherwise the run's
MLflow artifacts (graph.yaml and checkpoint/) are downloaded and exported the same way.
"""
from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from app import store


class ExportFailed(Exception):
    """The run cannot be exported; the message says why (no checkpoint, no graph, ...)."""


@dataclass
class Exported:
    name: str            # the zip's file name
    data: bytes          # the zip
    files: list[str]     # paths inside it
    source: str          # the run folder or "MLflow artifacts"


def run_folder(uri: str, tags: dict) -> Path | None:
    """The run's folder on this machine, if it is here with a graph and a checkpoint."""
    rel = tags.get("run_dir")
    if not rel:
        return None
    db = store.sqlite_file(uri)
    for base in [Path.cwd()] + ([db.parent] if db is not None else []):
        p = Path(rel) if Path(rel).is_absolute() else base / rel
        if (p / "graph.yaml").is_file() and (p / "latest").is_file():
            return p
    return None


def _zip(out: Path) -> tuple[bytes, list[str]]:
    buf, names = io.BytesIO(), []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(out.rglob("*")):
            if f.is_file():
                name = str(f.relative_to(out))
                z.write(f, name)
                names.append(name)
    return buf.getvalue(), names


def export_run(uri: str, run_id: str, formats: str = "standalone") -> Exported:
    """Export one MLflow run to a zip (formats: the CLI's --format list)."""
    from graphs.errors import GraphError
    from graphs.export import ExportError
    from graphs.export.__main__ import parse_args, run

    tags = store.run_detail(uri, run_id)["tags"]
    with tempfile.TemporaryDirectory(prefix="lm-export-") as tmp:
        folder = run_folder(uri, tags)
        if folder is not None:
            args, source = [str(folder)], str(folder)
        else:
            args, source = _from_artifacts(uri, run_id, Path(tmp) / "artifacts"), "MLflow artifacts"
        out = Path(tmp) / "model"
        try:
            run(parse_args(args + ["--out", str(out), "--format", formats]))
        except (GraphError, ExportError, OSError, ValueError) as e:
            raise ExportFailed(" ".join(str(e).split())) from None
        data, names = _zip(out)
    slug = (tags.get("mlflow.runName") or run_id[:8]).replace("/", "-")
    return Exported(f"{slug}-export.zip", data, names, source)


def _from_artifacts(uri: str, run_id: str, dest: Path) -> list[str]:
    dest.mkdir(parents=True)
    names = {a["path"] for a in store.artifacts(uri, run_id)}
    if "graph.yaml" not in names:
        raise ExportFailed(f"run {run_id} has no graph.yaml artifact: it is not a training run")
    if "checkpoint/model.safetensors" not in names:
        raise ExportFailed(f"run {run_id} has no checkpoint (its folder is not on this machine and "
                           "it logged no checkpoint/ artifact)")
    graph = store.download(uri, run_id, "graph.yaml", str(dest))
    ckpt = store.download(uri, run_id, "checkpoint", str(dest))
    return [str(graph), "--checkpoint", str(Path(ckpt) / "model.safetensors")]
