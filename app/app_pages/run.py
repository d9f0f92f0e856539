"""Run: one run's config, tags, metrics (system metrics drawn), artifacts, and Export: its
checkpoint as a standalone model, zipped for download."""
from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd
import streamlit as st

from app import ui

st.title("Run")
uri = ui.tracking_uri()
runs = ui.guard(ui.runs_table, uri, what="No runs yet.")
if runs is None:
    st.stop()

labels = {ui.run_label(r): r["run_id"] for _, r in runs.iterrows()}
by_id = {v: k for k, v in labels.items()}
wanted = st.session_state.pop("run_pick", None) or st.query_params.get("run")
if wanted in by_id:
    st.session_state["run_label"] = by_id[wanted]
elif st.session_state.get("run_label") not in labels:
    trained = ui.best_first(runs)
    st.session_state["run_label"] = by_id[(trained if not trained.empty else runs)["run_id"].iloc[0]]
label = st.selectbox("Run", list(labels), key="run_label")
run_id = labels[label]
st.query_params["run"] = run_id
detail = ui.guard(ui.run_detail, uri, run_id)
if detail is None:
    st.stop()
info, tags, params, metrics = detail["info"], detail["tags"], detail["params"], detail["metrics"]


def when(ms) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


c = st.columns(4)
c[0].metric("status", tags.get("status") or info["status"].lower())
c[1].metric("graph", tags.get("graph", "-"))
c[2].metric("val bpb", f"{metrics['val/bpb']:.4f}" if "val/bpb" in metrics else "-")
dur = (info["end_time"] - info["start_time"]) / 1000 if info["end_time"] and info["start_time"] else None
c[3].metric("wall time", f"{dur:.0f} s" if dur is not None else "-")
st.caption(f"run `{run_id}` · {info['name']} · started {when(info['start_time'])}"
           + (f" · study {tags['optuna.study']} trial {tags.get('optuna.trial')}" if "optuna.study" in tags else "")
           + (f" · {tags['message']}" if tags.get("message") else ""))
if tags.get("graph_hash") and st.button("Show its graph", key="show_graph"):
    ui.open_page("graph", run_graph=run_id)

config, tag_tab, metric_tab, artifact_tab, export_tab = st.tabs(
    ["Config", "Tags", "Metrics", "Artifacts", "Export"])


def run_config_json(text: str) -> None:
    try:
        data = json.loads(text)
    except ValueError as e:
        st.warning(f"run_config.json is not valid JSON ({e}); shown as text.")
        st.code(text[:20000], language=None)
        return
    st.json(data, expanded=1)


with config:
    run_config = ui.guard(ui.artifact_text, uri, run_id, "run_config.json")
    if run_config:
        with st.expander("run_config.json: how it was trained", expanded=True):
            run_config_json(run_config)
    graph_yaml = ui.guard(ui.artifact_text, uri, run_id, "graph.yaml")
    if graph_yaml:
        with st.expander("graph.yaml: the resolved graph"):
            st.code(graph_yaml, language="yaml")
    st.dataframe(pd.DataFrame(sorted(params.items()), columns=["param", "value"]), hide_index=True,
                 key="params")

with tag_tab:
    st.dataframe(pd.DataFrame(sorted(tags.items()), columns=["tag", "value"]), hide_index=True, key="tags")

with metric_tab:
    st.dataframe(pd.DataFrame(sorted(metrics.items()), columns=["metric", "last value"]), hide_index=True,
                 key="metrics")
    system = sorted(k for k in metrics if k.startswith("system/"))
    if system:
        import plotly.graph_objects as go

        fig = go.Figure()
        for k in system:
            h = ui.history(uri, run_id, k)
            fig.add_trace(go.Scatter(x=list(h["time"]), y=list(h["value"]), mode="lines+markers",
                                     name=k.removeprefix("system/")))
        fig.update_layout(title="system metrics", xaxis_title="seconds since the first sample",
                          height=380, margin={"l": 10, "r": 10, "t": 40, "b": 10})
        st.plotly_chart(fig, key="system")
    else:
        st.caption("No system metrics (they need psutil; MLflow samples them every 10 s).")

with artifact_tab:
    files = ui.guard(ui.artifacts, uri, run_id)
    if files:
        st.dataframe(pd.DataFrame(files), hide_index=True, key="artifacts")
        links = [f["path"] for f in files if f.get("refused")]
        if links:
            st.warning(f"Not read: {', '.join(links)}: links leading outside the store's folder.")
    elif files is not None:
        st.caption("No artifacts.")

with export_tab:
    st.write("The run's checkpoint as a standalone model: `model.py` needing only PyTorch, "
             "`model.safetensors`, `config.json`, a model card and `generate.py` "
             f"(the same as `python -m graphs.export {run_id} --out DIR`).")
    formats = st.multiselect("Formats", ["standalone", "hf", "pt2"], default=["standalone"], key="formats")
    if st.button("Export", key="export", disabled=not formats):
        from app.export import ExportFailed, export_run

        with st.spinner("Exporting..."):
            try:
                st.session_state["exported"] = (run_id, export_run(uri, run_id, ",".join(formats)))
            except (ExportFailed, ui.StoreError) as e:
                st.session_state.pop("exported", None)
                st.error(f"Export failed: {e}")
    done = st.session_state.get("exported")
    if done and done[0] == run_id:
        out = done[1]
        st.success(f"Exported {len(out.files)} files from {out.source}.")
        if out.note:
            st.warning(f"The run's folder was not read: {out.note}.")
        st.download_button(f"Download {out.name}", out.data, file_name=out.name, mime="application/zip",
                           key="download")
        st.dataframe(pd.DataFrame({"file": out.files}), hide_index=True, key="export_files")
