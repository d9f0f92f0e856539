"""Plotly figures of the Compare page: validation curves of several runs overlaid against tokens,
bytes of text, device time or FLOPs (smoothed, log axes), and tokens/s and memory side by side."""
from __future__ import annotations

import numpy as np
import pandas as pd

X_AXES = {"tokens": "tokens", "bytes": "bytes of training text (tokens x the run's bytes per token)",
          "device time": "device time (s of training steps)", "FLOPs": "training FLOPs"}


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard's smoothing); 0 is off."""
    if weight <= 0 or len(values) == 0:
        return np.asarray(values, dtype=float)
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return np.array(out)


def x_values(curve: pd.DataFrame, x_axis: str, gpu_s: pd.DataFrame | None,
             flops_per_token: float | None, bytes_per_token: float | None = None) -> np.ndarray | None:
    """The x coordinate of each point of a curve whose steps are tokens: tokens, bytes of text
    (tokens x the corpus's bytes per token: BPE and byte models on one axis), device time (the
    run's `budget/gpu_s` interpolated at those tokens) or FLOPs (tokens x FLOPs per token); None
    when the run lacks what the axis needs."""
    tokens = curve["step"].to_numpy(dtype=float)
    if x_axis == "tokens":
        return tokens
    if x_axis == "bytes":
        return tokens * bytes_per_token if bytes_per_token else None
    if x_axis == "FLOPs":
        return tokens * flops_per_token if flops_per_token else None
    if gpu_s is None or gpu_s.empty:
        return None
    return np.interp(tokens, gpu_s["step"].to_numpy(dtype=float), gpu_s["value"].to_numpy(dtype=float))


def curves_figure(curves: dict, metric: str, x_axis: str, weight: float = 0.0,
                  log_x: bool = False, log_y: bool = False):
    """One line per run. `curves`: label -> (x values, y values)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, (x, y) in curves.items():
        fig.add_trace(go.Scatter(x=list(map(float, x)), y=list(map(float, smooth(np.asarray(y), weight))),
                                 mode="lines+markers", name=label))
    fig.update_layout(xaxis_title=X_AXES[x_axis], yaxis_title=metric, legend_title="run",
                      margin={"l": 10, "r": 10, "t": 30, "b": 10}, height=420)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def bars_figure(labels: list[str], values: list, title: str, unit: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=labels, y=[None if v is None or pd.isna(v) else float(v) for v in values]))
    fig.update_layout(title=title, yaxis_title=unit, margin={"l": 10, "r": 10, "t": 40, "b": 10}, height=320)
    return fig


def memory_column(runs: pd.DataFrame) -> tuple[list, str]:
    """GPU peak memory where the runs logged it (GPU runs), else the machine's memory in use at
    the run's last system sample: (values in GB, the label that says which)."""
    if "peak_mem_gb" in runs and runs["peak_mem_gb"].notna().any():
        return list(runs["peak_mem_gb"]), "peak GPU memory (GB)"
    if "sys_mem_mb" in runs:
        return [None if pd.isna(v) else v / 1000 for v in runs["sys_mem_mb"]], \
            "system memory in use (GB, whole machine)"
    return [None] * len(runs), "memory (not logged)"
