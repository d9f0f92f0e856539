"""Export a trained (or freshly initialised) graph: `python -m graphs.export`.

    export(plan, state_dict, out_dir, ["standalone", "hf"], meta) -> files written

Formats: `standalone` (graphs/export/standalone.py: a generated model.py needing only PyTorch),
`hf` and `pt2` (graphs/export/hf.py, graphs/export/pt2.py, imported only when asked for). Each
format module has `write(plan, state_dict, out_dir, meta) -> list[Path]`. One format writes into
out_dir itself; several write into out_dir/<format>/ so their config.json files never collide.
`meta` holds what the CLI knows: graph (the resolved graph data), source, checkpoint, size,
cost (graphs.cost.Cost), result (the run's result.json, or None).
May import `blocks` and `graphs`; never `search` (MLflow only in the CLI, for a run id).
"""
from __future__ import annotations

import importlib
from pathlib import Path

FORMATS = ("standalone", "hf", "pt2")


class ExportError(Exception):
    """A graph, checkpoint or output folder that cannot be exported; the message says why."""


def writer(fmt: str):
    """The `write` function of a format, imported on first use."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    try:
        module = importlib.import_module(f"graphs.export.{fmt}")
    except ModuleNotFoundError as e:
        if e.name != f"graphs.export.{fmt}":
            raise
        raise ExportError(f"format {fmt} is not available yet") from None
    return module.write


def prepare_out(out_dir: str | Path, force: bool = False) -> Path:
    """The resolved output folder; refuses a non-empty one unless `force`."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; choose another --out or pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def target(out_dir: Path, name: str) -> Path:
    """out_dir/name, never anything outside out_dir: a symlink left there is removed, not followed."""
    path = Path(out_dir) / name
    if path.is_symlink():
        path.unlink()
    if path.resolve().parent != Path(out_dir).resolve():
        raise ExportError(f"refusing to write {path}: it is outside {out_dir}")
    return path


def export(plan, state_dict: dict, out_dir: str | Path, formats=("standalone",),
           meta: dict | None = None) -> list[Path]:
    """Write each format (see the module docstring for the layout); returns the files written."""
    formats = list(dict.fromkeys(formats))
    writers = [writer(f) for f in formats]  # fail on an unknown format before writing anything
    out_dir = Path(out_dir).resolve()
    written = []
    for fmt, write in zip(formats, writers):
        dest = out_dir if len(formats) == 1 else out_dir / fmt
        dest.mkdir(parents=True, exist_ok=True)
        written += write(plan, state_dict, dest, dict(meta or {}))
    return written
