"""Graph: a run's graph (or a graph file at a size) drawn as a diagram, its cost table (params,
FLOPs, memory per node), and the diff of two graphs highlighted on both diagrams."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import ui
from app.graphdiff import diff

GRAPHS = Path(__file__).resolve().parents[2] / "graphs"


@st.cache_resource(max_entries=64, show_spinner=False)
def plan_of(text: str, size: str | None):
    """The elaborated plan of a graph's YAML text (markers at their defaults)."""
    import graphs

    g = graphs.loads(text, size)
    return graphs.elaborate(g.resolve() if g.space() else g)


@st.cache_resource(max_entries=64, show_spinner=False)
def cost_of(text: str, size: str | None):
    from graphs.cost import analyse

    return analyse(plan_of(text, size))


def cost_table(cost) -> pd.DataFrame:
    return pd.DataFrame([{"node": n.name, "type": n.type, "params": n.params,
                          "MFLOP/token": round(n.flops_per_token / 1e6, 4),
                          "activations KiB/seq": round(n.act_bytes / 1024, 1)} for n in cost.nodes])


def sizes_of(path: Path) -> list[str]:
    import yaml

    return ["default", *((yaml.safe_load(path.read_text()) or {}).get("sizes") or {})]


def _initial(key: str, value, force: bool = False) -> None:
    """A widget's starting value through session state (never also as its default argument)."""
    if force or key not in st.session_state:
        st.session_state[key] = value


def pick(side: str, default_run: str | None, default_file: str):
    """One graph: a run's graph.yaml or a file with a size -> (label, yaml text, size) or None."""
    uri = ui.tracking_uri()
    try:
        runs = ui.best_first(ui.runs_table(uri))
    except ui.StoreError:
        runs = None  # files still work without a store
    kinds = ["run", "graph file"] if runs is not None and not runs.empty else ["graph file"]
    _initial(f"{side}_kind", "run" if default_run and "run" in kinds else kinds[-1 if side == "B" else 0],
             force=default_run is not None and "run" in kinds)
    kind = st.radio(f"Graph {side} from", kinds, horizontal=True, key=f"{side}_kind")
    if kind == "run":
        labels = {ui.run_label(r): r["run_id"] for _, r in runs.iterrows()}
        by_id = {v: k for k, v in labels.items()}
        _initial(f"{side}_run", by_id.get(default_run, next(iter(labels))), force=default_run in by_id)
        label = st.selectbox(f"Run {side}", list(labels), key=f"{side}_run")
        try:
            text = ui.artifact_text(uri, labels[label], "graph.yaml")
        except ui.OutsideStore as e:
            ui.refused(e)
            return None
        except ui.StoreError as e:
            ui.error(e)
            return None
        if text is None:
            st.warning(f"Run {labels[label]} has no graph.yaml artifact.")
            return None
        return label, text, None
    files = sorted(p.name for p in GRAPHS.glob("*.yaml"))
    c = st.columns(2)
    _initial(f"{side}_file", default_file if default_file in files else files[0])
    name = c[0].selectbox(f"File {side}", files, key=f"{side}_file")
    sizes = sizes_of(GRAPHS / name)
    if st.session_state.get(f"{side}_size") not in sizes:
        st.session_state[f"{side}_size"] = "tiny" if "tiny" in sizes else sizes[0]
    size = c[1].selectbox(f"Size {side}", sizes, key=f"{side}_size")
    return f"{name} ({size})", (GRAPHS / name).read_text(), size


def show_graph(label: str, text: str, size: str | None, highlight: set | None = None) -> None:
    """The diagram (graphs.diagram's DOT, rendered in the browser), `highlight` nodes filled."""
    from graphs.diagram import to_dot

    plan = plan_of(text, size)
    st.markdown(f"**{label}** · `{plan.name}` · hash `{plan.hash}`")
    st.graphviz_chart(to_dot(plan, highlight or set()))


st.title("Graph")
pair = st.session_state.pop("graph_pick", None)      # sent by Compare: two run ids
single = st.session_state.pop("run_graph", None)      # sent by Run: one run id
a = pick("A", pair[0] if pair else single, "gpt2.yaml")
if a is None:
    st.stop()
_initial("diffing", bool(pair), force=bool(pair))
diffing = st.toggle("Diff with another graph", key="diffing")

if not diffing:
    try:
        show_graph(*a)
        cost = cost_of(a[1], a[2])
    except Exception as e:  # noqa: BLE001 - a graph that no longer loads (an older block set)
        st.error(f"This graph cannot be drawn with the current code: {e}")
        st.stop()
    c = st.columns(3)
    c[0].metric("parameters", f"{cost.params:,}")
    c[1].metric("FLOPs per token", f"{cost.flops_per_token / 1e6:,.2f} M")
    c[2].metric("activations per sequence", f"{cost.act_bytes_per_seq / 2**20:,.2f} MiB")
    st.subheader("Cost per node")
    st.dataframe(cost_table(cost), hide_index=True, key="cost_table")
    st.caption(f"Training state {cost.train_state_bytes / 2**20:,.1f} MiB (16 bytes per parameter) · "
               f"sequence length {cost.seq_len} · activations as bf16")
    st.stop()

b = pick("B", pair[1] if pair else None, "llama.yaml")
if b is None:
    st.stop()
try:
    d = diff(plan_of(a[1], a[2]), plan_of(b[1], b[2]))
except Exception as e:  # noqa: BLE001
    st.error(f"These graphs cannot be compared with the current code: {e}")
    st.stop()
st.subheader("What differs")
if d.same:
    st.success("The two graphs are the same architecture and recipe.")
else:
    for title, rows, key in (("Nodes", d.rows, "diff_nodes"), ("Variables", d.vars, "diff_vars"),
                             ("Training recipe", d.training, "diff_training")):
        if rows:
            st.markdown(f"**{title}** ({len(rows)} differ)")
            st.dataframe(pd.DataFrame(rows), hide_index=True, key=key)
        else:
            st.caption(f"{title}: the same")
left, right = st.columns(2)
with left:
    show_graph(*a, highlight=d.highlight_a)
with right:
    show_graph(*b, highlight=d.highlight_b)
st.caption("Filled nodes differ: only in this graph, another block type, other parameters or inputs. "
           "Nodes are matched by id, then by their inputs.")
