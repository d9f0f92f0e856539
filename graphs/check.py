"""`python -m graphs.check FILE... [--size S|all] [--set k=v] [--nodes]`

Validates graphs and prints, before any GPU second is spent: parameters, FLOPs per token,
activation memory, the graph hash and the search space. Exit 0 when every graph is valid, 2 with
located messages (file:line:column: path: problem) when one is not.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from graphs.cost import BYTES_PER_PARAM, FLOPS_FORMULA, Cost, analyse
from graphs.elaborate import elaborate
from graphs.plan import Plan
from graphs.errors import GraphError, Problem
from graphs.graph import Graph, load


@dataclass
class Report:
    graph: Graph
    plan: Plan
    cost: Cost


def variants(graph: Graph):
    """Resolutions to try beyond the default: each choice option and each range end, alone."""
    for d in graph.space():
        if d.parent is not None:
            base = {d.parent[0]: d.parent[1]}
        else:
            base = {}
        values = d.choices if d.kind == "choice" else (d.low, d.high)
        for v in values:
            if v != d.default:
                yield {**base, d.name: v}


def check_graph(graph: Graph) -> Report:
    """Check a graph (family): the default fully, every option and range end structurally."""
    plan = elaborate(graph.resolve())
    cost = analyse(plan)
    for params in variants(graph):
        try:
            elaborate(graph.resolve(params))
        except GraphError as e:
            what = ", ".join(f"{k} = {v}" for k, v in params.items())
            raise GraphError([Problem(f"with {what}: {p.message}", p.path, p.file, p.line, p.column)
                              for p in e.problems]) from None
    return Report(graph, plan, cost)


def check_file(path: str, size: str | None = None, sets=()) -> list[Report]:
    """Check one file at one size, or at every declared size with size='all'."""
    if size == "all":
        declared = load(path).data["sizes"]
        sizes = list(declared) + ([] if {} in declared.values() else ["default"])
        return [r for s in sizes for r in check_file(path, s, sets)]
    return [check_graph(load(path, size, sets))]


def _si(x: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def format_report(r: Report, nodes: bool = False) -> str:
    c, g = r.cost, r.graph
    rows = [
        ("graph", f"{g.name}  ({g.file}, size {g.size})"),
        ("hash", r.plan.hash),
        ("parameters", f"{c.params:,} ({_si(c.params)}); non-embedding {c.params_non_embedding:,}"),
        ("FLOPs per token", f"{_si(c.flops_per_token, 'FLOP')} at T={c.seq_len} (training; "
                            f"{FLOPS_FORMULA})"),
        ("activations", f"{_si(c.act_bytes_per_seq, 'B')} per sequence of {c.seq_len} "
                        "(bf16 outputs of every op in one forward, attention as a fused kernel: "
                        "an upper estimate of what backward keeps)"),
        ("training state", f"{_si(c.train_state_bytes, 'B')} ({BYTES_PER_PARAM} bytes/parameter: "
                           "fp32 weights, gradients, AdamW moments)"),
    ]
    dims = g.space()
    rows.append(("search space", f"{len(dims)} dimension{'s' if len(dims) != 1 else ''}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    for d in dims:
        lines.append(f"  {d.name:<{width + 10}} {d.describe()}")
    if nodes:
        lines.append(f"  {'node':<28} {'type':<18} {'params':>14} {'FLOP/token':>14} {'act/seq':>12}")
        for n in c.nodes:
            lines.append(f"  {n.name:<28} {n.type:<18} {n.params:>14,} {_si(n.flops_per_token):>14} "
                         f"{_si(n.act_bytes, 'B'):>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphs.check", description=__doc__.split("\n\n")[1])
    ap.add_argument("files", nargs="+", metavar="FILE")
    ap.add_argument("--size", help="a size declared in the graph, or 'all' (default: the vars as written)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V",
                    help="override a variable (d_model=512) or a path (training.lr=3e-4)")
    ap.add_argument("--nodes", action="store_true", help="print the cost of every node")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    args = ap.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            for r in check_file(path, args.size, args.set):
                print(format_report(r, args.nodes), end="\n\n")
        except GraphError as e:
            print(e, file=sys.stderr)
            status = 2
        except Exception as e:  # a bug of ours, not the user's: say so without a traceback
            if args.debug:
                raise
            print(f"{path}: internal error ({type(e).__name__}: {e}); please report it with this "
                  "file, or rerun with --debug", file=sys.stderr)
            status = max(status, 1)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # output piped into `head`
        sys.exit(0)
