"""`python -m graphs.export (RUN_DIR | RUN_ID | FILE --checkpoint CKPT | FILE --init-seed N) --out DIR`

Exports a training run (a run folder, or the MLflow run id of one: its resolved graph.yaml, latest
checkpoint and result.json), a graph file with a checkpoint, or a graph file with freshly
initialised weights, as a standalone PyTorch model (default) and/or the hf and pt2 formats.
Exit 0 done, 2 bad input (one line, no traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import graphs
from graphs.cost import analyse
from graphs.errors import GraphError
from graphs.export import FORMATS, ExportError, export, prepare_out, writer


@dataclass
class Source:
    graph: graphs.Graph
    checkpoint: Path | None      # model.safetensors to load; None with --init-seed
    result: dict | None          # the run's result.json
    label: str
    size: str | None = None      # None for a run folder: its graph.yaml is already sized
    shown: str | None = None     # the checkpoint as the model card names it (default: its path)


def _checkpoint_file(path: Path) -> Path:
    """A step folder or a model.safetensors file -> the model.safetensors file."""
    f = path / "model.safetensors" if path.is_dir() else path
    if not f.is_file():
        raise ExportError(f"{path}: no checkpoint there (expected a step_* folder or model.safetensors)")
    return f


def latest_checkpoint(run: Path) -> Path | None:
    """The step folder the run's `latest` pointer names (the layout of search/checkpoint.py, read
    here rather than imported: graphs never import search). The pointer holds a folder name of
    the run; anything else (a path, `..`) is refused rather than followed out of the run."""
    pointer = run / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace")[:300].strip()
    if name in ("", ".", "..") or Path(name).name != name:
        raise ExportError(f"{pointer} names {name!r}, not a step folder of the run")
    path = run / name
    return path if path.is_dir() else None


def json_object(path: Path) -> dict | None:
    """A JSON file holding an object (result.json, state.json), None when there is no file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError included
        raise ExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def from_run(run: Path, args) -> Source:
    if args.size or args.sets or args.init_seed is not None:
        raise ExportError(f"{run} is a run folder whose graph.yaml is already resolved; "
                          "--size, --set and --init-seed apply to a graph FILE")
    if not (run / "graph.yaml").is_file():
        raise ExportError(f"{run} is not a run folder: it has no graph.yaml")
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run)
    if ckpt is None:
        raise ExportError(f"{run} has no checkpoint (no 'latest' pointer); pass --checkpoint")
    result = json_object(run / "result.json")
    return Source(graphs.load(run / "graph.yaml"), _checkpoint_file(ckpt), result, str(run))


def run_dir_of(run_id: str) -> Path:
    """The run folder an MLflow run recorded in its `run_dir` tag (relative to where it trained)."""
    # search.track's default store, restated here because graphs never import search
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():  # MLflow would create an empty store here
        raise ExportError(f"{run_id}: no such file or folder, and no MLflow store at {db} "
                          "(set MLFLOW_TRACKING_URI)")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        tags = MlflowClient(uri).get_run(run_id).data.tags
    except MlflowException as e:
        raise ExportError(f"MLflow run {run_id}: {e.message}") from None
    if not tags.get("run_dir") or not Path(tags["run_dir"]).is_dir():
        raise ExportError(f"MLflow run {run_id}: its run folder {tags.get('run_dir')!r} is not here")
    return Path(tags["run_dir"])


def from_file(path: Path, args) -> Source:
    if (args.checkpoint is None) == (args.init_seed is None):
        raise ExportError(f"{path}: a graph file needs exactly one of --checkpoint CKPT or --init-seed N")
    graph = graphs.load(path, args.size, args.sets).resolve()
    ckpt = _checkpoint_file(Path(args.checkpoint)) if args.checkpoint else None
    return Source(graph, ckpt, None, str(path), graph.size)


def _state_hash(ckpt: Path) -> str | None:
    return (json_object(ckpt.parent / "state.json") or {}).get("graph_hash")


def load_weights(plan, src: Source, seed: int | None) -> dict:
    """The playground model's state_dict: the checkpoint loaded strictly, or an init from `seed`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if src.checkpoint is None:
        return graphs.build(plan, seed=seed).state_dict()
    trained = _state_hash(src.checkpoint)
    if trained is not None and trained != plan.hash:
        raise ExportError(f"{src.checkpoint} was trained from graph {trained}, not {plan.hash}; "
                          "pass the same graph, --size and --set as the run")
    model = graphs.build(plan, seed=None)
    try:
        load_model(model, str(src.checkpoint), strict=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ExportError(f"{src.checkpoint} does not fit the graph: {msg}") from None
    return model.state_dict()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m graphs.export", description=__doc__.split("\n\n")[1])
    ap.add_argument("source", metavar="RUN_DIR|RUN_ID|FILE",
                    help="a run folder (runs/...), an MLflow run id (MLFLOW_TRACKING_URI, default "
                         "./mlflow.db) or a graph file")
    ap.add_argument("--checkpoint", metavar="CKPT", help="a step_* folder or model.safetensors")
    ap.add_argument("--init-seed", type=int, metavar="N", help="random weights from this seed")
    ap.add_argument("--size", help="a size declared in the graph file")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", dest="sets",
                    help="override a variable or path, as in search.train")
    ap.add_argument("--out", required=True, metavar="DIR")
    ap.add_argument("--format", default="standalone", help=f"comma list of {', '.join(FORMATS)}")
    ap.add_argument("--force", action="store_true", help="write into a non-empty --out")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    for f in formats:
        writer(f)  # an unknown or missing format fails before any work
    path = Path(args.source)
    if not path.exists() and re.fullmatch(r"[0-9a-f]{32}", args.source):
        path = run_dir_of(args.source)
    if not path.exists():
        raise ExportError(f"{path}: no such file or folder")
    src = from_run(path, args) if path.is_dir() else from_file(path, args)
    return export_source(src, args.out, formats, args.force, args.init_seed)


def export_source(src: Source, out_dir: str | Path, formats: list[str], force: bool = False,
                  init_seed: int | None = None) -> list[Path]:
    """Load the weights of `src` and write `formats` into `out_dir` (the app calls this too)."""
    plan = graphs.elaborate(src.graph)
    state = load_weights(plan, src, init_seed)
    existed = Path(out_dir).exists()
    out = prepare_out(out_dir, force)
    shown = src.shown or (str(src.checkpoint) if src.checkpoint else None)
    meta = {"graph": src.graph.data, "source": src.label, "size": src.size, "cost": analyse(plan),
            "checkpoint": shown, "result": src.result, "init_seed": init_seed}
    try:
        return export(plan, state, out, formats, meta)
    except BaseException:
        if not existed and not any(out.iterdir()):  # leave no empty folder behind a refusal
            out.rmdir()
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = run(args)
    except GraphError as e:
        print(e, file=sys.stderr)
        return 2
    except (ExportError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours, not the user's: say so without a traceback
        if args.debug:
            raise
        print(f"internal error ({type(e).__name__}: {e}); please report it, or rerun with --debug",
              file=sys.stderr)
        return 1
    print(f"wrote {len(files)} files to {Path(args.out).resolve()}:")
    for f in files:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
