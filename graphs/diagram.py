"""Graphviz DOT of a Plan: blocks as nodes, edges labelled with their kinds, each repeat group
folded into one box that shows its body once with the layer count.

`python -m graphs.diagram FILE [--size S] > graph.dot` (render with `dot -Tsvg`, or hand the
text to Streamlit's `st.graphviz_chart`, which renders it in the browser).
"""
from __future__ import annotations

import argparse
import sys

from blocks.kinds import Kind
from blocks.registry import config_fields
from graphs.elaborate import elaborate
from graphs.plan import Group, Plan
from graphs.graph import load


def _q(s: str) -> str:
    """Quote for DOT; labels keep their \\n line breaks (ids are identifiers)."""
    return '"' + s.replace('"', '\\"') + '"'


def _kind_label(k: Kind) -> str:
    if k.name in ("hidden", "streams"):
        extra = f" x{k.n}" if k.n else ""
        seq = "" if k.seq == "token" else f" {k.seq}"
        return f"{k.name}{seq} d={k.width}{extra}"
    return k.name


def _node(nid: str, step, highlight: set) -> str:
    defaults = {f.name: f.default for f in config_fields(step.block.Config)}
    params = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in vars(step.cfg).items() if v != defaults.get(k)][:4]
    short = nid.split("/")[-1]
    label = f"{short}\\n{step.block.type_name}" + (f"\\n{', '.join(params)}" if params else "")
    style = ', style="filled", fillcolor="#ffd7a8"' if nid in highlight else ""
    return f"  {_q(nid)} [label={_q(label)}{style}];"


def to_dot(plan: Plan, highlight: set | None = None) -> str:
    """DOT source; node ids in `highlight` (e.g. those a diff found) are filled."""
    hl = highlight or set()
    lines = [f"digraph {_q(plan.name)} {{", '  rankdir=TB; node [shape=box, fontsize=10];',
             '  edge [fontsize=8];', f'  {_q(plan.input)} [shape=ellipse];',
             '  "targets" [shape=ellipse];']
    edges = []

    def add_edges(step, prefix, kinds, group=None):
        for ref, kind in zip(step.ins, step.in_kinds):
            src = ref.node
            if group is not None and ref.node == "stream":
                src = f"{group.id}/in"
            elif group is not None and ref.node in {s.id for s in group.layers[-1]}:
                src = f"{group.id}/{ref.node}"
            label = _kind_label(kind) + (f" @{ref.layer}" if ref.layer is not None else "")
            edges.append(f"  {_q(src)} -> {_q(prefix + step.id)} [label={_q(label)}];")

    for item in plan.items:
        if isinstance(item, Group):
            lines.append(f"  subgraph {_q('cluster_' + item.id)} {{")
            lines.append(f"    label={_q(f'{item.id}: repeat x{item.count}')}; style=rounded;")
            lines.append(f"    {_q(item.id + '/in')} [label=\"stream\", shape=ellipse];")
            body = item.layers[-1]
            for s in body:
                lines.append("  " + _node(f"{item.id}/{s.id}", s, {f"{item.id}/{x}" for x in hl}))
            lines.append("  }")
            for s in body:
                add_edges(s, f"{item.id}/", None, item)
            edges.append(f"  {_q(item.input.node)} -> {_q(item.id + '/in')} "
                         f"[label={_q(_kind_label(item.kind))}];")
            edges.append(f"  {_q(item.id + '/' + item.out)} -> {_q(item.id)} [style=dashed];")
            lines.append(f"  {_q(item.id)} [label={_q(item.id + ' out')}, shape=point];")
        else:
            lines.append(_node(item.id, item, hl))
            add_edges(item, "", None)
    return "\n".join(lines + edges + ["}"]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphs.diagram")
    ap.add_argument("file")
    ap.add_argument("--size")
    args = ap.parse_args(argv)
    sys.stdout.write(to_dot(elaborate(load(args.file, args.size).resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
