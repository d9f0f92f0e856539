"""The cost model: build on the meta device, run one forward, and count.

No memory is allocated and no GPU is needed. Every block's output shape is checked against the
kind the checker inferred, so a block whose real shapes disagree with its declaration is caught
here, located at its node.

FLOPs per token (training) = 3 x the forward FLOPs that torch.utils.flop_counter counts
(matmuls and attention; attention counted in full, not halved for causality). For GPT-2 this is
exactly PaLM's 6N + 12*L*d*T, where N counts the tied table once, as the head.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from blocks.kinds import Kind
from graphs.build import GraphModel, build
from graphs.plan import Plan

MAX_PARAMS = 1e12          # 16 TB of fp32 weights, grads and AdamW moments: no machine trains this
MAX_ACT_BYTES = 1e12       # activations of a single sequence
BYTES_PER_PARAM = 16
FLOPS_FORMULA = ("3 x forward FLOPs counted by torch.utils.flop_counter (matmuls + attention in "
                 "full) = PaLM's 6N + 12*L*d*T for a GPT-2 graph")


@dataclass(frozen=True)
class NodeCost:
    name: str
    type: str
    params: int
    flops_per_token: float      # training (3 x forward)
    act_bytes: float            # per sequence, bf16


@dataclass(frozen=True)
class Cost:
    params: int
    params_non_embedding: int
    flops_per_token: float
    act_bytes_per_seq: float
    train_state_bytes: float
    seq_len: int
    nodes: list[NodeCost] = field(default_factory=list)


class _Bytes(TorchDispatchMode):
    """Sums the bytes of every tensor an op creates (views excluded), per current node."""

    def __init__(self):
        super().__init__()
        self.by_node = defaultdict(float)
        self.node = "(graph)"
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not self.paused:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.by_node[self.node] += t.numel() * 2  # as bf16
        return out


class _FlashAttention(TorchFunctionMode):
    """Counts attention as a fused kernel keeps it (output + log-sum-exp), not as the meta
    device's math fallback that materialises T x T scores."""

    def __init__(self, counter: _Bytes):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        self.counter.paused = True
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            self.counter.paused = False
        self.counter.by_node[self.counter.node] += out.numel() * 2 + out[..., 0].numel() * 4
        return out


def _shape_ok(kind: Kind, shape: tuple) -> bool:
    if kind.name in ("hidden",):
        return len(shape) == 3 and shape[-1] == kind.width
    if kind.name == "streams":
        return len(shape) == 4 and tuple(shape[-2:]) == (kind.n, kind.width)
    if kind.name == "logits":
        return len(shape) == 3 and shape[-1] == kind.vocab
    if kind.name == "loss":
        return len(shape) == 0
    return len(shape) == 2


def _run(plan: Plan, model: GraphModel, counter: _Bytes, flops: FlopCounterMode):
    steps = {name: s for name, s in _named_steps(plan)}
    current = {"name": None}

    def pre(mod, args, name=None):
        current["name"] = name
        counter.node = name

    def post(mod, args, out, name=None):
        s = steps[name]
        outs = out if isinstance(out, tuple) else (out,)
        for kind, t in zip(s.out_kinds, outs):
            if not _shape_ok(kind, tuple(t.shape)):
                raise plan.loc.error(f"{s.block.type_name} produced shape {tuple(t.shape)}, but "
                                     f"its output kind is {kind}", s.path)
        counter.node = "(graph)"

    handles = []
    for name, block in model.blocks():
        handles.append(block.register_forward_pre_hook(lambda m, a, n=name: pre(m, a, n)))
        handles.append(block.register_forward_hook(lambda m, a, o, n=name: post(m, a, o, n)))
    idx = torch.zeros(1, plan.seq_len, dtype=torch.long, device="meta")
    try:
        with flops, counter, _FlashAttention(counter):
            model(idx, idx)
    except Exception as e:  # a block failing on real shapes: locate it
        from graphs.errors import GraphError
        if isinstance(e, GraphError):
            raise
        s = steps.get(current["name"])
        raise plan.loc.error(f"building/running failed: {type(e).__name__}: {e}"[:400],
                             s.path if s else ()) from None
    finally:
        for h in handles:
            h.remove()


def _named_steps(plan: Plan):
    for g, i, s in plan.steps():
        yield (s.id if g is None else f"{g}.{i}.{s.id}"), s


def rough_params(plan: Plan) -> int:
    """Parameters summed block by block, each distinct (type, config, input kinds) built once on
    the meta device: the layers of a repeat group are usually alike, so this costs a few builds
    where the model costs thousands. It assumes, as every block does, that parameter shapes
    follow from config and input kinds (not from the layer index); it is only the early guard,
    the built model's exact count is checked again."""
    sizes: dict = {}
    total = 0
    for _, _, s in plan.steps():
        key = (s.block, s.cfg, tuple(s.in_kinds), s.ctx.seq_len)
        if key not in sizes:
            with torch.device("meta"):
                sizes[key] = sum(p.numel() for p in s.block(s.cfg, s.in_kinds, s.ctx).parameters())
        total += sizes[key]
    return total


def _check_params(plan: Plan, params: int) -> None:
    if params > MAX_PARAMS:
        raise plan.loc.error(f"{params:.3g} parameters need about {params * BYTES_PER_PARAM / 1e12:.3g} "
                             f"TB of training state ({BYTES_PER_PARAM} bytes each); no machine fits this",
                             ("vars",))


_ANALYSED: dict[str, Cost] = {}   # graph hash -> its cost (a study's pre-flight, then its trial)


def analyse(plan: Plan) -> Cost:
    """Parameters, FLOPs per token, activation memory; raises GraphError on absurd sizes.
    Remembered by graph hash (which covers every node's config, the wiring and the recipe)."""
    key = plan.hash
    if key not in _ANALYSED:
        if len(_ANALYSED) >= 256:
            _ANALYSED.pop(next(iter(_ANALYSED)))
        _ANALYSED[key] = _analyse(plan)
    return _ANALYSED[key]


def _analyse(plan: Plan) -> Cost:
    _check_params(plan, rough_params(plan))  # absurd sizes are refused before the full build
    model = build(plan, device="meta", seed=None)
    params = model.num_params()
    _check_params(plan, params)
    counter, flops = _Bytes(), FlopCounterMode(display=False)
    _run(plan, model, counter, flops)
    act = sum(counter.by_node.values())
    if act > MAX_ACT_BYTES:
        raise plan.loc.error(f"one sequence needs about {act / 1e12:.3g} TB of activations; no "
                             "machine fits this", ("vars",))
    per_module = flops.get_flop_counts()
    T = plan.seq_len
    nodes = []
    for name, block in model.blocks():
        f = sum(per_module.get(f"GraphModel.{name}", {}).values())
        p = sum(x.numel() for x in block.parameters(recurse=True))
        nodes.append(NodeCost(name, block.type_name, p, 3 * f / T, counter.by_node.get(name, 0.0)))
    return Cost(params, model.num_params(non_embedding=True), 3 * flops.get_total_flops() / T, act,
                params * BYTES_PER_PARAM, T, nodes)
