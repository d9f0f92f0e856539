"""Resources: a trial that runs the GPU out of memory is recorded with its reason, its memory is
given back, and the next trial trains (GPU); disk-full during a checkpoint write is covered in
test_checkpoint.py."""
from __future__ import annotations

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
