"""Checkpoints that are never half-written and load nothing but tensors.

A checkpoint is a folder `step_000123/` holding `model.safetensors` (tied weights stored once),
`optimizer.safetensors` + `optimizer.json` (the AdamW state, flattened), `rng.safetensors` and
`state.json` (step, tokens, elapsed times, the data loader's position). A run that is never
resumed (a search trial: a retried trial starts afresh) writes no optimizer state, two thirds of
an AdamW checkpoint; its `state.json` says `"weights_only": true` and `load` refuses to resume
from it. A checkpoint is written into a temporary folder, fsynced, renamed into place, and only
then does the small `latest` file (replaced atomically) point at it; a crash at any moment
leaves the previous checkpoint intact. Old checkpoints are renamed to a temporary name before
they are deleted, so a `step_*` folder is always whole. Test hook:
PLAYGROUND_CHECKPOINT_PAUSE=SECONDS sleeps at each stage of a write (after each file, before each
rename) so tests/test_crash.py can land a kill -9 inside one; unset, it does nothing.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

KEEP = 2


class CheckpointError(Exception):
    """A checkpoint that is missing, truncated or does not fit the model."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, file too large, ...); nothing of it is left
    behind and the previous checkpoint is intact. `errno` is the operating system's error."""


def _write_failure(e: BaseException, name: str, run_dir: Path) -> CheckpointWriteError:
    """safetensors reports a failed write as its own error type, with the OS error number in
    the text ('... (os error 28)'); OSError carries it as errno."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
    prev = latest(run_dir)
    return CheckpointWriteError(code, f"could not write checkpoint {name} in {run_dir}: "
                                      f"{os.strerror(code)}; the previous checkpoint "
                                      f"({prev.name if prev else 'none'}) is intact")


def _pause() -> None:
    """The test hook of the module docstring."""
    seconds = os.environ.get("PLAYGROUND_CHECKPOINT_PAUSE")
    if seconds:
        time.sleep(float(seconds))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (safetensors) and plain JSON."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, state: dict) -> Path:
    """Write checkpoint `step_<state['step']>` atomically and point `latest` at it; without
    `opt`, a weights-only one (no optimizer state: it can be exported, not resumed)."""
    run_dir = Path(run_dir)
    if opt is None:
        state = {**state, "weights_only": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=run_dir))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        _pause()
        if opt is not None:
            tensors, meta = _optimizer_tensors(opt)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            _write_json(tmp / "optimizer.json", meta)
        _pause()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        _write_json(tmp / "state.json", state)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _pause()
        final = run_dir / name
        if final.exists():  # the same step again, after a resume
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise _write_failure(e, name, run_dir) from e
        raise
    _pause()
    pointer = run_dir / ".latest.tmp"
    pointer.write_text(name + "\n")
    _pause()
    os.replace(pointer, run_dir / "latest")
    _fsync_dir(run_dir)
    _pause()
    _prune(run_dir, keep={name})
    return final


def _prune(run_dir: Path, keep: set) -> None:
    for p in run_dir.glob(".step_*"):  # temporary folders of a crashed write or deletion
        shutil.rmtree(p, ignore_errors=True)
    ckpts = sorted(p for p in run_dir.glob("step_*") if p.is_dir())
    for p in ckpts[:-KEEP]:
        if p.name not in keep:
            _discard(p)


def _discard(path: Path) -> None:
    """Delete a checkpoint folder, renamed first: a kill during the deletion leaves no partial
    `step_*` folder, only a temporary one that the next save removes."""
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, trash)  # onto the empty folder: atomic
    shutil.rmtree(trash, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Restore weights (and optimizer and RNG) in place; returns state.json. Tensors only."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if opt is not None and state.get("weights_only"):
            raise CheckpointError(f"cannot resume from checkpoint {path}: it holds the weights only "
                                  f"(a search trial's, which is never resumed); it can be exported")
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
        if opt is not None:
            tensors = load_file(str(path / "optimizer.safetensors"))
            meta = json.loads((path / "optimizer.json").read_text())
            opt.load_state_dict(_optimizer_state(tensors, meta))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from None
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
