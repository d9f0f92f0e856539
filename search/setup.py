"""Everything a training run needs, assembled from a RunConfig: graph, model, data, optimiser,
tracking and output folder. The loop itself lives in `search.trainer`."""
from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

import graphs
from graphs.cost import FLOPS_FORMULA, analyse
from search import checkpoint
from search.data import Loader, bytes_per_token, open_dataset, val_batches
from search.dist import setup as dist_setup
from search.perf import device_name, peak_flops
from search.phases import Phases
from search.tokenizer import get_tokenizer
from search.track import Tracker

ROOT = Path(__file__).resolve().parent.parent
# validation span on CPU: whole documents up to 16 KiB (tiny models spend most of a CPU trial on
# the 50k-way head of evaluation); 1 MiB on a GPU
CPU_EVAL_BYTES = 1 << 14
_NOTED: set = set()   # entropy model folders whose missing cache was pointed out


@dataclass
class RunConfig:
    """What `python -m search.train` (and each search trial) was asked to do."""

    graph: str
    size: str | None = None
    sets: tuple = ()
    params: dict = field(default_factory=dict)   # search-space values
    budget_s: float | None = None                 # device time of training steps
    max_tokens: int | None = None
    max_bytes: int | None = None                  # or bytes of text (tokens x bytes per token)
    data: str | None = None                       # dataset spec; None = the built-in corpus
    seed: int = 0
    evals: int = 10                               # evaluations spread over the horizon
    eval_bytes: int | None = None                 # validation span (default by device)
    log_every: int = 10
    out: str | None = None
    resume: str | None = None
    compile: str = "auto"                         # auto (none on CPU) | regional | full | nested | none
    device: str = "auto"
    track: bool = True
    experiment: str = "playground"
    run_name: str | None = None
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    checkpoint: bool = True
    checkpoint_every_s: float = 600.0             # at evaluations, at most this often (0: each)
    resumable: bool = True                        # False: checkpoints hold no optimizer state
    pure_steps: int = 0                           # after the run: time steps on a fixed batch
    progress: bool = True
    tags: dict = field(default_factory=dict)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "-uno"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Setup:
    def __init__(self, cfg: RunConfig, phases: Phases | None = None):
        self.cfg = cfg
        self.phases = phases or Phases()   # where the run's wall time goes (search.phases)
        self.dist, self.device = dist_setup(cfg.device)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.graph = graphs.load(cfg.graph, cfg.size, cfg.sets).resolve(cfg.params)
        self.plan = graphs.elaborate(self.graph)
        self.recipe = self.plan.training
        self.model = graphs.build(self.plan, device=self.device, seed=cfg.seed)
        self.tokenizer = get_tokenizer("gpt2" if self.plan.input == "tokens" else "bytes")
        if self.plan.vars["vocab_size"] < self.tokenizer.vocab_size:
            raise ValueError(f"{cfg.graph}: vocab_size {self.plan.vars['vocab_size']} is smaller than "
                             f"the {self.tokenizer.name} tokenizer's {self.tokenizer.vocab_size}")
        self.dataset = open_dataset(cfg.data, self.tokenizer.name)
        self.bytes_per_token = bytes_per_token(self.dataset, self.tokenizer)
        if cfg.max_bytes:   # equal text for BPE and byte models: each stops at its own token count
            n = max(1, math.ceil(cfg.max_bytes / self.bytes_per_token))
            cfg.max_tokens = min(cfg.max_tokens, n) if cfg.max_tokens else n
        self._batching()
        side = self._cached_entropies()
        self.loader = Loader(self.dataset.train, self.recipe.micro_batch, self.plan.seq_len,
                             seed=cfg.seed, rank=self.dist.rank, world=self.dist.world, device=self.device,
                             side=side, feed=self.feed_entropies if side is not None else None)
        eval_bytes = cfg.eval_bytes or (1 << 20 if self.device.type == "cuda" else CPU_EVAL_BYTES)
        self.val = val_batches(self.dataset, self.tokenizer, self.plan.seq_len, self.recipe.micro_batch,
                               eval_bytes, device=self.device)
        self.opt = self._optimizer()
        self.cost = analyse(self.plan)
        self.flops_per_token = self.cost.flops_per_token
        self.peak = peak_flops(self.device)
        self.compile_mode = cfg.compile if cfg.compile != "auto" or self.device.type == "cuda" else "none"
        self.amp_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.run_dir = self._run_dir()
        with self.phases("checkpoint"):
            self.resume_state = self._resume()
        with self.phases("track"):
            self.tracker = self._tracker()
        self.bar = None
        self.timed: dict[str, tuple] = {}   # time/* key -> (step, value) this process last logged

    # ----- BLT's entropy patchers
    def _cached_entropies(self):
        """The train split's cached entropies when every entropy patcher names one model folder
        that `python -m search.entropy cache DIR --split train` has scored this data set with;
        else None, and the patchers run their entropy model on every batch (say so)."""
        from blocks.blt_patch import PatchEntropy
        self.patchers = [m for m in self.model.modules() if isinstance(m, PatchEntropy) and m.cfg.model]
        self.entropy_source = "model" if self.patchers else None
        folders = {m.cfg.model for m in self.patchers}
        if len(folders) != 1:
            return None
        from search.entropy import cache_path, cached_shards
        folder = folders.pop()
        side = cached_shards(folder, self.dataset, "train")
        if side is None:
            if self.dist.main and folder not in _NOTED:   # once per process (a study's trials)
                _NOTED.add(folder)
                print(f"note: patch_entropy scores every training batch with the entropy model in "
                      f"{folder}; `python -m search.entropy cache {folder} --split train"
                      f"{' --data ' + self.cfg.data if self.cfg.data else ''}` precomputes them once",
                      file=sys.stderr)
            return None
        self.entropy_source = f"cache {cache_path(folder, self.dataset, 'train')}"
        return side

    def feed_entropies(self, ent) -> None:
        """Hand the next training forward its batch's cached entropies (None: the model scores,
        as in evaluation)."""
        for m in self.patchers:
            m.fed = ent

    # ----- batching and optimiser
    def _batching(self) -> None:
        r, T, world = self.recipe, self.plan.seq_len, self.dist.world
        per_micro = r.micro_batch * T * world
        self.accum = max(1, round(r.batch_tokens / per_micro))
        self.tokens_per_step = per_micro * self.accum

    def _optimizer(self) -> torch.optim.Optimizer:
        r = self.recipe
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(self.model.param_groups(r.weight_decay), lr=r.lr,
                                 betas=(r.beta1, r.beta2), eps=r.eps, **kw)

    def autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def wrap(self, module):
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids)

    # ----- output folder, resume, tracking
    def _run_dir(self) -> Path:
        c = self.cfg
        if c.resume:
            return Path(c.resume)
        if c.out:
            return Path(c.out)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{self.plan.name}-{self.plan.hash[:8]}-{stamp}"

    def _resume(self) -> dict | None:
        if not self.cfg.resume:
            return None
        path = checkpoint.latest(self.run_dir)
        if path is None:
            raise checkpoint.CheckpointError(f"no checkpoint to resume in {self.run_dir}")
        state = checkpoint.load(path, self.model, self.opt)
        if state.get("graph_hash") != self.plan.hash:
            raise checkpoint.CheckpointError(f"{path} was trained from graph {state.get('graph_hash')}, "
                                             f"not {self.plan.hash}; pass the same graph, size and --set")
        return state

    def _tracker(self) -> Tracker:
        c, p = self.cfg, self.plan
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tags = {"graph": p.name, "graph_hash": p.hash, "corpus_hash": self.dataset.content_hash,
                "corpus": self.dataset.name, "tokenizer": self.tokenizer.name, "git_commit": git_commit(),
                "device": device_name(self.device), "size": self.graph.size, "torch": torch.__version__,
                "flops_formula": FLOPS_FORMULA, "run_dir": str(self.run_dir), **c.tags}
        if self.entropy_source:
            tags["entropies"] = self.entropy_source
        name = c.run_name or f"{p.name}-{self.graph.size}-{p.hash[:8]}"
        t = Tracker(c.experiment, name, tracking_uri=c.tracking_uri, parent_run_id=c.parent_run_id,
                    tags=tags, local_dir=self.run_dir, enabled=c.track and self.dist.main)
        t.start()
        if self.dist.main:
            resolved = yaml.safe_dump(self.graph.data, sort_keys=False)
            (self.run_dir / "graph.yaml").write_text(resolved)
            t.log_text(resolved, "graph.yaml")
            t.log_params({"graph": self.graph.data, "run": self._run_params(),
                          "params": self.cost.params, "flops_per_token": self.flops_per_token,
                          "bytes_per_token": round(self.bytes_per_token, 6)})
            t.log_dict(self._run_params(), "run_config.json")
        return t

    def _run_params(self) -> dict:
        d = asdict(self.cfg)
        d.update({"accum": self.accum, "tokens_per_step": self.tokens_per_step,
                  "world": self.dist.world, "recipe": asdict(self.recipe)})
        return json.loads(json.dumps(d, default=str))

    def track_metrics(self, metrics: dict, step: int) -> None:
        if self.dist.main:
            self.tracker.log_metrics(metrics, step)
            self.timed.update((k, (step, v)) for k, v in metrics.items() if k.startswith("time/"))

    def time_metrics(self, result) -> dict[str, float]:
        """`time/<phase>_s` of this process and `time/wall_s`, less what the trainer logged at this
        step already (a metric is logged once a step). Compile, train, sync and eval are the run's
        totals, which after a resume include earlier processes; train + sync is `train_s`, the
        budget."""
        m = self.phases.metrics()
        m.update({"time/compile_s": result.compile_s, "time/train_s": result.train_s - result.sync_s,
                  "time/sync_s": result.sync_s, "time/eval_s": result.eval_s})
        return {k: v for k, v in m.items() if self.timed.get(k) != (result.tokens, v)}

    def progress_bar(self, progress, loss, tok_s, mfu_, train_s) -> None:
        if not (self.cfg.progress and self.dist.main):
            return
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=100, unit="%", file=sys.stderr, mininterval=1.0,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}<{remaining}{postfix}]")
        self.bar.n = min(100.0, 100.0 * progress)
        post = f"loss {loss:.3f}, {tok_s:,.0f} tok/s" + (f", MFU {100 * mfu_:.1f}%" if mfu_ else "")
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.refresh()

    def close(self, result) -> None:
        with self.phases("track"):
            self._close(result)

    def _close(self, result) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.dist.main:
            final = {"final/" + k: v for k, v in (("val_loss", result.val_loss), ("val_bpb", result.val_bpb),
                                                  ("train_s", result.train_s), ("tok_s", result.tok_s))
                     if v is not None}
            self.tracker.log_metrics(final, result.tokens)
            self.tracker.set_tags({"status": result.status, "message": result.message[:500]})
            ck = checkpoint.latest(self.run_dir)
            if ck is not None and self.cfg.checkpoint:  # weights and state; optimizer stays local
                for f in ("model.safetensors", "state.json"):
                    self.tracker.log_artifact(str(ck / f), "checkpoint")
            result.phases = self.phases.split()   # up to here: the tracker's end is not in it
            self.tracker.log_metrics(self.time_metrics(result), result.tokens)
            (self.run_dir / "result.json").write_text(json.dumps(asdict(result), indent=1, default=str))
        self.tracker.end(result.status)
