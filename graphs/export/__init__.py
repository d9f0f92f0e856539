"""Export a trained (or freshly initialised) graph: `python -m graphs.export`.

    export(plan, state_dict, out_dir, ["standalone", "hf"], meta) -> files written

Formats: `standalone` (graphs/export/standalone.py: a generated model.py needing only PyTorch),
`hf` and `pt2` (graphs/export/hf.py, graphs/export/pt2.py, imported only when asked for). Each
format module has `write(plan, state_dict, out_dir, meta) -> list[Path]`. One format writes into
out_dir itself; several write into out_dir/<format>/ so their config.json files never collide.
Nothing is written outside out_dir: file names are fixed, and the formats write into a private
folder whose files then replace their names in out_dir (see `export`).
`meta` holds what the CLI knows: graph (the resolved graph data), source, checkpoint, size,
cost (graphs.cost.Cost), result (the run's result.json, or None).
May import `blocks` and `graphs`; never `search` (MLflow only in the CLI, for a run id).
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
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
    """out_dir/name for a new file, never anything outside out_dir. Whatever is left at that name
    (a symbolic link, a hard link to a file elsewhere, a FIFO) is removed, not written through."""
    if name in ("", ".", "..") or Path(name).name != name:
        raise ExportError(f"refusing to write {name!r}: not a plain file name")
    path = Path(out_dir) / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    if path.resolve().parent != Path(out_dir).resolve():
        raise ExportError(f"refusing to write {path}: it is outside {out_dir}")
    return path


def _subfolder(out_dir: Path, name: str) -> Path:
    """out_dir/name as a real folder: a link left there is removed, not followed."""
    path = out_dir / name
    if path.is_symlink():
        path.unlink()
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} exists and is not a folder")
    path.mkdir(exist_ok=True)
    return path


def _commit(stage: Path, out_dir: Path, written: list[Path]) -> list[Path]:
    """Move the staged files to their places in out_dir. os.replace swaps the name itself, so a
    link or a hard link planted there is replaced, never written through."""
    moves = []
    for f in dict.fromkeys(written):
        try:
            rel = f.relative_to(stage)
        except ValueError:
            raise ExportError(f"refusing {f}: a format wrote outside its folder") from None
        folder = out_dir
        for part in rel.parts[:-1]:
            folder = _subfolder(folder, part)
        dest = folder / rel.name
        if dest.is_dir() and not dest.is_symlink():
            raise ExportError(f"{dest} is a folder; remove it or choose another --out")
        moves.append((f, dest))
    for f, dest in moves:
        os.replace(f, dest)
    return [dest for _, dest in moves]


def export(plan, state_dict: dict, out_dir: str | Path, formats=("standalone",),
           meta: dict | None = None) -> list[Path]:
    """Write each format (see the module docstring for the layout); returns the files written.

    The formats write into a fresh private folder inside out_dir, whose files then replace their
    names in out_dir: nothing left in out_dir (links, hard links, FIFOs) is followed or written
    through, and a failed export leaves out_dir as it was."""
    formats = list(dict.fromkeys(formats))
    writers = [writer(f) for f in formats]  # fail on an unknown format before writing anything
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        written = []
        for fmt, write in zip(formats, writers):
            dest = stage if len(formats) == 1 else stage / fmt
            dest.mkdir(exist_ok=True)
            written += write(plan, state_dict, dest, dict(meta or {}))
        return _commit(stage, out_dir, [Path(f) for f in written])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
