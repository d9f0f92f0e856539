"""One training run of one concrete graph: the loop, its budget, evaluation and checkpoints.

The budget is device time spent in training steps, the waits at log points for steps still
queued on the device included (`time/sync_s`). The first step (which compiles) and the
evaluations are timed separately (`time/compile_s`, `time/eval_s`) and do not count; at its end
the run logs where all of its wall time went (`time/<phase>_s`, `search.phases`). A compiled
run first loads the compile cache of its graph hash and shapes (`search.compile_cache`; tag
`compile_cache`: hit, miss or off) and, on a miss, writes it after warm-up. The
schedule's horizon follows the budget, so a time-budgeted run still warms up and anneals.
Losses stay on the device between log points: no host-device synchronisation in the step.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch

from blocks.blt_patch import patch_stats
from graphs.compile import compile_model
from search import checkpoint
from search.compile_cache import CompileCache, cache_key, graph_cache_counts
from search.dist import barrier, broadcast_flag
from search.evaluate import evaluate
from search.perf import mfu
from search.schedule import lr_at
from search.setup import Setup


@dataclass
class RunResult:
    status: str                    # completed | diverged | interrupted | pruned | failed
    step: int = 0
    tokens: int = 0
    train_s: float = 0.0               # the budget: training steps and the waits for queued ones
    sync_s: float = 0.0                # of train_s, the waits for steps still queued on the device
    compile_s: float = 0.0
    compile_cache: str = "off"         # hit | miss | off (search.compile_cache)
    eval_s: float = 0.0
    val_loss: float | None = None
    val_bpb: float | None = None
    tok_s: float | None = None
    mfu: float | None = None
    e2e_tok_s: float | None = None     # tokens / loop wall time after compile (data, logs, evals in)
    pure_tok_s: float | None = None    # the same step on one device-resident batch, nothing else
    run_id: str | None = None
    run_dir: str | None = None
    message: str = ""
    history: list = field(default_factory=list)
    phases: dict = field(default_factory=dict)   # seconds per phase of this process (search.phases)


def _fault(trial: str | None = None) -> tuple[str, int] | None:
    """Fault injection for tests of containment: PLAYGROUND_FAULT=nan@STEP, raise@STEP or oom@STEP
    (a real allocator out-of-memory: device memory is filled in 1 GiB blocks, held by the step's
    frame, until the allocator refuses), or a comma list of TRIAL:KIND@STEP entries that apply
    only to that Optuna trial number."""
    for spec in filter(None, os.environ.get("PLAYGROUND_FAULT", "").split(",")):
        target, _, rule = spec.rpartition(":")
        kind, _, step = rule.partition("@")
        if kind not in ("nan", "raise", "oom") or not step.isdigit():
            raise ValueError(f"PLAYGROUND_FAULT={spec!r}: expected [TRIAL:]KIND@STEP, KIND one of "
                             "nan, raise, oom")
        if not target or target == trial:
            return kind, int(step)
    return None


class Trainer:
    """Runs `setup` (model, data, optimiser, tracker) until its budget is spent."""

    def __init__(self, s: Setup, on_eval=None, should_stop=None):
        self.s = s
        self.cfg = s.cfg
        self.on_eval = on_eval          # callback(tokens, metrics) -> True to stop (prune)
        self.should_stop = should_stop  # callback() at log points -> True to stop (prune)
        self.model = s.model
        self.r = RunResult("running", run_id=s.tracker.run_id, run_dir=str(s.run_dir))
        with s.phases("compile") as span:
            self.step_fn = self._compile()
        self.load_s = span.seconds  # part of the compile cost, like the first step
        with s.phases("setup"):
            self.ddp = s.wrap(self.step_fn)
        self.loss_acc = None
        self.bad_step = None
        self.fault = _fault(s.cfg.tags.get("optuna.trial"))

    def _compile(self):
        """The module to step: compiled (after loading the compile cache) unless mode is none."""
        s = self.s
        key = cache_key(s.plan.hash, micro_batch=s.recipe.micro_batch, seq_len=s.plan.seq_len,
                        amp_dtype=s.amp_dtype, mode=s.compile_mode, world=s.dist.world, device=s.device)
        self.cache = CompileCache(key, enabled=s.compile_mode != "none")
        self.r.compile_cache = self.cache.load()
        if s.dist.main:
            with s.phases("track"):
                s.tracker.set_tags({"compile_cache": self.r.compile_cache})
        if self.cache.status == "off":
            return s.model
        self.graphs_before = graph_cache_counts()
        return compile_model(s.model, s.compile_mode, dynamic=False)

    def _after_compile(self) -> None:
        """Write the compile cache (a miss) and tag how many graphs the caches gave back."""
        if self.cache.status == "off" or not self.s.dist.main:
            return
        self.cache.save()
        now = graph_cache_counts()
        hit, miss = (now[k] - self.graphs_before[k] for k in ("hit", "miss"))
        with self.s.phases("track"):
            self.s.tracker.set_tags({"compile_cache_graphs": f"{hit} reused, {miss} compiled"})

    # ----- budget and schedule
    def progress(self) -> float:
        c = self.cfg
        p = 0.0
        if c.budget_s:
            p = max(p, self.r.train_s / c.budget_s)
        if c.max_tokens:
            p = max(p, self.r.tokens / c.max_tokens)
        return p

    def _sync(self):
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)

    def _drain(self) -> None:
        """Wait for the steps still queued on the device. A step returns once its kernels are
        queued, so this wait is the device training: it counts in train_s, the budget (phase
        `sync`, to show it). Uncounted, a 3-minute trial on an H100 trained for 202 s, 11% more
        than its budget (docs/benchmarks.md, the 13-minute study)."""
        with self.s.phases("sync") as span:
            self._sync()
        self.r.train_s += span.seconds
        self.r.sync_s += span.seconds

    # ----- one optimizer step (accumulating micro-batches)
    def train_step(self, batch=None) -> None:
        """One optimizer step over `accum` micro-batches (from the loader, or `batch` each time)."""
        s, recipe = self.s, self.s.recipe
        lr = lr_at(recipe, self.progress())
        for g in s.opt.param_groups:
            g["lr"] = lr
        for micro in range(s.accum):
            x, y = batch if batch is not None else s.loader.next()
            sync = contextlib.nullcontext() if micro == s.accum - 1 or not s.dist.enabled \
                else self.ddp.no_sync()
            with sync, s.autocast():
                _, loss = self.ddp(x, y)
                if self.fault and self.r.step >= self.fault[1]:
                    if self.fault[0] == "raise":
                        raise RuntimeError(f"injected failure at step {self.r.step} (PLAYGROUND_FAULT)")
                    if self.fault[0] == "oom":
                        hog = [loss]
                        while True:  # ends in the allocator's OutOfMemoryError
                            hog.append(torch.empty(1 << 30, dtype=torch.uint8, device=s.device))
                    loss = loss * float("nan")
                (loss / s.accum).backward()
            detached = loss.detach().float()
            self.loss_acc = detached if self.loss_acc is None else self.loss_acc + detached
            if self.bad_step is None:
                self.bad_step = torch.full((), -1, device=s.device, dtype=torch.long)
            bad = ~torch.isfinite(detached) & (self.bad_step < 0)
            self.bad_step = torch.where(bad, torch.full_like(self.bad_step, self.r.step), self.bad_step)
        if recipe.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), recipe.grad_clip)
        s.opt.step()
        s.opt.zero_grad(set_to_none=True)
        s.model.after_step()
        self.lr = lr
        self.r.step += 1
        self.r.tokens += s.tokens_per_step

    # ----- the loop
    def run(self) -> RunResult:
        s = self.s
        state = s.resume_state
        if state:
            self._restore(state)
            if self.progress() >= 1.0:  # killed after its final checkpoint: nothing left to train
                return self._finish("completed", "resumed after its budget was spent: no step taken")
        last_log_t, last_log_tokens, n_since_log = None, self.r.tokens, 0
        next_eval = self._next_eval()
        self.last_ckpt = time.perf_counter()
        try:
            while True:
                first = self.r.step == (state or {}).get("step", 0)  # the compiling step
                self._timed_step(first)
                n_since_log += 1
                if first:
                    s.track_metrics({"time/compile_s": self.r.compile_s}, self.r.tokens)
                    last_log_t, last_log_tokens, n_since_log = time.perf_counter(), self.r.tokens, 0
                    loop_t0, loop_tokens0 = last_log_t, self.r.tokens
                    self.loss_acc = None
                    continue
                done = self.progress() >= 1.0
                if n_since_log >= self.cfg.log_every or done:
                    self._drain()
                    now = time.perf_counter()
                    with s.phases("log"):
                        diverged = self._log(now - last_log_t, self.r.tokens - last_log_tokens, n_since_log)
                    if diverged:
                        return self._finish("diverged")
                    if self.should_stop is not None and not done and \
                            broadcast_flag(s.dist, s.dist.main and self.should_stop(), s.device):
                        return self._finish("pruned")
                    last_log_t, last_log_tokens, n_since_log = time.perf_counter(), self.r.tokens, 0
                if done or self.progress() >= next_eval:
                    stop = self._evaluate()
                    if not stop:  # a pruned run is never resumed: its checkpoint would be waste
                        self._checkpoint(force=done)
                    next_eval = self._next_eval()
                    last_log_t = time.perf_counter()
                    if stop:
                        return self._finish("pruned")
                if done:
                    self._drain()
                    self.r.e2e_tok_s = (self.r.tokens - loop_tokens0) / (time.perf_counter() - loop_t0)
                    self._pure_speed()
                    return self._finish("completed")
        except KeyboardInterrupt:
            self._checkpoint()
            return self._finish("interrupted", "stopped by Ctrl-C; a final checkpoint was written")

    def _timed_step(self, first: bool) -> None:
        """One optimizer step, timed: the first one (it compiles) into compile_s with the compile
        cache's load and write, every other one into train_s, the budget."""
        with self.s.phases("compile" if first else "train") as span:
            self.train_step()
            if first:
                self._sync()
                self._after_compile()
        if first:
            self.r.compile_s += span.seconds + self.load_s
        else:
            self.r.train_s += span.seconds

    def _next_eval(self) -> float:
        n = max(1, self.cfg.evals)
        return (math.floor(self.progress() * n + 1e-9) + 1) / n

    def _log(self, dt: float, dtokens: int, n_steps: int) -> bool:
        """Log train metrics since the last log; True when the loss went non-finite."""
        s = self.s
        bad = int(self.bad_step.item()) if self.bad_step is not None else -1
        if bad >= 0:
            self.r.message = f"loss became non-finite at step {bad}"
            return True
        loss = (self.loss_acc / (n_steps * s.accum)).item() if self.loss_acc is not None else float("nan")
        self.loss_acc = None
        tok_s = dtokens / dt if dt > 0 else 0.0
        world = s.dist.world                  # tok_s counts every rank's tokens; the peak is one GPU's
        self.r.tok_s, self.r.mfu = tok_s, mfu(s.flops_per_token, tok_s / world, s.peak)
        m = {"train/loss": loss, "train/lr": self.lr, "perf/tok_s": tok_s,
             "budget/gpu_s": self.r.train_s, "time/train_s": self.r.train_s - self.r.sync_s}
        if world > 1:
            m["perf/tok_s_per_gpu"] = tok_s / world
        if getattr(self, "grad_norm", None) is not None:
            m["train/grad_norm"] = float(self.grad_norm)
        if self.r.mfu is not None:
            m["perf/mfu"] = self.r.mfu
        if s.device.type == "cuda":
            m["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(s.device) / 1e9
        s.track_metrics(m, self.r.tokens)
        s.progress_bar(self.progress(), loss, tok_s, self.r.mfu, self.r.train_s)
        return False

    def _evaluate(self) -> bool:
        s = self.s
        stop = False
        self._drain()  # the steps still queued on the device are training, not evaluation
        s.feed_entropies(None)  # BLT graphs: validation is scored by the entropy model
        if s.dist.main:
            with s.phases("eval") as span:
                patch_stats(s.model)  # BLT graphs: count patches over the validation span only
                metrics = evaluate(s.model, s.val, s.autocast)
                metrics.update(patch_stats(s.model))
            self.r.val_loss, self.r.val_bpb = metrics["val/loss"], metrics["val/bpb"]
            self.r.eval_s += span.seconds
            metrics["time/eval_s"] = self.r.eval_s
            self.r.history.append({"tokens": self.r.tokens, "train_s": self.r.train_s, **metrics})
            with s.phases("log"):
                s.track_metrics(metrics, self.r.tokens)
            if len(self.r.history) == 1:  # regional mode compiled the no-grad graphs just now
                with s.phases("compile") as span:
                    self.cache.save()
                self.r.compile_s += span.seconds
            if self.on_eval is not None:
                stop = bool(self.on_eval(self.r.tokens, metrics))
        stop = broadcast_flag(s.dist, stop, s.device)
        barrier(s.dist)
        return stop

    def _checkpoint(self, force: bool = True) -> None:
        due = time.perf_counter() - self.last_ckpt >= self.cfg.checkpoint_every_s
        if self.s.dist.main and self.cfg.checkpoint and (force or due):
            with self.s.phases("checkpoint"):
                self.s.tracker.flush_local()  # a resume never logs again what this says is logged
                opt = self.s.opt if self.cfg.resumable else None  # a weights-only checkpoint
                checkpoint.save(self.s.run_dir, self.s.model, opt, self._state())
            self.last_ckpt = time.perf_counter()
        barrier(self.s.dist)

    def _pure_speed(self) -> None:
        """After the run (its final checkpoint is written): time `pure_steps` steps on one batch
        already on the device, the speed the loop would have with free data, logs and evals."""
        n = self.cfg.pure_steps
        if n <= 0:
            return
        step, tokens = self.r.step, self.r.tokens
        batch = self.s.loader.next()
        self.train_step(batch)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(n):
            self.train_step(batch)
        self._sync()
        self.r.pure_tok_s = n * self.s.tokens_per_step / (time.perf_counter() - t0)
        self.r.step, self.r.tokens = step, tokens  # these steps are a measurement, not the run
        self.s.track_metrics({"perf/pure_tok_s": self.r.pure_tok_s, "perf/e2e_tok_s": self.r.e2e_tok_s,
                              "perf/e2e_ratio": self.r.e2e_tok_s / self.r.pure_tok_s}, self.r.tokens)

    def _state(self) -> dict:
        r = self.r
        return {"step": r.step, "tokens": r.tokens, "train_s": r.train_s, "sync_s": r.sync_s,
                "compile_s": r.compile_s,
                "eval_s": r.eval_s, "loader": self.s.loader.state_dict(), "history": r.history,
                "graph_hash": self.s.plan.hash}

    def _restore(self, state: dict) -> None:
        r = self.r
        r.step, r.tokens, r.train_s = state["step"], state["tokens"], state["train_s"]
        r.compile_s, r.eval_s, r.history = state["compile_s"], state["eval_s"], state["history"]
        r.sync_s = state.get("sync_s", 0.0)   # checkpoints written before it was kept
        self.s.loader.load_state_dict(state["loader"])
        if r.history:
            r.val_loss, r.val_bpb = r.history[-1]["val/loss"], r.history[-1]["val/bpb"]

    def _finish(self, status: str, message: str = "") -> RunResult:
        self.r.status = status
        self.r.message = self.r.message or message
        self.s.close(self.r)
        return self.r
