"""Stage three: a Plan -> a plain nn.Module whose submodule names are the YAML node ids.

A top-level node `attn` becomes `model.attn`; layer 3 of repeat group `blocks` becomes
`model.blocks[3]` with the body's nodes as its submodules, so state_dict keys read like the
YAML (`blocks.3.attn.qkv.weight`). The forward walks a precomputed program of slot indices;
torch.compile traces through it, leaving no interpretation cost in the compiled step.
"""
from __future__ import annotations

import torch
from torch import nn

from blocks.registry import config_fields
from graphs.plan import Group, Plan, Ref, Step


def _make(step: Step) -> nn.Module:
    return step.block(step.cfg, step.in_kinds, step.ctx)


class Layer(nn.Module):
    """One layer of a repeat group: forward(stream, *extras) -> (carry, *exports)."""

    def __init__(self, steps: list[Step], out: str, extras: list[Ref], exports: list[Ref]):
        super().__init__()
        for s in steps:
            self.add_module(s.id, _make(s))
        slots = {Ref("stream"): 0}
        for i, r in enumerate(extras):
            slots[r] = 1 + i
        program = []
        for s in steps:
            ins = tuple(slots[Ref(r.node, r.port, r.layer)] for r in s.ins)
            base = len(slots)
            for p in range(len(s.out_kinds)):
                slots[Ref(s.id, p)] = base + p
            program.append((s.id, ins, len(s.out_kinds)))
        self._program = program
        self._n_slots = len(slots)
        self._result = (slots[Ref(out, 0)],) + tuple(slots[Ref(r.node, r.port)] for r in exports)

    def forward(self, stream, *extras):
        env = [stream, *extras]
        for name, ins, n_out in self._program:
            y = getattr(self, name)(*[env[i] for i in ins])
            if n_out == 1:
                env.append(y)
            else:
                env.extend(y)
        return tuple(env[i] for i in self._result)


def _feeding(items: list, node: str) -> set[str]:
    """Ids of the top-level items that `node`'s value depends on (node included)."""
    need = {node}
    for item in reversed(items):
        if item.id not in need:
            continue
        if isinstance(item, Group):
            need |= {item.input.node, *item.outer}
        else:
            need |= {r.node for r in item.ins}
    return need


