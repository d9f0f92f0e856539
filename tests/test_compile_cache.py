"""The compile cache (search.compile_cache) and the `nested` compile mode.

Cache tests train the tiny GPT-2 for two steps in fresh processes on a temporary playground home
(sharing the real home's corpus and tokenizer, so nothing is re-tokenised). On the CPU the first,
cold compile is the slow part (g++ builds the kernels): it runs once per module.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphs
from conftest import ROOT
from graphs.compile import compile_model
from search.compile_cache import MAGIC, CompileCache, CompileCacheWarning, cache_key, cache_path
from search.tokenizer import playground_home

GPT2 = str(ROOT / "graphs" / "gpt2.yaml")


def make_home(tmp: Path) -> Path:
    home = tmp / "home"
    home.mkdir()
    for sub in ("corpus", "tokenizers"):
        (playground_home() / sub).mkdir(parents=True, exist_ok=True)
        (home / sub).symlink_to(playground_home() / sub)
    return home


def env_for(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(LM_PLAYGROUND_HOME=str(home), PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)
    return env


def train(home: Path, out: Path, *args) -> tuple[dict, subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "search.train", GPT2, "--size", "tiny", "--compile", "full",
           "--tokens", "512", "--evals", "1", "--no-track", "--no-progress", "--out", str(out), *args]
    p = subprocess.run(cmd, cwd=home.parent, env=env_for(home), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((out / "result.json").read_text()), p


def tiny_plan(*sets):
    return graphs.elaborate(graphs.load(GPT2, "tiny", sets).resolve())


def key_for(plan, **over) -> dict:
    """The key `search.train --compile full` uses here (bf16 autocast on a GPU)."""
    cuda = torch.cuda.is_available()
    kw = dict(micro_batch=plan.training.micro_batch, seq_len=plan.seq_len,
              amp_dtype=torch.bfloat16 if cuda else None, mode="full", world=1,
              device=torch.device("cuda" if cuda else "cpu")) | over
    return cache_key(plan.hash, **kw)


def cache_file(home: Path) -> Path:
    """Where the runs' cache file lands under `home`."""
    return home / "compile" / cache_path(key_for(tiny_plan())).name


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """One cold run on a fresh home: (home, result)."""
    home = make_home(tmp_path_factory.mktemp("cache"))
    result, _ = train(home, home.parent / "cold")
    return home, result


@pytest.mark.slow
def test_first_run_writes_the_cache_and_a_second_process_hits_it(cold):
    home, first = cold
    assert first["compile_cache"] == "miss"
    assert cache_file(home).read_bytes().startswith(MAGIC)
    assert cache_file(home).name.startswith(tiny_plan().hash)
    assert (home / "inductor").is_dir()                   # inductor's caches outlive the process
    second, p = train(home, home.parent / "warm")
    assert second["compile_cache"] == "hit" and "(cache hit)" in p.stdout
    assert second["compile_s"] < first["compile_s"] / 2, (first["compile_s"], second["compile_s"])


@pytest.mark.slow
def test_a_corrupt_cache_file_warns_once_and_the_run_recompiles_over_it(cold):
    home, _ = cold
    path = cache_file(home)
    path.write_bytes(path.read_bytes()[:-100])             # truncated: the checksum fails
    result, p = train(home, home.parent / "corrupt")
    assert result["status"] == "completed" and result["compile_cache"] == "miss"
    lines = [ln for ln in p.stderr.splitlines() if "CompileCacheWarning" in ln]
    assert len(lines) == 1 and "checksum" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert path.read_bytes().startswith(MAGIC) and len(path.read_bytes()) > 1000  # rewritten


def test_the_key_follows_the_graph_and_the_shapes():
    a, b = tiny_plan(), tiny_plan("d_model=32")
    assert a.hash != b.hash
    pa, pb = cache_path(key_for(a)), cache_path(key_for(b))
    assert pa != pb and pa.name.startswith(a.hash) and pb.name.startswith(b.hash)
    assert cache_path(key_for(a, micro_batch=4)) != pa
    assert cache_path(key_for(a, amp_dtype=torch.float16)) != pa
    assert cache_path(key_for(a, mode="regional")) != pa
    assert cache_path(key_for(a)) == pa                      # stable within and across processes


