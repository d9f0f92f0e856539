"""The diff of two graphs: which nodes, block types and parameters differ.

Nodes are matched by id (a repeat group's body within the matched group); those left over are
matched by their place in the dataflow (the same inputs, through the nodes matched so far), so
gpt2's `ln_f` meets llama's `norm` and gpt2's `h` meets llama's `layers`. What stays unmatched
exists in one graph only. Both diagrams get the differing nodes highlighted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from graphs.plan import Group, Plan

KEEP = ("tokens", "targets", "bytes")  # graph inputs: the same name in every graph


@dataclass
class Node:
    key: str                 # "id", or "group/id" for a body node
    scope: str               # "" or the group id
    type: str
    cfg: dict
    ins: list[str]


@dataclass
class Diff:
    rows: list[dict] = field(default_factory=list)          # node, change, a, b, details
    vars: list[dict] = field(default_factory=list)          # name, a, b
    training: list[dict] = field(default_factory=list)
    highlight_a: set = field(default_factory=set)           # ids for graphs.diagram.to_dot
    highlight_b: set = field(default_factory=set)

    @property
    def same(self) -> bool:
        return not (self.rows or self.vars or self.training)


def _layer_cfg(layers: list[dict]) -> dict:
    """One config for a body node: a field whose value varies by layer becomes the list of values."""
    out = {}
    for k in layers[0]:
        vals = [layer.get(k) for layer in layers]
        out[k] = vals[0] if all(v == vals[0] for v in vals) else vals
    return out


def nodes(plan: Plan) -> tuple[dict[str, Node], dict[str, Group]]:
    """Every node of a plan by key, and its repeat groups by id."""
    out, groups = {}, {}
    for it in plan.items:
        if not isinstance(it, Group):
            out[it.id] = Node(it.id, "", it.block.type_name, dict(vars(it.cfg)), [r.node for r in it.ins])
            continue
        groups[it.id] = it
        body = {s.id for s in it.layers[-1]}
        for i, s in enumerate(it.layers[-1]):
            cfgs = [dict(vars(layer[i].cfg)) for layer in it.layers]
            ins = [f"{it.id}/{r.node}" if r.node in body or r.node == "stream" else r.node for r in s.ins]
            out[f"{it.id}/{s.id}"] = Node(f"{it.id}/{s.id}", it.id, s.block.type_name, _layer_cfg(cfgs), ins)
    return out, groups


def _match_groups(ga: dict, gb: dict) -> dict[str, str]:
    pairs = {g: g for g in ga if g in gb}
    left_a, left_b = [g for g in ga if g not in pairs], [g for g in gb if g not in pairs.values()]
    if len(left_a) == 1 and len(left_b) == 1:  # the layer stack of each graph
        pairs[left_a[0]] = left_b[0]
    return pairs


def match(na: dict, nb: dict, groups: dict[str, str]) -> dict[str, str]:
    """key in A -> key in B: groups, then ids within matched scopes, then dataflow."""
    pairs = dict(groups)
    pairs.update({f"{a}/stream": f"{b}/stream" for a, b in groups.items()})
    for key, n in na.items():
        scope_b = groups.get(n.scope, None) if n.scope else ""
        if scope_b is None:
            continue
        other = f"{scope_b}/{key.split('/', 1)[1]}" if n.scope else key
        if other in nb and other not in pairs.values():
            pairs[key] = other
    changed = True
    while changed:  # a leftover pair whose inputs are matched nodes, the same ones
        changed = False
        taken = set(pairs.values())
        for key, n in na.items():
            if key in pairs:
                continue
            want = [pairs.get(i, i) for i in n.ins]
            scope_b = groups.get(n.scope, "") if n.scope else ""
            hits = [k for k, m in nb.items() if k not in taken and m.ins == want and m.scope == scope_b]
            if len(hits) == 1:
                pairs[key] = hits[0]
                taken.add(hits[0])
                changed = True
    return pairs


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cfg_changes(a: dict, b: dict) -> list[str]:
    keys = list(a) + [k for k in b if k not in a]
    return [f"{k}: {_fmt(a.get(k, '-'))} → {_fmt(b.get(k, '-'))}" for k in keys if a.get(k, "-") != b.get(k, "-")]


def _bare(key: str) -> str:
    """graphs.diagram.to_dot names a body node by its bare id in `highlight`."""
    return key.split("/", 1)[-1]


def diff(a: Plan, b: Plan) -> Diff:
    """What differs between two plans (A first, B second)."""
    na, ga = nodes(a)
    nb, gb = nodes(b)
    gpairs = _match_groups(ga, gb)
    pairs = match(na, nb, gpairs)
    d = Diff()
    for ka, kb in gpairs.items():
        details = [] if ka == kb else ["renamed"]
        if ga[ka].count != gb[kb].count:
            details.append(f"layers: {ga[ka].count} → {gb[kb].count}")
        if pairs.get(ga[ka].input.node, ga[ka].input.node) != gb[kb].input.node:
            details.append(f"input: {ga[ka].input.node} → {gb[kb].input.node}")
        if details:
            d.rows.append({"node": ka if ka == kb else f"{ka} ↔ {kb}", "change": "repeat group",
                           "a": f"repeat x{ga[ka].count}", "b": f"repeat x{gb[kb].count}",
                           "details": "; ".join(details)})
    for key, n in na.items():
        if key not in pairs:
            d.rows.append({"node": key, "change": f"only in {a.name}", "a": n.type, "b": "",
                           "details": ", ".join(f"{k}={_fmt(v)}" for k, v in n.cfg.items())})
            d.highlight_a.add(_bare(key))
            continue
        m = nb[pairs[key]]
        what, details = [], []
        if n.type != m.type:
            what.append("block type")
            details.append(f"type: {n.type} → {m.type}")
        cfg = _cfg_changes(n.cfg, m.cfg)
        if cfg:
            what.append("parameters")
            details += cfg
        if [pairs.get(i, i) for i in n.ins] != m.ins:
            what.append("inputs")
            details.append(f"inputs: {', '.join(n.ins)} → {', '.join(m.ins)}")
        if what:
            d.highlight_a.add(_bare(key))
            d.highlight_b.add(_bare(m.key))
        elif _bare(key) != _bare(m.key):
            what.append("renamed")
        if what:
            d.rows.append({"node": key if key == m.key else f"{key} ↔ {m.key}", "change": ", ".join(what),
                           "a": n.type, "b": m.type, "details": "; ".join(details)})
    for key, m in nb.items():
        if key not in pairs.values():
            d.rows.append({"node": key, "change": f"only in {b.name}", "a": "", "b": m.type,
                           "details": ", ".join(f"{k}={_fmt(v)}" for k, v in m.cfg.items())})
            d.highlight_b.add(_bare(key))
    d.vars = _dict_diff(a.vars, b.vars)
    d.training = _dict_diff(asdict(a.training), asdict(b.training))
    return d


def _dict_diff(a: dict, b: dict) -> list[dict]:
    keys = list(a) + [k for k in b if k not in a]
    return [{"name": k, "a": _fmt(a.get(k, "-")), "b": _fmt(b.get(k, "-"))}
            for k in keys if a.get(k, "-") != b.get(k, "-")]
