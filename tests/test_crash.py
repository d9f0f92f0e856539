"""kill -9 at random points (seeded) of a training run, checkpoint writes included, and of a search
worker. After every kill each checkpoint folder on disk loads with `search.checkpoint.load` and
`latest` names one of them; afterwards the run resumes and finishes with every metric logged once
per process and every log point present, and the study spends its budget without losing a
completed trial. The figures are printed (pytest -s) and written to `crash_figures.json` in the
test's folder. The search campaign runs in a thread beside the training one: both are mostly
process start-up, and the CI machine has two cores."""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import graphs
from search import checkpoint

from conftest import ROOT

pytestmark = pytest.mark.slow
GPT2 = str(ROOT / "graphs" / "gpt2.yaml")
SETS = ("batch_tokens=128", "micro_batch=2")            # 128 tokens a step: ~50 ms on the CPU
TPS, TOKENS, EVALS = 128, 6144, 12                      # 48 steps, a checkpoint every 4
TRAIN = ["--size", "tiny", "--tokens", str(TOKENS), "--evals", str(EVALS), "--checkpoint-every", "0",
         "--log-every", "1", "--eval-bytes", "512", "--seed", "3", "--no-progress",
         *(a for s in SETS for a in ("--set", s))]
PAUSE = 0.03                  # PLAYGROUND_CHECKPOINT_PAUSE: 7 pauses stretch a write to ~0.3 s
WRITE_WINDOW = 8 * PAUSE + 0.1
TRAIN_KILLS, SEARCH_KILLS = 15, 5
BUDGET = 15.0                 # the study's device seconds; trials of 1024 tokens take ~3 s each
SEARCH = [GPT2, "--size", "tiny", *(a for s in SETS for a in ("--set", s)), "--budget", f"{BUDGET:g}s",
          "--trial-tokens", "1024", "--evals", "1", "--heartbeat", "1", "--pruner", "none"]
# values a replayed step must reproduce exactly (the others are timings)
EXACT = {"train/loss", "train/lr", "train/grad_norm", "val/loss", "val/bpb", "final/val_loss",
         "final/val_bpb"}


