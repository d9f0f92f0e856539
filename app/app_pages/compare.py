"""Compare runs: a filterable table of every run (graph variables, final and best metrics, graph
hash, status); the picked runs' curves overlaid against tokens, device time or FLOPs, with
smoothing and log axes; tokens/s and memory side by side."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts, ui

METRICS = ["val/bpb", "val/loss", "train/loss"]
FIRST = ["name", "status", "graph", "hash", "study", "trial", "seed", "params", "val_bpb", "best_val_bpb",
         "val_loss", "tok_s", "device_s"]

st.title("Compare runs")
uri = ui.tracking_uri()
runs = ui.guard(ui.runs_table, uri, what="No runs yet.")
if runs is None:
    st.stop()


def filtered(df: pd.DataFrame) -> pd.DataFrame:
    """The filter row: experiment, study, status, training runs only, free text."""
    c = st.columns([2, 2, 2, 3, 1.4])
    exps = c[0].multiselect("Experiment", sorted(df["experiment"].dropna().unique()), key="f_exp")
    study_list = ["(all)"] + sorted(df["study"].dropna().unique())
    study = c[1].selectbox("Study", study_list, key="f_study")
    statuses = c[2].multiselect("Status", sorted(df["status"].dropna().unique()), key="f_status")
    text = c[3].text_input("Filter", placeholder="name, graph, hash or run id", key="f_text")
    trained = c[4].checkbox("Training runs only", value=True, key="f_trained",
                            help="Hide the parent runs of studies and comparisons")
    if exps:
        df = df[df["experiment"].isin(exps)]
    if study != "(all)":
        df = df[df["study"] == study]
    if statuses:
        df = df[df["status"].isin(statuses)]
    if trained:
        df = ui.training_runs(df)
    if text:
        hay = df[["name", "graph", "hash", "run_id"]].fillna("").astype(str).agg(" ".join, axis=1)
        df = df[hay.str.contains(text, case=False, regex=False)]
    return df


shown = filtered(runs)
if shown.empty:
    st.info("No run matches the filters.")
    st.stop()
shown = shown.assign(best_val_bpb=shown["run_id"].map(ui.best_values(uri, tuple(shown["run_id"]), "val/bpb")))
shown = shown.sort_values("val_bpb", na_position="last")
cols = [c for c in FIRST if c in shown] + [c for c in shown if c not in FIRST]
st.dataframe(shown[cols], hide_index=True, key="runs_table",
             column_config={"start": st.column_config.DatetimeColumn("start", format="YYYY-MM-DD HH:mm")})
st.caption(f"{len(shown)} of {len(runs)} runs · final values are the last logged; best_val_bpb is the "
           "lowest over the run's evaluations · var.* columns are graph variables that differ between runs")

labels = {r.run_id: ui.run_label(r._asdict()) for r in shown[["run_id", "name"]].itertuples(index=False)}
by_label = {v: k for k, v in labels.items()}
if "compare_pick" in st.session_state:  # sent by another page (Studies: "compare these runs")
    st.session_state["compare_runs"] = [labels[r] for r in st.session_state.pop("compare_pick") if r in labels]
if "compare_runs" not in st.session_state:
    done = shown[shown["val_bpb"].notna()]
    st.session_state["compare_runs"] = [labels[r] for r in done["run_id"][:3]]
st.session_state["compare_runs"] = [x for x in st.session_state["compare_runs"] if x in by_label]
picked = st.multiselect("Runs to compare", list(labels.values()), key="compare_runs")
if not picked:
    st.info("Pick runs above to overlay their curves.")
    st.stop()
chosen = shown.set_index("run_id").loc[[by_label[x] for x in picked]]

c = st.columns([2, 3, 2, 1, 1])
metric = c[0].radio("Metric", METRICS, horizontal=True, key="metric")
x_axis = c[1].radio("Against", list(charts.X_AXES), horizontal=True, key="x_axis")
weight = c[2].slider("Smoothing", 0.0, 0.95, 0.0, 0.05, key="smoothing")
log_x = c[3].checkbox("log x", key="log_x")
log_y = c[4].checkbox("log y", key="log_y")

curves, missing = {}, []
for run_id, row in chosen.iterrows():
    label = labels[run_id]
    curve = ui.history(uri, run_id, metric)
    gpu_s = ui.history(uri, run_id, "budget/gpu_s") if x_axis == "device time" else None
    x = charts.x_values(curve, x_axis, gpu_s, row.get("flops_per_token"), row.get("bytes_per_token"))
    if curve.empty or x is None:
        missing.append(label)
    else:
        curves[label] = (x, curve["value"].to_numpy())
st.plotly_chart(charts.curves_figure(curves, metric, x_axis, weight, log_x, log_y), key="curves")
if missing:
    st.caption(f"No {metric} against {x_axis} for: {', '.join(missing)}")

left, right = st.columns(2)
names = [labels[r] for r in chosen.index]
left.plotly_chart(charts.bars_figure(names, list(chosen["tok_s"]), "tokens per second", "tok/s"), key="tok_s")
mem, mem_label = charts.memory_column(chosen)
right.plotly_chart(charts.bars_figure(names, mem, mem_label, "GB"), key="memory")

c = st.columns(3)
one = c[0].selectbox("Run", picked, key="open_one", label_visibility="collapsed")
if c[1].button("Open run", key="open_run"):
    ui.open_page("run", run_pick=by_label[one])
if len(picked) >= 2 and c[2].button("Diff the graphs of the first two", key="diff_two"):
    ui.open_page("graph", graph_pick=(by_label[picked[0]], by_label[picked[1]]))
