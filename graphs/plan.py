"""The Plan: what stage two of checking (`graphs.elaborate`) makes of a concrete graph. Typed
block configs, resolved edges and kinds in execution order, with no YAML left in it; its
canonical form gives the graph hash that names a trial's model everywhere (Optuna, MLflow, the
compile cache)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from blocks.kinds import Kind
from blocks.registry import Block, Context
from graphs.errors import Locator
from graphs.recipe import Training


@dataclass(frozen=True)
class Ref:
    """A resolved edge end: node id (or builtin / 'stream'), output port, layer for @k refs."""

    node: str
    port: int = 0
    layer: int | None = None


@dataclass
class Step:
    id: str
    block: type[Block]
    cfg: object
    ins: list[Ref]
    in_kinds: list[Kind]
    out_kinds: tuple[Kind, ...]
    ctx: Context
    path: tuple


@dataclass
class Group:
    id: str
    count: int
    input: Ref
    out: str
    layers: list[list[Step]]
    outer: list[str]                         # top-level ids read inside the body
    path: tuple
    kind: Kind = None
    out_kinds: tuple = ()


@dataclass
class Plan:
    """Everything the builder and the cost model need, with no YAML left in it."""

    name: str
    input: str
    vars: dict
    items: list                              # Step | Group in execution order
    outputs: dict[str, Ref]
    training: Training
    loc: Locator
    warnings: list[str] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.vars["seq_len"]

    def steps(self):
        """Every Step with its (group id, layer) or (None, None)."""
        for it in self.items:
            if isinstance(it, Group):
                for i, layer in enumerate(it.layers):
                    for s in layer:
                        yield it.id, i, s
            else:
                yield None, None, it

    def canonical(self) -> dict:
        def step(s):
            return {"id": s.id, "type": s.block.type_name, "cfg": asdict(s.cfg),
                    "in": [[r.node, r.port, r.layer] for r in s.ins]}
        items = []
        for it in self.items:
            if isinstance(it, Group):
                items.append({"group": it.id, "in": [it.input.node, it.input.port], "out": it.out,
                              "layers": [[step(s) for s in layer] for layer in it.layers]})
            else:
                items.append(step(it))
        return {"input": self.input, "seq_len": self.seq_len, "items": items,
                "outputs": {k: [r.node, r.port] for k, r in self.outputs.items()},
                "training": asdict(self.training)}

    @property
    def hash(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]
