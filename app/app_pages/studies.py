"""Studies: every Optuna study with its budget used, trial counts by state, the best trials
against the baseline (seeds and spread where the study re-ran them), and Optuna's views."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import studies, ui

st.title("Studies")
url = ui.optuna_storage()
names = ui.guard(ui.study_names, url, what="No Optuna study yet.")
if names is None:
    st.stop()

name = st.selectbox("Study", names, key="study")
study = ui.guard(studies.load, url, name)
if study is None:
    st.stop()

info = studies.overview(study)
budget = info["budget_s"]
cols = st.columns(4)
cols[0].metric("trials", info["trials"])
cols[1].metric("device time used", f"{info['used_s']:.0f} s",
               help="summed over trials: set-up, compilation, training and evaluation")
cols[2].metric("budget", f"{budget:.0f} s" if budget else "-")
cols[3].metric("in training steps", f"{100 * info['train_s'] / max(info['used_s'], 1e-9):.0f} %")
if budget:
    st.progress(min(1.0, info["used_s"] / budget), text=f"{info['used_s']:.0f} s of {budget:.0f} s budget used")
objectives = info["objectives"] or ["objective"]
st.caption(f"objectives: {', '.join(f'{o} ({d})' for o, d in zip(objectives, info['directions']))}"
           + (f" · MLflow parent run `{info['parent_run']}`" if info["parent_run"] else ""))
if info["parent_run"] and st.button("Open the study's MLflow run", key="open_parent"):
    ui.open_page("run", run_pick=info["parent_run"])

st.subheader("Trials by state")
st.dataframe(pd.DataFrame([{"state": k, "trials": v} for k, v in sorted(info["states"].items())]),
             hide_index=True, key="states")

st.subheader("Best trials against the baseline")
best = studies.best_vs_baseline(study)
if best.empty:
    st.info("No finished trial yet: the study is still running, or every trial was pruned or failed.")
else:
    st.dataframe(best.rename(columns={"value": objectives[0]}), hide_index=True, key="best")
    seeds = studies.seed_text(study)
    if seeds:
        st.code(seeds, language=None)
    else:
        st.caption("No seed re-runs: `python -m search.run ... --seeds 3` trains the two best graphs "
                   "and the baseline again with seeds 1..3 and reports mean ± sd.")
    runs = [r for r in best["mlflow run"].dropna()]
    if runs and st.button("Compare these runs", key="compare_best"):
        ui.open_page("compare", compare_pick=runs)

st.subheader("All trials")
st.dataframe(studies.trials_table(study), hide_index=True, key="trials")

st.subheader("Optuna's views")
figs = studies.figures(study)
for tab, (title, fig) in zip(st.tabs(list(figs)), figs.items()):
    with tab:
        if isinstance(fig, str):
            st.info(f"{title}: {fig}")
        else:
            st.plotly_chart(fig, key=f"fig-{title}")
