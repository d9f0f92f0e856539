"""The comparison app through Streamlit's AppTest: every page on the store the real default study
leaves (fixture `default_study`), asserting on the data shown (table contents, the figure data
of the charts, the DOT source of the diagrams); the graph diff of gpt2 and llama; the empty and
the unreachable store; 200 runs on the Compare page in under 3 s."""
from __future__ import annotations

import io
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow
MAIN = str(ROOT / "app" / "main.py")
HINT = "python -m search.run"


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(MAIN, default_timeout=120)


def open_page(page: str, **state):
    """The app run once (the Studies page), then `page` with session state set."""
    at = new_app().run()
    if page != "studies":
        for k, v in state.items():
            at.session_state[k] = v
        at.switch_page(f"app_pages/{page}.py").run()
    return at


def ok(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def table(at, column: str):
    """The first dataframe shown that has `column`."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column among "
                         f"{[list(df.value.columns) for df in at.dataframe]}")


def figures(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def dots(at) -> list[str]:
    return [c.proto.spec for c in at.get("graphviz_chart")]


@pytest.fixture
def store(default_study, monkeypatch):
    """The default study's folder as the working directory (its optuna.db is the app's default
    storage) and its MLflow store in MLFLOW_TRACKING_URI, as a user who ran the search there."""
    assert default_study.returncode == 0, default_study.stderr[-2000:]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_study.tracking_uri)
    monkeypatch.chdir(default_study.folder)
    return default_study


def mlflow_runs(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("playground")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("graph_hash")]


# ---- Studies

def test_studies_page_shows_the_study_its_trials_budget_and_optuna_views(store):
    import optuna

    at = open_page("studies")
    ok(at)
    (name,) = optuna.get_all_study_names(store.storage)          # ngpt-tiny
    study = optuna.load_study(study_name=name, storage=store.storage)
    assert at.selectbox(key="study").value == name
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["trials"] == str(len(study.trials))
    used = sum(t.user_attrs.get("device_s", 0) for t in study.trials)
    assert metrics["device time used"] == f"{used:.0f} s"
    assert metrics["budget"] == f"{study.user_attrs['budget_s']:.0f} s"

    trials = table(at, "note")
    assert sorted(trials["trial"]) == [t.number for t in study.trials]
    assert dict(zip(trials["trial"], trials["state"])) == {t.number: t.state.name for t in study.trials}
    states = table(at, "trials").set_index("state")["trials"]
    assert states.sum() == len(study.trials) and states["COMPLETE"] >= 1

    best = table(at, "role")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    top = min(done, key=lambda t: t.value)
    assert best["val_bpb"].iloc[0] == pytest.approx(top.value)
    assert "baseline" in set(best["role"])                      # the baseline is always there

    figs = figures(at)
    history = figs[0]                                            # the optimisation history
    xs = {int(x) for trace in history["data"] for x in trace.get("x", [])}
    assert {t.number for t in done} <= xs
    objective = study.user_attrs["objectives"][0]                  # val_bpb
    ys = [y for trace in history["data"] if trace.get("name") == objective for y in trace["y"]]
    assert sorted(ys) == pytest.approx(sorted(t.value for t in done))
    names = {p for t in study.trials for p in t.params}
    importance = figs[1]["data"][0]                              # horizontal bars, one per marker
    assert importance["type"] == "bar" and set(importance["y"]) <= names and importance["y"]
    assert figs[2]["data"]                                       # parallel coordinates


# ---- Compare runs

def test_compare_page_lists_runs_and_overlays_their_curves(store):
    client, runs = mlflow_runs(store.tracking_uri)
    at = open_page("compare")
    ok(at)
    shown = table(at, "best_val_bpb")
    assert set(shown["run_id"]) == {r.info.run_id for r in runs}
    row = shown.set_index("run_id")
    for r in runs:
        if "val/bpb" in r.data.metrics:
            assert row.loc[r.info.run_id, "val_bpb"] == pytest.approx(r.data.metrics["val/bpb"])
            best = min(m.value for m in client.get_metric_history(r.info.run_id, "val/bpb"))
            assert row.loc[r.info.run_id, "best_val_bpb"] == pytest.approx(best)

    picked = at.multiselect(key="compare_runs").value
    assert 1 <= len(picked) <= 3
    curves = figures(at)[0]
    assert [t["name"] for t in curves["data"]] == picked
    ids = [next(r for r in shown["run_id"] if r.startswith(p.split(" · ")[-1])) for p in picked]
    for trace, rid in zip(curves["data"], ids):
        h = sorted(client.get_metric_history(rid, "val/bpb"), key=lambda m: m.step)
        assert trace["x"] == [float(m.step) for m in h]           # against tokens
        assert trace["y"] == pytest.approx([m.value for m in h])
    bars = figures(at)[1]["data"][0]                              # a run that logged none: no bar
    got = [np.nan if v is None else v for v in bars["y"]]
    assert got == pytest.approx([row.loc[rid, "tok_s"] for rid in ids], nan_ok=True)

    at.radio(key="x_axis").set_value("FLOPs").run()
    ok(at)
    flops = [float(client.get_run(rid).data.params["flops_per_token"]) for rid in ids]
    for trace, rid, f in zip(figures(at)[0]["data"], ids, flops):
        h = sorted(client.get_metric_history(rid, "val/bpb"), key=lambda m: m.step)
        assert trace["x"] == pytest.approx([m.step * f for m in h])

    at.radio(key="x_axis").set_value("bytes").run()              # BPE and byte models on one axis
    ok(at)
    per = [float(client.get_run(rid).data.params["bytes_per_token"]) for rid in ids]
    assert all(1.5 < b < 5.0 for b in per)                        # GPT-2 tokens of Python source
    for trace, rid, b in zip(figures(at)[0]["data"], ids, per):
        h = sorted(client.get_metric_history(rid, "val/bpb"), key=lambda m: m.step)
        assert trace["x"] == pytest.approx([m.step * b for m in h])

    at.radio(key="x_axis").set_value("device time").run()
    at.checkbox(key="log_y").check().run()
    ok(at)
    fig = figures(at)[0]
    assert fig["layout"]["yaxis"]["type"] == "log"
    gpu = sorted(client.get_metric_history(ids[0], "budget/gpu_s"), key=lambda m: m.step)
    h = sorted(client.get_metric_history(ids[0], "val/bpb"), key=lambda m: m.step)
    want = np.interp([m.step for m in h], [m.step for m in gpu], [m.value for m in gpu])
    assert fig["data"][0]["x"] == pytest.approx(list(want))

    at.slider(key="smoothing").set_value(0.5).run()
    ys = figures(at)[0]["data"][0]["y"]
    assert ys[0] == pytest.approx(h[0].value)                     # debiased EMA starts at the data
    if len(h) > 1:
        assert ys[1] == pytest.approx((0.5 * h[0].value + h[1].value) / 1.5)


# ---- Graph

def test_graph_page_draws_a_runs_graph_and_its_costs(store):
    _, runs = mlflow_runs(store.tracking_uri)
    run = runs[0]
    at = open_page("graph", run_graph=run.info.run_id)
    ok(at)
    assert at.radio(key="A_kind").value == "run"
    (dot,) = dots(at)
    params = run.data.params
    assert dot.startswith(f'digraph "{params["graph.name"]}"')
    assert f"repeat x{params['graph.vars.n_layer']}" in dot             # the folded layer stack
    for node in ("tok", "head", "loss"):
        assert f'"{node}" [label="{node}\\n' in dot
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["parameters"] == f"{int(params['params']):,}"        # the trainer's count
    costs = table(at, "MFLOP/token")
    assert {"tok", "head", "loss"} <= set(costs["node"])
    flops = costs.set_index("node")["MFLOP/token"]
    # the vocabulary projection is costed once: on the loss when it is fused with the head (the
    # shipped graphs' default), else on the head
    assert flops["loss"] > 0 and flops["head"] == 0 if "linear_cross_entropy" in dot else \
        flops["head"] > 0 and flops["loss"] == 0


def test_graph_diff_of_gpt2_and_llama_names_what_differs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/none.db")  # files need no store
    monkeypatch.chdir(tmp_path)
    at = open_page("graph", diffing=True)
    ok(at)
    assert at.radio(key="A_kind").value == "graph file"
    assert (at.selectbox(key="A_file").value, at.selectbox(key="B_file").value) == ("gpt2.yaml", "llama.yaml")
    assert at.selectbox(key="A_size").value == at.selectbox(key="B_size").value == "tiny"
    rows = table(at, "details").set_index("node")
    assert rows.loc["pos", "change"] == "only in gpt2"
    assert rows.loc["ln_f ↔ norm", "details"].startswith("type: layernorm → rmsnorm")
    assert "type: mlp → swiglu" in rows.loc["h/mlp ↔ layers/mlp", "details"]
    assert "rope: False → True" in rows.loc["h/attn ↔ layers/attn", "details"]
    assert "h/r1 ↔ layers/r1" not in rows.index                   # the same block: not listed
    variables = table(at, "name").set_index("name")
    assert variables.loc["n_kv_head", "b"] == "4"
    a, b = dots(at)
    filled = lambda dot, node: any(line.strip().startswith(f'"{node}"') and "filled" in line
                                   for line in dot.splitlines())
    assert filled(a, "pos") and filled(a, "ln_f") and filled(a, "h/mlp") and not filled(a, "tok")
    assert filled(b, "norm") and filled(b, "layers/mlp") and not filled(b, "layers/r1")


# ---- Run

def test_run_page_shows_config_tags_metrics_artifacts_and_exports(store):
    _, runs = mlflow_runs(store.tracking_uri)
    run = next(r for r in runs if r.data.tags.get("status") == "completed")
    at = open_page("run", run_pick=run.info.run_id)
    ok(at)
    tags = table(at, "tag").set_index("tag")["value"]
    assert tags["graph_hash"] == run.data.tags["graph_hash"]
    metrics = table(at, "last value").set_index("metric")["last value"]
    assert metrics["val/bpb"] == pytest.approx(run.data.metrics["val/bpb"])
    params = table(at, "param").set_index("param")["value"]
    assert params["params"] == run.data.params["params"]
    files = set(table(at, "bytes")["path"])
    assert {"graph.yaml", "run_config.json", "checkpoint/model.safetensors"} <= files
    system = [f for f in figures(at) if f["layout"]["title"]["text"] == "system metrics"]
    assert system and {t["name"] for t in system[0]["data"]} == \
        {k.removeprefix("system/") for k in run.data.metrics if k.startswith("system/")}

    at.button(key="export").click().run()
    ok(at)
    exported = table(at, "file")["file"].tolist()
    assert {"model.py", "model.safetensors", "config.json", "README.md"} <= set(exported)
    assert at.get("download_button")
    _, out = at.session_state["exported"]
    with zipfile.ZipFile(io.BytesIO(out.data)) as z:
        assert "def forward" in z.read("model.py").decode()


# ---- empty and unreachable stores

def test_empty_store_names_the_command_on_every_page(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    for page in ("studies", "compare", "run"):
        at = open_page(page)
        ok(at)
        assert any(HINT in i.value for i in at.info), (page, [i.value for i in at.info])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.db").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_store_gives_an_error_panel_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "optuna.db").write_text("not a database")
    started = time.time()
    for page in ("studies", "compare", "run"):
        at = open_page(page)
        assert not at.exception, [e.value for e in at.exception]
        assert any("Cannot read the store" in e.value for e in at.error), (page, [e.value for e in at.error])
    assert time.time() - started < 30                            # no minutes of HTTP retries


# ---- many runs

def fill_store(uri: str, n: int) -> None:
    """`n` finished training runs with the keys the Compare page reads, through the client (two
    calls a run: about 0.1 s each on the 2-core machine)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(uri)
    exp = client.create_experiment("many")
    now = int(time.time() * 1000)
    for i in range(n):
        run = client.create_run(exp, run_name=f"synthetic-{i}", start_time=now + i,
                                tags={"graph": "gpt2", "graph_hash": f"{i:016x}", "status": "completed"})
        metrics = [Metric(k, v, now, step) for step in (2048, 4096, 8192)
                   for k, v in (("val/bpb", 7 - step / 4000 - i / 1000), ("budget/gpu_s", step / 400),
                                ("train/loss", 8 - step / 2000))]
        metrics.append(Metric("final/tok_s", 400.0 + i, now, 8192))
        params = [Param("params", "3300000"), Param("flops_per_token", "2e7"),
                  Param("graph.vars.n_layer", str(2 + i % 3)), Param("graph.vars.d_model", "64")]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)


@pytest.fixture
def fast_tmp(tmp_path):
    """A folder in memory where there is one (/dev/shm): SQLite commits there cost no fsync, so
    200 runs are written in seconds rather than half a minute."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="test-app-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_compare_page_with_200_runs_renders_in_under_3_seconds(fast_tmp, monkeypatch):
    tmp_path = fast_tmp
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t0 = time.time()
    fill_store(uri, 200)
    print(f"\n200 runs written in {time.time() - t0:.1f} s")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    at = new_app().run()                 # the first page; imports are paid here, not below
    at.switch_page("app_pages/compare.py")
    started = time.time()
    at.run()
    seconds = time.time() - started
    ok(at)
    print(f"\nCompare page with 200 runs: {seconds:.2f} s (uncached queries)")
    assert len(table(at, "best_val_bpb")) == 200
    assert len(figures(at)[0]["data"]) == 3
    assert seconds < 3.0, seconds