class GraphModel(nn.Module):
    """The model a graph describes. forward(idx, targets=None) -> (logits, loss or None); with
    targets, the logits are None where the loss is computed without them (a fused linear
    cross-entropy), so training never pays for the [B, T, V] logits."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.plan = plan
        self._program = []
        needs_targets = {"targets"}
        for_loss = _feeding(plan.items, plan.outputs["loss"].node)
        for item in plan.items:
            if isinstance(item, Group):
                self._add_group(item, needs_targets)
            else:
                self.add_module(item.id, _make(item))
                keys = tuple((r.node, r.port) for r in item.ins)
                # skipped without targets (the loss), or with them when only the logits need it
                # (the head beside a fused linear cross-entropy: training never reads logits)
                skip = "no_targets" if any(r.node in needs_targets for r in item.ins) else \
                    None if item.id in for_loss else "targets"
                if skip == "no_targets":
                    needs_targets.add(item.id)
                self._program.append(("step", item.id, keys, len(item.out_kinds), skip))
        self._bind_refs()
        self._outputs = {k: (r.node, r.port) for k, r in plan.outputs.items()}
        self._segments = self.segments()
        # what runs each run of steps: the plain method, or a compiled region (graphs.compile)
        self.segment_fns = [self._run_steps] * len(self._segments)

    def _add_group(self, g: Group, needs_targets: set) -> None:
        cross = sorted({(r.node, r.port, r.layer) for layer in g.layers for s in layer
                        for r in s.ins if r.layer is not None})
        layers, extras_per_layer = [], []
        for i, steps in enumerate(g.layers):
            outer = list(dict.fromkeys(Ref(r.node, r.port) for s in steps for r in s.ins
                                       if r.node in g.outer))
            mine = [Ref(n, p, k) for n, p, k in cross if k < i and any(
                r == Ref(n, p, k) for s in steps for r in s.ins)]
            exports = [Ref(n, p) for n, p, k in cross if k == i]
            layers.append(Layer(steps, g.out, outer + mine, exports))
            extras_per_layer.append(([(r.node, r.port) for r in outer],
                                     [(r.node, r.port, r.layer) for r in mine],
                                     [(r.node, r.port, i) for r in exports]))
        self.add_module(g.id, nn.ModuleList(layers))
        if any(n in needs_targets for n in g.outer):
            raise ValueError("a repeat group cannot read the targets")
        self._program.append(("group", g.id, (g.input.node, g.input.port), extras_per_layer))

    def _bind_refs(self) -> None:
        for _, block in self.blocks():
            for f in config_fields(type(block.cfg)):
                target = getattr(block.cfg, f.name)
                if f.ref and target is not None:
                    block.bind(f.name, getattr(self, target))

    def segments(self) -> list:
        """The program cut into runs of top-level steps and single groups; regional compilation
        compiles each run of steps as one region (e.g. final norm + head + loss fuse)."""
        out = []
        for op in self._program:
            if op[0] == "step" and out and out[-1][0] == "steps":
                out[-1][1].append(op)
            elif op[0] == "step":
                out.append(("steps", [op]))
            else:
                out.append(("group", op))
        return out

    def _run_steps(self, ops: list, env: dict, has_targets: bool) -> dict:
        """Run a list of top-level steps on `env`; returns the values they produce."""
        local, new = dict(env), {}
        for _, name, keys, n_out, skip in ops:
            if skip == ("targets" if has_targets else "no_targets"):
                continue
            y = getattr(self, name)(*[local[k] for k in keys])
            outs = (y,) if n_out == 1 else tuple(y)
            for p, v in enumerate(outs):
                local[(name, p)] = new[(name, p)] = v
        return new

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        if idx.shape[1] > self.plan.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} exceeds the context of {self.plan.seq_len}")
        env = {(self.plan.input, 0): idx}
        if targets is not None:
            env[("targets", 0)] = targets
        for i, (kind, body) in enumerate(self._segments):
            if kind == "steps":
                env.update(self.segment_fns[i](body, env, targets is not None))
            else:
                self._run_group(body, env)
        loss_key = self._outputs["loss"]
        # logits are None with targets when the loss does not read them (a fused loss)
        return env.get(self._outputs["logits"]), env.get(loss_key) if targets is not None else None

    def _run_group(self, op, env) -> None:
        _, gid, in_key, extras_per_layer = op
        carry = env[in_key]
        for layer, (outer, cross, exports) in zip(getattr(self, gid), extras_per_layer):
            res = layer(carry, *[env[k] for k in outer], *[env[k] for k in cross])
            carry = res[0]
            for key, v in zip(exports, res[1:]):
                env[key] = v
        env[(gid, 0)] = carry

    # ----- training hooks declared by blocks
    def blocks(self):
        """(qualified name, block module) for every node, in execution order."""
        for g, i, s in self.plan.steps():
            if g is None:
                yield s.id, getattr(self, s.id)
            else:
                yield f"{g}.{i}.{s.id}", getattr(getattr(self, g)[i], s.id)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "GraphModel":
        """Deterministic initialisation: every block draws from one generator, in plan order."""
        p = next(self.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        if device.type == "meta":
            return self
        gen = torch.Generator(device=device).manual_seed(seed)
        for _, block in self.blocks():
            block.init_weights(gen)
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay for matrices, none for what blocks declare (norms, biases, tables)."""
        no_decay = set()
        for _, block in self.blocks():
            names = block.no_decay()
            for n, p in block.named_parameters():
                if n in names:
                    no_decay.add(id(p))
        decay, rest, seen = [], [], set()
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (rest if id(p) in no_decay else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": rest, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self) -> None:
        """Run the blocks' after-optimizer-step hooks (e.g. nGPT's weight renormalisation):
        the blocks that share an `after_step_all` are handed to it together, in model order."""
        batches: dict = {}
        for _, block in self.blocks():
            if block.has_after_step:
                batches.setdefault(type(block).after_step_all.__func__, []).append(block)
        for run_all, blocks in batches.items():
            run_all(type(blocks[0]), blocks)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out lookup tables unless tied to a head."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tied = {id(getattr(self, m.cfg.tie).weight) for _, m in self.blocks() if getattr(m.cfg, "tie", None)}
            for _, m in self.blocks():
                if m.lookup_table and id(m.weight) not in tied:
                    total -= m.weight.numel()
        return total


def build(plan: Plan, device: str | torch.device = "cpu", seed: int | None = 0) -> GraphModel:
    """Build the module on `device` and initialise it (skipped on meta or when seed is None)."""
    with torch.device(device):
        model = GraphModel(plan)
    if seed is not None:
        model.init_weights(seed)
    return model
