"""Resources: a trial that runs the GPU out of memory is recorded with its reason, its memory is
given back, and the next trial trains (GPU); a disk that fills up during a checkpoint write leaves
the previous checkpoint intact (a real ENOSPC on a small tmpfs where we may mount one, else a
real EFBIG from a file-size limit)."""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from test_search import GPT2, search, trials


@pytest.mark.gpu
def test_out_of_memory_in_a_trial_is_recorded_and_the_next_trial_runs(tmp_path):
    out = search(tmp_path, GPT2, "--size", "tiny", "--trials", "3", "--trial-tokens", "65536",
                 "--budget", "10m", "--study", "oom", "--pruner", "none", "--device", "cuda",
                 PLAYGROUND_FAULT="0:oom@2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ts = trials(tmp_path, "oom")
    assert ts[0].state.name == "FAIL", ts[0].user_attrs
    assert "OutOfMemoryError" in ts[0].user_attrs["error"], ts[0].user_attrs["error"]
    trained = [t for t in ts[1:] if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert trained, [(t.state.name, t.user_attrs.get("error")) for t in ts]
    # the filled device was given back before the next trial: nothing of trial 0 stays allocated
    assert ts[1].user_attrs["cuda_bytes_at_start"] < 2**30, ts[1].user_attrs["cuda_bytes_at_start"]
    assert "OutOfMemoryError" in out.stdout


def _tiny_model():
    import torch

    import graphs
    from conftest import ROOT
    plan = graphs.elaborate(graphs.load(ROOT / "graphs" / "gpt2.yaml", size="tiny").resolve())
    model = graphs.build(plan, seed=0)
    return model, torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)


@contextlib.contextmanager
def _nearly_full_folder(path: Path, room: int):
    """A folder with about `room` bytes free: a tmpfs of that size where we may mount one (root),
    else a file-size limit of `room` on this process (writes past it fail with EFBIG, the same
    OSError path as ENOSPC). Both are real failures of the operating system's write."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if mounted:
        try:
            yield "ENOSPC"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (room, hard))
    try:
        yield "EFBIG"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def test_disk_full_during_a_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path):
    import torch

    from search import checkpoint
    model, opt = _tiny_model()
    probe = checkpoint.save(tmp_path / "probe", model, opt, {"step": 1})
    size = sum(f.stat().st_size for f in probe.iterdir())
    biggest = max(f.stat().st_size for f in probe.iterdir())
    run = tmp_path / "run"
    # room for one checkpoint and part of a second; with a file-size limit, less than the
    # largest file, set only after the first checkpoint is written
    with _nearly_full_folder(run, size + size // 2) as how:
        if how == "ENOSPC":
            first = checkpoint.save(run, model, opt, {"step": 1})
            with torch.no_grad():
                next(model.parameters()).add_(1.0)  # a different second checkpoint
            with pytest.raises(checkpoint.CheckpointWriteError) as err:
                checkpoint.save(run, model, opt, {"step": 2})
            assert err.value.errno == errno.ENOSPC, err.value
            assert "previous checkpoint (step_000000001) is intact" in str(err.value)
            state = _check_intact(run, first, probe)
    if how == "EFBIG":
        run2 = tmp_path / "run2"
        first = checkpoint.save(run2, model, opt, {"step": 1})
        with _nearly_full_folder(tmp_path / "unused", biggest // 2):
            with pytest.raises(checkpoint.CheckpointWriteError) as err:
                checkpoint.save(run2, model, opt, {"step": 2})
        assert err.value.errno == errno.EFBIG, err.value
        state = _check_intact(run2, first, probe)
    assert state["step"] == 1


def _check_intact(run: Path, first: Path, probe: Path) -> dict:
    from search import checkpoint
    assert checkpoint.latest(run) == first
    assert not list(run.glob(".step_*")) and not (run / "step_000000002").exists()
    for f in probe.iterdir():  # byte-identical to the same checkpoint written with room to spare
        assert (first / f.name).read_bytes() == f.read_bytes(), f.name
    model, opt = _tiny_model()
    return checkpoint.load(first, model, opt)
