"""Stage two of checking: a concrete graph -> a Plan (typed configs, wired edges, kinds).

Evaluates variables and expressions, instantiates each block's typed config, resolves every
edge (`node`, `node.port`, `node@k` for layer k of the same repeat group, `stream` for the value
a layer carries), orders the DAG (reporting cycles), and propagates edge kinds so that a wrong
wiring is reported at its line before anything is built.
"""
from __future__ import annotations

import keyword
import re
from dataclasses import replace

from torch import nn

import blocks
from blocks.kinds import Kind, KindError, byte_ids, tokens
from blocks.registry import Block, Context, config_fields
from graphs.errors import GraphError, Locator, did_you_mean
from graphs.expr import ExprError, evaluate, names_in
from graphs.graph import Graph
from graphs.plan import Group, Plan, Ref, Step
from graphs.recipe import Training
from graphs.values import make_config

MAX_REPEAT = 10_000
BUILTINS = ("tokens", "bytes", "targets")
_REF = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?(?:@(.+))?$")
_CLASH = set(dir(nn.Module)) | {"plan", "groups", "cfg", "ctx"}



WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def eval_vars(raw: dict, loc: Locator) -> dict:
    """Evaluate variables in dependency order (any order in the file); report cycles. A bare
    name that is not another variable is a word; booleans and words feed non-numeric fields."""
    out: dict = {}
    visiting: list[str] = []

    def get(name):
        if name in out:
            return out[name]
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise loc.error(f"variables refer to each other in a cycle: {cycle}", ("vars", name))
        v = raw[name]
        if isinstance(v, str) and WORD.match(v) and v not in raw:
            pass  # a word (e.g. `out_axis: width`), for string fields with choices
        elif isinstance(v, str) and WORD.match(v):
            visiting.append(name)
            v = get(v)  # an alias of another variable, which may hold a word or a boolean
            visiting.pop()
        elif isinstance(v, str):
            visiting.append(name)
            try:
                for dep in names_in(v):
                    if dep in raw:
                        get(dep)
                v = evaluate(v, out)
            except ExprError as e:
                raise loc.error(f"in expression {raw[name]!r}: {e}", ("vars", name))
            visiting.pop()
        elif not isinstance(v, (bool, int, float)):
            raise loc.error(f"a variable must be a number, a boolean, a word or an expression, "
                            f"got {v!r}", ("vars", name))
        out[name] = v
        return v

    for name in raw:
        get(name)
    for name in ("vocab_size", "seq_len"):
        v = out.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise loc.error(f"'{name}' must be a positive integer, got {v!r}", ("vars", name))
    return out