def env_for(tmp: Path, **extra) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", PYTHONUNBUFFERED="1",
               PLAYGROUND_CHECKPOINT_PAUSE=str(PAUSE), OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def spawn(tmp: Path, module: str, args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=tmp, env=env_for(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill(proc: subprocess.Popen) -> bool:
    """kill -9; False when the process had already exited by itself."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode == -signal.SIGKILL


def wait_for(cond, proc, timeout=120.0, poll=0.01) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return True
        time.sleep(poll)
    return False


# ---------------------------------------------------------------- checkpoints


def model_for(params: dict | None = None):
    plan = graphs.elaborate(graphs.load(GPT2, "tiny", SETS).resolve(params or {}))
    model = graphs.build(plan, seed=0)
    return model, torch.optim.AdamW(model.param_groups(0.1), lr=1e-3), plan.hash


def check_checkpoints(run_dir: Path, params: dict | None = None, resumable: bool = True) -> int:
    """Every `step_*` entry loads with the project's loader (tensors, optimizer, state; a search
    trial's weights-only ones without an optimizer); `latest` names one of them. Returns how
    many were loaded."""
    if not run_dir.exists():
        return 0
    model, opt, digest = model_for(params)
    names = sorted(p.name for p in run_dir.glob("step_*"))
    for name in names:
        # CheckpointError when half-written
        state = checkpoint.load(run_dir / name, model, opt if resumable else None)
        assert state.get("weights_only", False) is not resumable, name
        assert state["step"] == int(name[len("step_"):]) and state["graph_hash"] == digest, name
    if (run_dir / "latest").exists():
        named = (run_dir / "latest").read_text().strip()
        assert named in names, f"latest names {named!r}, not one of the checkpoints {names}"
        assert checkpoint.latest(run_dir) == run_dir / named
    return len(names)


def write_traces(run_dir: Path) -> set:
    """What an unfinished checkpoint write leaves: temporary folders, the pointer's temporary
    file, a checkpoint newer than `latest`, more checkpoints than are kept."""
    if not run_dir.exists():
        return set()
    traces = {p.name for p in run_dir.iterdir() if p.name.startswith(".")}
    ckpts = sorted(p.name for p in run_dir.glob("step_*"))
    pointer = run_dir / "latest"
    named = pointer.read_text().strip() if pointer.exists() else ""
    traces |= {f"unnamed {c}" for c in ckpts if c > named}
    if len(ckpts) > checkpoint.KEEP:
        traces.add(f"{len(ckpts)} checkpoints kept")
    return traces


# ---------------------------------------------------------------- metrics


def segments(jsonl: Path, ends: list) -> list:
    """The jsonl's lines by the process that wrote them (`ends`: its size after each process).
    A torn line fails json.loads."""
    data, out, start = jsonl.read_bytes(), [], 0
    for end in [*ends, len(data)]:
        out.append([json.loads(line) for line in data[start:end].decode().splitlines()])
        start = end
    return out


def check_metrics(jsonl: Path, ends: list, history: list) -> int:
    """No metric logged twice by one process; a step a resumed process replays logs the same
    values; every step and evaluation of the run is there. Returns the values checked."""
    seen, checked = {}, 0
    for i, lines in enumerate(segments(jsonl, ends)):
        mine = set()
        for line in lines:
            for key, value in line["metrics"].items():
                at = (key, line["step"])
                assert at not in mine, f"{at} logged twice by process {i}"
                mine.add(at)
                if at in seen and key in EXACT:
                    assert math.isclose(value, seen[at], rel_tol=1e-5), (at, value, seen[at])
                seen.setdefault(at, value)
                checked += 1
    steps = {TPS * k for k in range(1, TOKENS // TPS + 1)}
    train = {s for k, s in seen if k == "train/loss"}
    first = {s for k, s in seen if k == "time/compile_s"}   # a process's first step logs no loss
    assert not steps - train - first, f"no train/loss at steps {sorted(steps - train - first)}"
    assert {s for _, s in seen} <= steps, "metrics past the run's tokens"
    evals = {s: v for (k, s), v in seen.items() if k == "val/loss"}
    assert sorted(evals) == [h["tokens"] for h in history] == [TOKENS * k // EVALS for k in
                                                              range(1, EVALS + 1)]
    for h in history:
        assert math.isclose(evals[h["tokens"]], h["val/loss"], rel_tol=1e-9)
    return checked


# ---------------------------------------------------------------- the training campaign


def pick_mode(rng: random.Random, run: Path, tried_final: bool) -> str:
    done = checkpoint.latest(run)
    near_end = done is not None and int(done.name[len("step_"):]) >= TOKENS // TPS - 8
    if near_end and not tried_final:
        return "final"   # between the final checkpoint and result.json: a resume has nothing to do
    return rng.choice(["write", "write", "any"])


def kill_at_random(proc, rng: random.Random, run: Path, mode: str) -> bool:
    """`write`: inside the 1st-3rd checkpoint write of this process; `any`: 0.5-7 s after start
    (import, resume, steps, evaluation, writes); `final`: once `latest` names the last step."""
    if mode == "write":
        old, new, target = {p.name for p in run.glob(".step_*")}, set(), rng.randint(1, 3)

        def writes_begun() -> int:  # temporary folders of this process's writes, seen so far
            new.update(p.name for p in run.glob(".step_*") if ".old." not in p.name and p.name not in old)
            return len(new)
        if wait_for(lambda: writes_begun() >= target, proc):
            time.sleep(rng.uniform(0, WRITE_WINDOW))
    elif mode == "any":
        wait_for(lambda: False, proc, timeout=rng.uniform(0.5, 7.0))
    else:
        last = f"step_{TOKENS // TPS:09d}"
        pointer = run / "latest"
        wait_for(lambda: pointer.exists() and pointer.read_text().strip() == last, proc)
    return kill(proc)


def train_args(run: Path, track: bool = False) -> tuple[list, bool]:
    """Resume when there is a checkpoint; a run killed before its first one starts again."""
    resume = checkpoint.latest(run) is not None
    where = ["--resume", run.name] if resume else ["--out", run.name]
    return [GPT2, *TRAIN, *where, *([] if track else ["--no-track"])], resume


def train_until_killed_or_done(tmp: Path, run: Path, rng, fig: dict, tried_final: bool) -> str:
    mode = pick_mode(rng, run, tried_final)
    # tracked runs write their jsonl out every ~2 s, so a kill just after a checkpoint is where
    # metrics get lost; importing MLflow costs ~2 s of CPU, so the other kills run untracked
    args, resume = train_args(run, track=mode == "write")
    fig["resumes"] += resume
    before = write_traces(run)
    proc, t0 = spawn(tmp, "search.train", args), time.time()
    killed = kill_at_random(proc, rng, run, mode)
    fig["events"].append(f"{run.name} {mode} {'killed' if killed else 'exited'} {time.time() - t0:.1f}s")
    if not killed:
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-3000:]
        return "finished"
    fig["train_kills"] += 1
    fig[f"train_kills_{mode}"] += 1
    fig["kills_during_a_checkpoint_write"] += bool(write_traces(run) - before)
    fig["checkpoint_loads"] += check_checkpoints(run)
    return mode


def check_finished_run(run: Path, ends: list, fig: dict) -> None:
    r = json.loads((run / "result.json").read_text())
    assert r["status"] == "completed" and r["tokens"] == TOKENS and r["step"] == TOKENS // TPS, r
    fig["checkpoint_loads"] += check_checkpoints(run)
    assert checkpoint.latest(run).name == f"step_{TOKENS // TPS:09d}"
    fig["metric_values_checked"] += check_metrics(run / "metrics.jsonl", ends, r["history"])
    fig["runs_finished"] += 1


def train_campaign(tmp: Path, rng: random.Random, fig: dict) -> None:
    """Runs of TOKENS, each killed until TRAIN_KILLS kills are done, then each resumed to the end."""
    n = 0
    while fig["train_kills"] < TRAIN_KILLS:
        run, ends, tried_final = tmp / f"run{n}", [], False
        while True:
            mode = "finished" if fig["train_kills"] >= TRAIN_KILLS else \
                train_until_killed_or_done(tmp, run, rng, fig, tried_final)
            tried_final |= mode == "final"
            if mode == "finished":
                break
            ends.append((run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else 0)
        if not (run / "result.json").exists():             # resumed once more, left to finish
            args, resume = train_args(run)
            fig["resumes"] += resume
            out = subprocess.run([sys.executable, "-m", "search.train", *args], cwd=tmp,
                                 env=env_for(tmp), capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        check_finished_run(run, ends, fig)
        n += 1


# ---------------------------------------------------------------- the search campaign


def load_trials(tmp: Path, study: str, tries: int = 50):
    import optuna
    for i in range(tries):        # the worker may hold the SQLite lock for a moment
        try:
            return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp}/optuna.db").trials
        except Exception:  # noqa: BLE001 - not created yet, or locked
            if i < tries - 1:
                time.sleep(0.2)
    return []


def check_trial_checkpoints(tmp: Path, study: str, trials) -> int:
    params = {t.number: t.params for t in trials}
    n = 0
    for d in sorted((tmp / "runs" / study).glob("trial-*")):
        n += check_checkpoints(d, params[int(d.name.split("-")[1])], resumable=False)
    return n


def kill_worker_at_random(tmp: Path, proc, rng: random.Random, study: str, seen: set) -> str:
    """Two times in three inside the 1st or 2nd trial of this worker (0-4 s after it shows
    RUNNING: set-up, steps, evaluation, checkpoint, tracking, Optuna's tell), else 0.5-6 s after
    start (imports, opening the study, the parent run). While the study has no completed trial,
    always inside this worker's 2nd trial, when its 1st has ended (completed, as a rule: the
    campaign still asserts that something was at stake): otherwise a campaign could end with
    nothing at stake (two seeds in six did)."""
    stake = any(t.state.name == "COMPLETE" for t in load_trials(tmp, study, tries=1))   # one look
    if stake and rng.random() < 1 / 3:
        wait_for(lambda: False, proc, timeout=rng.uniform(0.5, 6.0))
        return "start" if kill(proc) else ""
    mine, target = set(), rng.choice([1, 1, 2]) if stake else 2

    def trials_begun() -> int:
        running = {t.number for t in load_trials(tmp, study) if t.state.name == "RUNNING"} - seen
        seen.update(running)
        mine.update(running)
        return len(mine)
    if wait_for(lambda: trials_begun() >= target, proc, poll=0.3):
        time.sleep(rng.uniform(0, 4.0))
    return f"trial {target}" if kill(proc) else ""


def search_campaign(tmp: Path, rng: random.Random, fig: dict) -> None:
    """Studies killed until SEARCH_KILLS kills are done (one that spends its budget in between
    is checked and the next begins), the last one then run to its end."""
    import optuna  # noqa: F401 - imported here, on the campaign's thread, like the rest of it
    n = 0
    while fig["search_kills"] < SEARCH_KILLS or n == 0:
        study = f"crash{n}"
        args = [*SEARCH, "--study", study]
        completed, killed_trials, seen = {}, set(), set()
        while fig["search_kills"] < SEARCH_KILLS:
            proc, t0 = spawn(tmp, "search.run", args), time.time()
            mode = kill_worker_at_random(tmp, proc, rng, study, seen)
            fig["events"].append(f"{study} {mode or 'exited'} {time.time() - t0:.1f}s")
            if not mode:                                # the study spent its budget first
                assert proc.communicate()[0] is not None and proc.returncode == 0
                break
            fig["search_kills"] += 1
            ts = load_trials(tmp, study)
            killed_trials |= {t.number for t in ts if t.state.name == "RUNNING"}
            seen |= killed_trials             # not the next worker's trials, though still RUNNING
            for t in ts:
                if t.state.name == "COMPLETE":
                    assert completed.setdefault(t.number, t.value) == t.value
            fig["checkpoint_loads"] += check_trial_checkpoints(tmp, study, ts)
        else:
            time.sleep(3.5)                             # past the heartbeat's grace period (3 s)
            out = subprocess.run([sys.executable, "-m", "search.run", *args], cwd=tmp, env=env_for(tmp),
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        check_study(tmp, study, completed, killed_trials, fig)
        n += 1
    assert fig["trials_completed_before_a_kill"], "no trial had completed before a kill: nothing at stake"


def check_study(tmp: Path, study: str, completed: dict, killed_trials: set, fig: dict) -> None:
    ts = load_trials(tmp, study)
    state = {t.number: t.state.name for t in ts}
    assert "RUNNING" not in state.values(), state
    assert all(state[n] == "FAIL" for n in killed_trials), (killed_trials, state)
    for n, value in completed.items():                  # no completed trial lost or changed
        assert state[n] == "COMPLETE" and ts[n].value == value
    used = sum(t.user_attrs.get("device_s", 0) for t in ts)
    longest = max(t.user_attrs.get("device_s", 0) for t in ts)
    assert 0.98 * BUDGET <= used <= BUDGET + longest, (used, longest)       # spent, not overspent
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    trained = [t for t in ts if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    assert trained
    for t in trained:                                   # its MLflow run and its local metrics
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert client.get_metric_history(run.info.run_id, "val/bpb")[-1].value == pytest.approx(t.value)
        lines = (tmp / "runs" / study / f"trial-{t.number}" / "metrics.jsonl").read_text().splitlines()
        bpb = [json.loads(x)["metrics"]["val/bpb"] for x in lines if "val/bpb" in x]
        assert bpb and bpb[-1] == pytest.approx(t.value)
    fig["checkpoint_loads"] += check_trial_checkpoints(tmp, study, ts)
    fig["studies"] += 1
    fig["trials"] += len(ts)
    fig["trials_trained"] += len(trained)
    fig["trials_killed"] += len(killed_trials)
    fig["trials_completed_before_a_kill"] += len(completed)
    fig["events"].append(f"{study}: {used:.1f} device s of {BUDGET:g}")


# ---------------------------------------------------------------- the tests

SEED = 20261204


@pytest.fixture(scope="module")
def background_search(tmp_path_factory):
    """The search campaign, started on a thread the first time a test asks for it."""
    tmp = tmp_path_factory.mktemp("search")
    box = {"figures": defaultdict(int, events=[])}

    def campaign():
        t0 = time.time()
        try:
            search_campaign(tmp, random.Random(SEED + 1), box["figures"])
        except BaseException as e:  # noqa: BLE001 - re-raised by the test that reports it
            box["error"] = e
        box["seconds"] = time.time() - t0
    thread = threading.Thread(target=campaign, daemon=True, name="search-campaign")
    thread.start()
    box["thread"], box["folder"] = thread, tmp
    return box


def report(folder: Path, name: str, fig: dict, seconds: float, seed: int) -> None:
    figures = {"seed": seed, "seconds": round(seconds, 1), **dict(sorted(fig.items()))}
    (folder / "crash_figures.json").write_text(json.dumps(figures, indent=1))
    print(f"\n{name}: {json.dumps(figures)}")


def test_a_training_run_killed_at_random_points_resumes_and_loses_no_metric(tmp_path, background_search):
    t0, fig = time.time(), defaultdict(int, events=[])
    train_campaign(tmp_path, random.Random(SEED), fig)
    report(tmp_path, "training", fig, time.time() - t0, SEED)
    assert fig["train_kills"] >= TRAIN_KILLS and fig["kills_during_a_checkpoint_write"] >= 3, fig
    assert fig["resumes"] >= 3


def test_a_search_worker_killed_at_random_points_loses_no_trial(background_search):
    background_search["thread"].join(600)
    assert not background_search["thread"].is_alive(), "the search campaign did not end in 10 min"
    if "error" in background_search:
        raise background_search["error"]
    fig = background_search["figures"]
    report(background_search["folder"], "search", fig, background_search["seconds"], SEED + 1)
    assert fig["search_kills"] >= SEARCH_KILLS
