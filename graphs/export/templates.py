"""Block type -> how an exported model.py writes it: a class from `parts` built with literal
arguments, or an inline expression for blocks without parameters (add, dropout, loss).

A block type missing here cannot be exported yet; `template` says so by name. To support a new
block, add its plain-torch twin to `graphs/export/parts.py` and one entry below.
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from blocks.attention import variants
from graphs.plan import Step
from graphs.export import ExportError, parts


@dataclass(frozen=True)
class Template:
    cls: str | None = None                           # class in `parts`; None = inline expression
    args: Callable[[Step], dict] | None = None       # constructor keywords, as plain values
    inline: Callable[[Step, list[str], object], str] | None = None   # (step, input vars, plan)
    needs: tuple[str, ...] = field(default=())       # helpers from `parts` the class uses


def _d(s: Step) -> int:
    return s.in_kinds[0].width


def _inv_sqrt(s: Step, value) -> float:
    """nGPT's default stored scale, 1/sqrt(d), exactly as the block computes it."""
    return value if value is not None else 1.0 / math.sqrt(_d(s))


def _attention(s: Step) -> dict:
    c = s.cfg
    extra = variants(c) + (["value inputs"] if len(s.ins) > 1 else [])
    if extra:
        raise ExportError(f"attention '{s.id}' uses {', '.join(extra)}, which the standalone "
                          "format does not write yet")
    return dict(dim=_d(s), heads=c.heads, kv_heads=c.kv_heads or c.heads,
                head_dim=c.head_dim or _d(s) // c.heads, bias=c.bias, rope=c.rope,
                rope_theta=c.rope_theta, rope_fraction=c.rope_fraction, dropout=c.dropout,
                seq_len=s.ctx.seq_len)


def _ngpt_attention(s: Step) -> dict:
    c = s.cfg
    return dict(dim=_d(s), heads=c.heads, rope=c.rope, rope_theta=c.rope_theta, qk_norm=c.qk_norm,
                sqk_init=c.sqk_init, sqk_scale=_inv_sqrt(s, c.sqk_scale), seq_len=s.ctx.seq_len)


def _dropout(s: Step, ins: list[str], plan=None) -> str:
    return f"F.dropout({ins[0]}, {s.cfg.p!r}, self.training)" if s.cfg.p else ins[0]


def _cross_entropy(s: Step, ins: list[str], plan=None) -> str:
    lg, tg = ins
    return f"F.cross_entropy({lg}.float().flatten(0, 1), {tg}.flatten(), ignore_index={s.cfg.ignore_index})"


HEADS = ("lm_head", "ngpt_head")   # what a linear_cross_entropy may tie to besides a table


def _linear_cross_entropy(s: Step, ins: list[str], plan) -> str:
    """The fused loss written plainly: the tied head's logits (or x times the tied table), then
    cross-entropy; exported models compute logits anyway, so nothing is gained by fusing there."""
    x, tg = ins
    if s.cfg.tie is None:
        raise ExportError(f"linear_cross_entropy '{s.id}' has a weight of its own; the standalone "
                          "format writes it only tied (tie: the LM head or the token table)")
    target = next(t for g, _, t in plan.steps() if g is None and t.id == s.cfg.tie)
    lg = (f"self.{target.id}({x})" if target.block.type_name in HEADS
          else f"F.linear({x}, self.{target.id}.weight)")
    return _cross_entropy(s, [lg, tg])


TEMPLATES: dict[str, Template] = {
    "add": Template(inline=lambda s, ins, plan=None: " + ".join(ins)),
    "dropout": Template(inline=_dropout),
    "cross_entropy": Template(inline=_cross_entropy),
    "linear_cross_entropy": Template(inline=_linear_cross_entropy),
    "embedding": Template("Embedding", lambda s: dict(vocab=s.cfg.vocab, dim=s.cfg.dim)),
    "position_embedding": Template("PositionEmbedding",
                                   lambda s: dict(max_seq=s.cfg.max_seq, dim=s.cfg.dim)),
    "linear": Template("Linear", lambda s: dict(dim_in=_d(s), dim=s.cfg.dim, bias=s.cfg.bias)),
    "layernorm": Template("LayerNorm", lambda s: dict(dim=_d(s), eps=s.cfg.eps, bias=s.cfg.bias)),
    "rmsnorm": Template("RMSNorm", lambda s: dict(dim=_d(s), eps=s.cfg.eps, gain=s.cfg.gain)),
    "attention": Template("Attention", _attention, needs=("rope_tables", "apply_rope")),
    "mlp": Template("MLP", lambda s: dict(dim=_d(s), hidden=s.cfg.hidden, act=s.cfg.act,
                                          bias=s.cfg.bias), needs=("ACTIVATIONS",)),
    "swiglu": Template("SwiGLU", lambda s: dict(dim=_d(s), hidden=s.cfg.hidden, bias=s.cfg.bias)),
    "lm_head": Template("LMHead", lambda s: dict(dim=_d(s), vocab=s.cfg.vocab, bias=s.cfg.bias)),
    "ngpt_embedding": Template("NGPTEmbedding", lambda s: dict(vocab=s.cfg.vocab, dim=s.cfg.dim),
                               needs=("wide",)),
    "ngpt_attention": Template("NGPTAttention", _ngpt_attention,
                               needs=("rope_tables", "apply_rope", "wide", "unit", "ScaleVector")),
    "ngpt_mlp": Template("NGPTMLP", lambda s: dict(dim=_d(s), hidden=s.cfg.hidden,
                                                   suv_init=s.cfg.suv_init, suv_scale=s.cfg.suv_scale),
                         needs=("ScaleVector",)),
    "ngpt_residual": Template("NGPTResidual", lambda s: dict(
        dim=_d(s), alpha_init=s.cfg.alpha_init, alpha_scale=_inv_sqrt(s, s.cfg.alpha_scale),
        abs_alpha=s.cfg.abs_alpha), needs=("wide", "unit", "ScaleVector")),
    "ngpt_head": Template("NGPTHead", lambda s: dict(dim=_d(s), vocab=s.cfg.vocab, sz_init=s.cfg.sz_init,
                                                     sz_scale=_inv_sqrt(s, s.cfg.sz_scale)),
                          needs=("ScaleVector",)),
}


def template(step: Step) -> Template:
    t = TEMPLATES.get(step.block.type_name)
    if t is None:
        raise ExportError(f"block type '{step.block.type_name}' (node '{step.id}') has no standalone "
                          f"template yet; exportable types: {', '.join(sorted(TEMPLATES))}")
    return t


def constructor(step: Step) -> tuple[str, list[str]]:
    """("Attention", ["dim=64", "heads=4", ...]): the block's resolved config as literal keywords."""
    t = template(step)
    return t.cls, [f"{k}={v!r}" for k, v in t.args(step).items()]


def _source(name: str) -> str:
    obj = getattr(parts, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return inspect.getsource(obj).rstrip()
    # a constant such as ACTIVATIONS: from `NAME = ` up to the next blank line
    m = re.search(rf"^{name} = .*?(?=\n\n)", inspect.getsource(parts), re.DOTALL | re.MULTILINE)
    return m.group(0)



def parts_source(types: list[str]) -> str:
    """Source of the helpers and classes these block types need, in `parts` file order."""
    names = set()
    for tname in types:
        t = TEMPLATES[tname]
        if t.cls:
            names.update((*t.needs, t.cls))
    src = inspect.getsource(parts)
    order = sorted(names, key=lambda n: re.search(rf"^(class |def )?{n}\b", src, re.MULTILINE).start())
    return "\n\n\n".join(_source(n) for n in order)