def test_garbage_in_the_cache_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_PLAYGROUND_HOME", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    cache = CompileCache(key_for(tiny_plan()))
    cache.path.parent.mkdir(parents=True)
    cache.path.write_bytes(b"\x00not a cache")
    with pytest.warns(CompileCacheWarning, match="ignored"):
        assert cache.load() == "miss"
    assert CompileCache(key_for(tiny_plan()), enabled=False).load() == "off"


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from search.compile_cache import CompileCache, graph_cache_counts
    cache = CompileCache({"graph_hash": "f" * 16, "test": "portable"})
    status = cache.load()
    for fn in (lambda x: torch.sin(x) * 2 + 1, lambda x: torch.cos(x) - 3):  # as warm-up, then eval
        torch.compile(fn, dynamic=False)(torch.ones(8))
        cache.save()
    print(json.dumps({"status": status, **graph_cache_counts()}))
""")


@pytest.mark.slow
def test_the_cache_file_alone_restores_compiled_graphs_in_a_fresh_inductor_folder(tmp_path):
    """What a fresh GPU machine sees: only the file survives, not inductor's folder. Two saves,
    as a run makes after warm-up and after its first evaluation: both graphs must come back."""
    def run(inductor: str) -> dict:
        p = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                           env=env_for(tmp_path, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / inductor)),
                           timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.splitlines()[-1])
    assert run("a") == {"status": "miss", "hit": 0, "miss": 2}
    assert run("b") == {"status": "hit", "hit": 2, "miss": 0}


# ----- nested compile mode

def eager_and_nested(backend, device="cpu"):
    """Loss and parameters (with grads) of one step, eager and compiled in `nested` mode."""
    torch._dynamo.reset()
    plan = tiny_plan()
    eager, model = graphs.build(plan, device=device), graphs.build(plan, device=device)
    compiled = compile_model(model, "nested", backend=backend)
    idx = torch.randint(0, 50257, (2, plan.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    (_, l1), (_, l2) = eager(idx, idx), compiled(idx, idx)
    l1.backward()
    l2.backward()
    return (l1, list(eager.named_parameters())), (l2, list(model.parameters()))


def assert_same_step(eager, nested, rtol, atol):
    (l1, named), (l2, params) = eager, nested
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=0)
    for (name, p), q in zip(named, params):
        torch.testing.assert_close(q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_nested_mode_matches_eager_and_traces_a_layer_once():
    seen = []

    def backend(gm, example_inputs):  # records the graph, then compiles as aot_eager would
        seen.append(gm)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    assert_same_step(*eager_and_nested(backend), rtol=1e-4, atol=1e-7)
    assert len(seen) == 1                                    # one graph: no breaks
    calls = [n for n in seen[0].graph.nodes if "invoke_subgraph" in str(n.target)]
    subgraphs = [n for n, _ in seen[0].named_children() if n.startswith("subgraph")]
    assert len(calls) == tiny_plan().vars["n_layer"] and len(subgraphs) == 1  # traced once, reused


@pytest.mark.slow
def test_nested_mode_with_inductor_gives_eager_gradients():
    """Inductor's buffer reuse broke the second layer's gradients on torch 2.13 (graphs.compile)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert_same_step(*eager_and_nested("inductor", device), rtol=1e-4, atol=1e-6)


def test_nested_mode_names_the_torch_version_when_unavailable(monkeypatch):
    monkeypatch.delattr(torch.compiler, "nested_compile_region")
    with pytest.raises(ValueError, match=re.escape(f"torch {torch.__version__}")):
        compile_model(graphs.build(tiny_plan()), "nested")


def test_nested_is_a_compile_choice_of_the_cli():
    from search.train import parse_args
    assert parse_args([GPT2, "--compile", "nested"]).compile == "nested"
