"""Compile cache: a search (or a re-run) that meets an architecture again does not recompile it.

Two layers, both under the playground home (`$LM_PLAYGROUND_HOME`, default `~/.cache/lm-playground`):

- `inductor/`: torch.compile's own on-disk caches (FX graph, AOTAutograd, Triton / C++ kernels),
  set as `TORCHINDUCTOR_CACHE_DIR` unless the user set it. PyTorch's default is a temp folder.
- `compile/<graph hash>-<key>.bin`: PyTorch's portable "Mega-Cache"
  (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`; in torch 2.11 and 2.13), one
  file per compiled configuration, for a machine whose `inductor/` folder is gone. The key covers
  what changes the compiled code besides the graph: micro-batch and sequence length, autocast
  dtype, compile mode, world size, torch version and device name. Loaded before the first
  compiled call; written after the first optimizer step and again after the first evaluation
  (which compiles the no-grad graphs in regional mode), only by a process that missed. Writes are
  atomic; a corrupt file warns once and is compiled over. Without the API the cache is `off`.

Measured first steps, cold and then in a new process: GPT-2 124M on an H100 (torch 2.11)
regional 17.1 s -> 3.7 s, full 29.1 s -> 5.0 s, nested 21.3 s -> 4.5 s; the tiny GPT-2 on a
2-core CPU (full) 27 s -> 4 s. On the CPU the file does not carry the g++-built kernels, so there
the `inductor/` folder is what makes a warm start fast.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import warnings
from pathlib import Path

import torch

from search.tokenizer import playground_home

MAGIC = b"lm-playground-compile-cache 1\n"


class CompileCacheWarning(UserWarning):
    pass


def supported() -> bool:
    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def use_persistent_inductor_cache() -> None:
    """Inductor's caches under the home, so they outlive the temp folder; a user setting wins.
    Call before the first compilation: Inductor reads the variable each time it needs the folder."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:  # importing torch._dynamo already sets the variable to torch's own default
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except ImportError:
        torch_default = None
    if current is None or os.path.abspath(current) == torch_default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(playground_home() / "inductor")


def cache_key(graph_hash: str, *, micro_batch: int, seq_len: int, amp_dtype: torch.dtype | None,
              mode: str, world: int, device: torch.device) -> dict:
    """Everything besides the graph that changes what torch.compile produces."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"graph_hash": graph_hash, "micro_batch": micro_batch, "seq_len": seq_len,
            "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
            "mode": mode, "world": world, "torch": torch.__version__, "device": name}


def cache_path(key: dict) -> Path:
    """`compile/<graph hash>-<digest of the whole key>.bin` under the home."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return playground_home() / "compile" / f"{key['graph_hash']}-{digest}.bin"


def _pack(chunks: list[bytes], key: dict) -> bytes:
    # a checksum of our own: torch would answer bad bytes with a logged traceback, not one line
    body = b"".join(chunks)
    header = {"sha256": hashlib.sha256(body).hexdigest(), "chunks": [len(c) for c in chunks], "key": key}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body


def _unpack(data: bytes) -> list[bytes]:
    if not data.startswith(MAGIC):
        raise ValueError("not a compile-cache file")
    line, sep, body = data[len(MAGIC):].partition(b"\n")
    header = json.loads(line) if sep else {}
    if header.get("sha256") != hashlib.sha256(body).hexdigest():
        raise ValueError("checksum mismatch (truncated or corrupt)")
    ends = [sum(header["chunks"][:i + 1]) for i in range(len(header["chunks"]))]
    return [body[a:b] for a, b in zip([0] + ends, ends)]


def _forget_recorded_artifacts() -> None:
    """save_cache_artifacts returns every artifact recorded in the process; in-process search
    trials would otherwise write each earlier trial's artifacts into every later trial's file."""
    try:
        importlib.import_module("torch.compiler._cache").CacheArtifactManager.clear()
    except (ImportError, AttributeError):  # private API: without it files only grow
        pass


class CompileCache:
    """The Mega-Cache file of one run: `load()` before compiling, `save()` after warm-up."""

    def __init__(self, key: dict, enabled: bool = True):
        self.key, self.path = key, cache_path(key)
        self.status = "miss" if enabled and supported() else "off"   # off | miss | hit
        self._chunks: list[bytes] = []
        self._written = 0

    def load(self) -> str:
        """Populate torch's caches from the file; returns the status (hit, miss or off)."""
        if self.status == "off":
            return self.status
        use_persistent_inductor_cache()
        _forget_recorded_artifacts()
        if not self.path.exists():
            return self.status
        try:
            infos = [torch.compiler.load_cache_artifacts(c) for c in _unpack(self.path.read_bytes())]
            if not any(i is not None and any(i.artifacts.values()) for i in infos):
                raise ValueError("no artifacts in it")
        except Exception as e:  # a cache must never stop a run
            warnings.warn(f"compile cache {self.path} ignored ({type(e).__name__}: {e}); "
                          "compiling from scratch", CompileCacheWarning, stacklevel=2)
            return self.status
        self.status = "hit"
        return self.status

    def save(self) -> bool:
        """Write what this process compiled, when it missed and compiled something new since
        the last write; atomic, so a concurrent reader sees the old file or the new one.

        Every save's payload is kept as a chunk of its own: a second save_cache_artifacts()
        returns all artifacts, but load_cache_artifacts() of it restores only those recorded
        since the previous save (seen on torch 2.11 and 2.13: it keys the batches by type in a dict)."""
        if self.status != "miss":
            return False
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None or sum(len(v) for v in saved[1].artifacts.values()) <= self._written:
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(_pack(self._chunks + [saved[0]], self.key))
            os.replace(tmp, self.path)
        except Exception as e:  # a full disk or a torch change must not fail the run
            tmp.unlink(missing_ok=True)
            warnings.warn(f"compile cache {self.path} not written ({type(e).__name__}: {e})",
                          CompileCacheWarning, stacklevel=2)
            return False
        self._chunks.append(saved[0])
        self._written = sum(len(v) for v in saved[1].artifacts.values())
        return True


def graph_cache_counts() -> dict:
    """Inductor FX-graph cache hits and misses so far in this process (what a hit really saved)."""
    from torch._dynamo.utils import counters
    c = counters["inductor"]
    return {"hit": int(c["fxgraph_cache_hit"]), "miss": int(c["fxgraph_cache_miss"])}