class _Elaborator:
    def __init__(self, graph: Graph):
        self.g = graph
        self.loc = graph.loc
        self.data = graph.data

    def run(self) -> Plan:
        if not self.g.concrete:
            raise self.loc.error("the graph still has search-space markers; resolve it first")
        self.vars = eval_vars(self.data["vars"], self.loc)
        self.input = self.data.get("input", "tokens")
        ids = tokens(self.vars["vocab_size"]) if self.input == "tokens" else byte_ids(self.vars["vocab_size"])
        self.kinds: dict[str, tuple[Kind, ...]] = {self.input: (ids,), "targets": (ids,)}
        self.types: dict[str, type[Block]] = {}
        nodes = self.data["nodes"]
        for nid in nodes:
            self._check_id(nid, ("nodes", nid))
        items = []
        for nid in self._order(nodes, ("nodes",), set(BUILTINS), body=False):
            spec = nodes[nid]
            path = ("nodes", nid)
            if "repeat" in spec:
                items.append(self._group(nid, spec, path))
            else:
                items.append(self._step(nid, spec, path, self.vars, None, None, self._scope_top))
        outputs = self._outputs()
        training = make_config(Training, self.data.get("training") or {}, self.vars, self.loc,
                               ("training",), skip=())
        plan = Plan(self.data["name"], self.input, self.vars, items, outputs, training, self.loc)
        self._ties(plan)
        self._recipe_rules(plan)
        return plan

    # ----- names and order
    def _check_id(self, nid, path):
        if keyword.iskeyword(nid):
            raise self.loc.error(f"'{nid}' is a Python keyword; choose another node id", path)
        if nid in BUILTINS or nid in ("stream", "layer"):
            raise self.loc.error(f"'{nid}' is a reserved name; choose another node id", path)
        if nid in _CLASH or nid.startswith("_"):
            raise self.loc.error(f"node id '{nid}' clashes with a PyTorch module attribute; "
                                 "choose another", path)

    def _parse_ref(self, text, path) -> tuple[str, str | None, str | None]:
        m = _REF.match(text) if isinstance(text, str) else None
        if not m:
            raise self.loc.error(f"{text!r} is not an edge (node, node.port or node@layer)", path)
        return m.group(1), m.group(2), m.group(3)

    def _refs_of(self, spec, path):
        """(name, path) of every edge a node or group reads."""
        ins = spec.get("in")
        lst = ins if isinstance(ins, list) else [ins]
        out = []
        for i, r in enumerate(lst):
            p = path + (("in", i) if isinstance(ins, list) else ("in",))
            out.append((self._parse_ref(r, p)[0], p))
        return out

    def _order(self, nodes: dict, base: tuple, known: set, body: bool) -> list[str]:
        """Topological order of `nodes`; unknown names and cycles are located errors."""
        deps = {}
        for nid, spec in nodes.items():
            path = base + (nid,)
            names = self._refs_of(spec, path)
            local = []  # what a body node can also read, for did-you-mean hints
            if "repeat" in spec:
                local = list(spec["body"]) + ["stream"]
                if body:
                    raise self.loc.error("repeat groups cannot be nested", path + ("repeat",))
                for bid, bspec in spec["body"].items():
                    bpath = path + ("body", bid)
                    if bid in nodes:
                        raise self.loc.error(f"body node '{bid}' has the same id as a top-level "
                                             "node; ids must be unique", bpath)
                    self._check_id(bid, bpath)
                    names += [(n, p) for n, p in self._refs_of(bspec, bpath)
                              if n not in spec["body"] and n != "stream"]
            dep = set()
            for name, p in names:
                if name in nodes:
                    dep.add(name)
                elif name not in known:
                    hint = did_you_mean(name, local + list(nodes) + sorted(known))
                    raise self.loc.error(f"unknown node '{name}'{hint}", p)
            deps[nid] = dep
        order, done = [], set()
        while len(order) < len(nodes):
            ready = [n for n in nodes if n not in done and deps[n] <= done]
            if not ready:
                raise self._cycle(deps, done, base)
            for n in ready:
                order.append(n)
                done.add(n)
        return order

    def _cycle(self, deps, done, base):
        start = next(n for n in deps if n not in done)
        seen, cur = [], start
        while cur not in seen:
            seen.append(cur)
            cur = next(d for d in sorted(deps[cur]) if d not in done)
        cycle = seen[seen.index(cur):] + [cur]
        return self.loc.error(f"edges form a cycle: {' -> '.join(cycle)}", base + (cycle[0], "in"))

    # ----- nodes
    def _scope_top(self, name, port, at, path):
        if at is not None:
            raise self.loc.error(f"'{name}@{at}' refers to a layer, which only a node inside a "
                                 "repeat body can do", path)
        return Ref(name, port)

    def _resolve_in(self, spec, path, scope) -> tuple[list[Ref], list[Kind]]:
        ins = spec.get("in")
        lst = ins if isinstance(ins, list) else [ins]
        refs, kinds = [], []
        for i, text in enumerate(lst):
            p = path + (("in", i) if isinstance(ins, list) else ("in",))
            name, port_name, at = self._parse_ref(text, p)
            port = 0
            if port_name is not None:
                cls = self.types.get(name)
                ports = cls.outputs if cls else ("out",)
                if port_name not in ports:
                    raise self.loc.error(f"'{name}' has no output '{port_name}'; it has: "
                                         f"{', '.join(ports)}", p)
                port = ports.index(port_name)
            ref = scope(name, port, at, p)
            refs.append(ref)
            kinds.append(self._kind_of(ref, p))
        return refs, kinds

    def _kind_of(self, ref: Ref, path) -> Kind:
        key = ref.node if ref.layer is None else f"{ref.node}@{ref.layer}"
        outs = self.kinds.get(key)
        if outs is None:
            raise self.loc.error(f"'{ref.node}' has no value here", path)
        return outs[ref.port]

    def _step(self, nid, spec, path, env, layer, n_layer, scope, key=None) -> Step:
        tname = spec["type"]
        cls = blocks.REGISTRY.get(tname)
        if cls is None:
            raise self.loc.error(f"unknown block type '{tname}'{did_you_mean(tname, blocks.REGISTRY)}",
                                 path + ("type",))
        self.types[nid] = cls
        if layer is not None and getattr(cls, "model_level", False):  # e.g. hc_expand/hc_collapse
            raise self.loc.error(f"{tname} runs once per model: place it outside the repeat group",
                                 path + ("type",))
        cfg = make_config(cls.Config, spec, env, self.loc, path)
        msg = cls.check_config(cfg)
        if msg:
            raise self.loc.error(msg, path)
        refs, kinds = self._resolve_in(spec, path, scope)
        try:
            outs = tuple(cls.infer(cfg, kinds))
        except KindError as e:
            p = path + ("in",)
            if e.port is not None and isinstance(spec.get("in"), list):
                p = p + (e.port,)
            raise self.loc.error(f"{tname}: {e}", p)
        self.kinds[key or nid] = outs
        ctx = Context(node=nid, layer=layer, n_layer=n_layer, seq_len=self.vars["seq_len"])
        return Step(nid, cls, cfg, refs, kinds, outs, ctx, path)

    # ----- repeat groups
    def _group(self, gid, spec, path) -> Group:
        count = spec["repeat"]
        if isinstance(count, str):
            try:
                count = evaluate(count, self.vars)
            except ExprError as e:
                raise self.loc.error(f"in expression {spec['repeat']!r}: {e}", path + ("repeat",))
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise self.loc.error(f"repeat must be a positive integer, got {count!r}", path + ("repeat",))
        if count > MAX_REPEAT:
            raise self.loc.error(f"repeat count {count:,} is above the limit of {MAX_REPEAT:,} layers",
                                 path + ("repeat",))
        body = spec["body"]
        out = spec.get("out", list(body)[-1])
        if out not in body:
            raise self.loc.error(f"out '{out}' is not a body node{did_you_mean(out, body)}", path + ("out",))
        name, _, at = self._parse_ref(spec["in"], path + ("in",))
        input_ref = self._scope_top(name, 0, at, path + ("in",))
        carry = self._kind_of(input_ref, path + ("in",))
        order = self._order(body, path + ("body",), set(self.kinds) | {"stream"}, body=True)
        outer = sorted({n for bid in body for n, _ in self._refs_of(body[bid], path + ("body", bid))
                        if n not in body and n != "stream"})
        layers = []
        uniform = _layer_free(body)
        for i in range(count):
            if uniform and i > 0:  # every layer elaborates alike: reuse layer 0's, re-indexed
                steps = [replace(s, ctx=replace(s.ctx, layer=i)) for s in layers[0]]
                for st in steps:
                    self.kinds[f"{st.id}@{i}"] = st.out_kinds
                layers.append(steps)
                continue
            env = dict(self.vars, layer=i)
            self.kinds["stream"] = (carry,)
            local = {}

            def scope(name, port, at, p, i=i, local=local, body=body):
                if at is not None:
                    if name not in body:
                        raise self.loc.error(f"'{name}@{at}': only nodes of this repeat body can "
                                             "be read from another layer", p)
                    try:
                        k = evaluate(at, dict(self.vars, layer=i))
                    except ExprError as e:
                        raise self.loc.error(f"in layer expression {at!r}: {e}", p)
                    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= i:
                        raise self.loc.error(f"'{name}@{at}' is layer {k!r} in layer {i}; only "
                                             f"this and earlier layers (0..{i}) can be read", p)
                    return Ref(name, port, k) if k < i else Ref(name, port)
                return Ref(name, port)

            steps = []
            for bid in order:
                s = self._step(bid, body[bid], path + ("body", bid), env, i, count, scope)
                steps.append(s)
                self.kinds[f"{bid}@{i}"] = s.out_kinds
                local[bid] = s
            out_kind = self.kinds[out][0]
            if out_kind != carry:
                raise self.loc.error(f"the body's output '{out}' is {out_kind} but layers chain "
                                     f"through {carry}; they must match", path + ("out",))
            layers.append(steps)
        for bid in body:
            self.kinds.pop(bid, None)
        self.kinds.pop("stream", None)
        self.kinds[gid] = (carry,)
        self.types[gid] = None
        return Group(gid, count, input_ref, out, layers, outer, path, carry, (carry,))

    def _outputs(self) -> dict[str, Ref]:
        outs = {}
        for key, want in (("logits", "logits"), ("loss", "loss")):
            path = ("outputs", key)
            name, port_name, at = self._parse_ref(self.data["outputs"][key], path)
            if name not in self.kinds:
                raise self.loc.error(f"unknown node '{name}'{did_you_mean(name, self.kinds)}", path)
            port = 0
            if port_name is not None:
                cls = self.types.get(name)
                ports = cls.outputs if cls else ("out",)
                if port_name not in ports:
                    raise self.loc.error(f"'{name}' has no output '{port_name}'", path)
                port = ports.index(port_name)
            kind = self.kinds[name][port]
            if kind.name != want:
                raise self.loc.error(f"output '{key}' must be {want}, '{name}' gives {kind}", path)
            outs[key] = Ref(name, port)
        return outs

    def _ties(self, plan: Plan) -> None:
        top = {s.id: s for g, _, s in plan.steps() if g is None}
        for _, _, s in plan.steps():
            for f in config_fields(s.block.Config):
                target = getattr(s.cfg, f.name)
                if f.ref and target is not None and target not in top:
                    raise self.loc.error(f"'{target}' is not a top-level node"
                                         f"{did_you_mean(target, top)}", s.path + (f.name,))


    def _recipe_rules(self, plan: Plan) -> None:
        """Blocks may need a recipe (nGPT: no warmup); refuse a `training:` that contradicts it."""
        for _, _, s in plan.steps():
            for key, want in s.block.recipe_rules.items():
                got = getattr(plan.training, key)
                if got != want:
                    raise self.loc.error(f"{s.block.type_name} (node '{s.id}') needs training.{key} = "
                                         f"{want}, the recipe has {got}", ("training", key))


def _layer_free(body: dict) -> bool:
    """True when no value of the body mentions `layer` and no edge reads another layer, so
    every layer of the group elaborates to the same configs (checked once, not count times)."""
    def free(v) -> bool:
        if isinstance(v, dict):
            return all(free(x) for x in v.values())
        if isinstance(v, list):
            return all(free(x) for x in v)
        if isinstance(v, str):
            if "@" in v:
                return False
            try:
                return "layer" not in names_in(v)
            except ExprError:
                return False  # let the full per-layer pass report it
        return True
    return free(body)


def elaborate(graph: Graph) -> Plan:
    """Check the meaning of a concrete graph and return its Plan (raises GraphError)."""
    try:
        return _Elaborator(graph).run()
    except RecursionError:
        raise graph.loc.error("the graph is nested too deeply") from None


__all__ = ["Plan", "Step", "Group", "Ref", "elaborate", "GraphError"]
