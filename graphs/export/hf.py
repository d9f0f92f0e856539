"""Hugging Face export: a folder that stock `transformers` loads with `GPT2LMHeadModel` or
`LlamaForCausalLM.from_pretrained(dir)`, no custom code.

The architecture is recognised from the plan's structure (block types and wiring, not node ids),
so a renamed copy of gpt2.yaml exports too; a variant HF cannot express is refused with every
reason at once (`hf_model`), and `write` then falls back to custom code (hf_custom.py).
Weights go through the inverse of graphs.hf's maps, derived by running the forward map on
element ids (see `invert`), so import and export cannot disagree.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from blocks.attention import variants
from graphs.plan import Group, Plan, Ref, Step
from graphs.export import ExportError, target
from graphs.hf import gpt2_from_hf, llama_from_hf

Tensor = torch.Tensor


class Unsupported(ExportError, ValueError):
    """The graph is not one that stock transformers can load; the message lists why."""


# ----- the architectures, as templates: node -> (block type, *inputs); ids as in the YAML files
@dataclass(frozen=True)
class Template:
    arch: str
    top: dict[str, tuple[str, ...]]
    group: str            # the repeat group's id
    group_in: str         # the node it reads
    body: dict[str, tuple[str, ...]]
    out: str              # the body's output node


GPT2 = Template(
    "gpt2",
    top={"head": ("lm_head", "ln_f"), "ln_f": ("layernorm", "h"), "x": ("add", "tok", "pos"),
         "tok": ("embedding", "tokens"), "pos": ("position_embedding", "tokens")},
    group="h", group_in="x",
    body={"r2": ("add", "r1", "mlp"), "mlp": ("mlp", "ln_2"), "ln_2": ("layernorm", "r1"),
          "r1": ("add", "stream", "attn"), "attn": ("attention", "ln_1"),
          "ln_1": ("layernorm", "stream")},
    out="r2")

LLAMA = Template(
    "llama",
    top={"head": ("lm_head", "norm"), "norm": ("rmsnorm", "layers"),
         "tok": ("embedding", "tokens")},
    group="layers", group_in="tok",
    body={"r2": ("add", "r1", "mlp"), "mlp": ("swiglu", "mlp_norm"),
          "mlp_norm": ("rmsnorm", "r1"), "r1": ("add", "stream", "attn"),
          "attn": ("attention", "attn_norm"), "attn_norm": ("rmsnorm", "stream")},
    out="r2")

TEMPLATES = (GPT2, LLAMA)
# our MLP activations -> transformers' ACT2FN names (gelu_new is GPT-2's own tanh GELU)
GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "relu2": "relu2",
            "silu": "silu"}
HINT = " (the standalone and pt2 formats export any graph)"
# end-of-text ids of search.tokenizer's tokenizers (graphs may not import search)
EOT = {"gpt2": 50256, "bytes": 256}


@dataclass
class Match:
    """Template node id -> the plan's Step, for the top level and for each layer."""

    plan: Plan
    tpl: Template
    top: dict[str, Step]
    group: Group
    layers: list[dict[str, Step]]


class _Unifier:
    """Follows edges backwards from a template node, binding template ids to plan steps.
    Dropout is the identity at inference, so it is looked through; `add` commutes."""

    def __init__(self, tpl: dict, steps: dict[str, Step], leaves: dict[str, str]):
        self.tpl, self.steps, self.leaves = tpl, steps, leaves
        self.dropouts: set[str] = set()

    def match(self, want: str, ref: Ref, bind: dict[str, str]) -> tuple[dict | None, str]:
        while ref.node in self.steps and self.steps[ref.node].block.type_name == "dropout":
            self.dropouts.add(ref.node)
            ref = self.steps[ref.node].ins[0]
        if ref.port or ref.layer is not None:
            return None, f"an edge reads '{ref.node}' port {ref.port} / layer {ref.layer}"
        if want in self.leaves:
            ok = ref.node == self.leaves[want]
            return (bind, "") if ok else (None, f"'{ref.node}' is read where {want} belongs")
        step = self.steps.get(ref.node)
        if step is None:
            return None, f"'{ref.node}' is read where node '{want}' belongs"
        if want in bind or step.id in bind.values():
            same = bind.get(want) == step.id
            return (bind, "") if same else (None, f"node '{step.id}' is wired differently")
        typ, *ins = self.tpl[want]
        if step.block.type_name != typ:
            return None, f"node '{step.id}' is {step.block.type_name} where '{want}' is {typ}"
        if len(step.ins) != len(ins):
            return None, f"node '{step.id}' has {len(step.ins)} inputs, '{want}' {len(ins)}"
        why = ""
        for order in ([ins, ins[::-1]] if typ == "add" else [ins]):
            b: dict | None = {**bind, want: step.id}
            for w, r in zip(order, step.ins):
                b, reason = self.match(w, r, b)
                if b is None:
                    why = why or reason
                    break
            if b is not None:
                return b, ""
        return None, why


def _extra(steps: dict[str, Step], bound: set, dropouts: set, allowed=()) -> list[str]:
    return [f"node '{s.id}' ({s.block.type_name}) has no place in it"
            for s in steps.values() if s.id not in bound | dropouts
            and s.block.type_name not in allowed]


def match(plan: Plan, tpl: Template) -> Match | str:
    """The plan's steps in the template's roles, or why the plan is not this architecture."""
    groups = [it for it in plan.items if isinstance(it, Group)]
    if len(groups) != 1:
        return f"it needs one repeat group, the graph has {len(groups)}"
    g = groups[0]
    top = {s.id: s for s in plan.items if isinstance(s, Step)}
    u = _Unifier(tpl.top, top, {"tokens": "tokens", tpl.group: g.id})
    bind, why = u.match("head", plan.outputs["logits"], {})
    if bind is not None:
        bind, why = u.match(tpl.group_in, g.input, bind)
    if bind is None:
        return why
    head = top[bind["head"]]
    same_loss = {s.id for s in top.values() if s.block.type_name == "linear_cross_entropy"
                 and s.cfg.tie is not None and s.cfg.tie in (head.id, head.cfg.tie)}   # HF's own loss
    extra = _extra(top, set(bind.values()) | same_loss, u.dropouts, allowed=("cross_entropy",))
    layers = []
    for i, steps in enumerate(g.layers):
        steps = {s.id: s for s in steps}
        lu = _Unifier(tpl.body, steps, {"stream": "stream"})
        lbind, why = lu.match(tpl.out, Ref(g.out), {})
        if lbind is None:
            return f"layer {i}: {why}"
        extra += [f"layer {i}: {e}" for e in _extra(steps, set(lbind.values()), lu.dropouts)]
        layers.append({k: steps[v] for k, v in lbind.items()})
    if extra:
        return "; ".join(extra)
    return Match(plan, tpl, {k: top[v] for k, v in bind.items()}, g, layers)


def detect(plan: Plan) -> Match:
    """The HF architecture of the plan; Unsupported says why it is neither."""
    reasons = []
    for tpl in TEMPLATES:
        m = match(plan, tpl)
        if isinstance(m, Match):
            return m
        reasons.append(f"not {tpl.arch}: {m}")
    raise Unsupported(f"graph '{plan.name}' has no stock Hugging Face class: "
                      + "; ".join(reasons) + HINT)


# ----- HF configs: every setting read from the blocks, every inexpressible one refused
class _Checks(list):
    def need(self, ok: bool, why: str) -> None:
        if not ok:
            self.append(why)

    def same(self, values: list, what: str):
        uniq = list(dict.fromkeys(values))
        self.need(len(uniq) == 1, f"HF has one {what}, the graph has {uniq}")
        return uniq[0]


def _common(m: Match, c: _Checks) -> tuple[int, bool]:
    tok, head = m.top["tok"], m.top["head"]
    d = tok.cfg.dim
    c.need(not head.cfg.bias, f"lm_head '{head.id}' has a bias")
    c.need(head.cfg.vocab == tok.cfg.vocab, f"lm_head vocab {head.cfg.vocab} != embedding "
           f"vocab {tok.cfg.vocab}")
    c.need(head.cfg.tie in (None, tok.id), f"lm_head is tied to '{head.cfg.tie}', not '{tok.id}'")
    return d, head.cfg.tie is not None


def _attn(m: Match, d: int, c: _Checks, rope: bool, bias: bool) -> dict:
    cfgs = [layer["attn"].cfg for layer in m.layers]
    a = cfgs[0]
    c.same([(x.heads, x.kv_heads or x.heads, x.head_dim or d // x.heads, x.bias, x.rope,
             x.rope_theta, x.rope_fraction, x.dropout) for x in cfgs], "attention setting")
    c.need(a.bias == bias, f"attention bias={a.bias}; HF {m.tpl.arch} has bias={bias}")
    c.need(a.rope == rope, f"attention rope={a.rope}; HF {m.tpl.arch} has rope={rope}")
    c.need(not rope or a.rope_fraction == 1.0, f"rope_fraction={a.rope_fraction} (HF: 1.0)")
    for x in cfgs:
        c.need(not variants(x), f"attention options {variants(x)} (HF {m.tpl.arch}: none)")
    return {"heads": a.heads, "kv": a.kv_heads or a.heads, "dh": a.head_dim or d // a.heads,
            "theta": a.rope_theta, "dropout": a.dropout}


def gpt2_config(m: Match) -> dict:
    """GPT2Config keyword arguments; raises Unsupported."""
    c = _Checks()
    d, tied = _common(m, c)
    a = _attn(m, d, c, rope=False, bias=True)
    c.need(a["kv"] == a["heads"], f"kv_heads={a['kv']} < heads={a['heads']} (HF GPT-2: MHA)")
    c.need(a["dh"] == d // a["heads"], f"head_dim={a['dh']} != d/heads (HF GPT-2)")
    norms = [m.top["ln_f"]] + [layer[k] for layer in m.layers for k in ("ln_1", "ln_2")]
    c.need(all(n.cfg.bias for n in norms), "a LayerNorm without bias (HF GPT-2 has biases)")
    eps = c.same([n.cfg.eps for n in norms], "layer_norm_epsilon")
    mlp = c.same([(x["mlp"].cfg.hidden, x["mlp"].cfg.act, x["mlp"].cfg.bias) for x in m.layers],
                 "MLP setting")
    c.need(mlp[1] in GPT2_ACT, f"MLP activation {mlp[1]!r} has no HF name")
    c.need(mlp[2], "MLP without biases (HF GPT-2 has biases)")
    _raise(m, c)
    return {"vocab_size": m.top["tok"].cfg.vocab, "n_positions": m.top["pos"].cfg.max_seq,
            "n_embd": d, "n_layer": m.group.count, "n_head": a["heads"], "n_inner": mlp[0],
            "activation_function": GPT2_ACT[mlp[1]], "layer_norm_epsilon": eps,
            "resid_pdrop": 0.0, "attn_pdrop": a["dropout"],
            "embd_pdrop": _dropout_p(m.plan, m.group.input.node), "tie_word_embeddings": tied}


def llama_config(m: Match, seq_len: int) -> dict:
    """LlamaConfig keyword arguments; raises Unsupported."""
    c = _Checks()
    d, tied = _common(m, c)
    a = _attn(m, d, c, rope=True, bias=False)
    norms = [m.top["norm"]] + [layer[k] for layer in m.layers for k in ("attn_norm", "mlp_norm")]
    c.need(all(n.cfg.gain for n in norms), "an RMSNorm without gain (HF Llama has weights)")
    eps = c.same([n.cfg.eps for n in norms], "rms_norm_eps")
    mlp = c.same([(x["mlp"].cfg.hidden, x["mlp"].cfg.bias) for x in m.layers], "MLP setting")
    # HF could hold mlp_bias / attention_bias, but graphs.hf's Llama map carries no biases
    c.need(not mlp[1], "SwiGLU with biases (the Llama weight map has no biases)")
    _raise(m, c)
    return {"vocab_size": m.top["tok"].cfg.vocab, "hidden_size": d, "intermediate_size": mlp[0],
            "num_hidden_layers": m.group.count, "num_attention_heads": a["heads"],
            "num_key_value_heads": a["kv"], "head_dim": a["dh"],
            "max_position_embeddings": seq_len, "rms_norm_eps": eps,
            "rope_theta": float(a["theta"]), "attention_bias": False, "mlp_bias": False,
            "attention_dropout": a["dropout"], "tie_word_embeddings": tied}


def _dropout_p(plan: Plan, node: str) -> float:
    """p of the dropout node `node` (between the embeddings and the layers), else 0."""
    step = next(s for g, _, s in plan.steps() if g is None and s.id == node)
    return step.cfg.p if step.block.type_name == "dropout" else 0.0


def _raise(m: Match, c: _Checks) -> None:
    if c:
        raise Unsupported(f"graph '{m.plan.name}' is {m.tpl.arch}-shaped, but HF's "
                          f"{m.tpl.arch} cannot express: " + "; ".join(c) + HINT)


# ----- weights: graphs.hf's import maps, run backwards
def invert(to_ours: Callable[[dict], dict], hf_shapes: dict[str, tuple],
           ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """The HF state that `to_ours` maps onto `ours`.

    The maps only move elements (transpose, concatenate, share a tied table), so running one
    on a state whose elements are their own global positions shows where every element goes,
    and a scatter undoes it. Every HF element must be written, and an element written twice
    (a tied table) must get the same value both times."""
    sizes = [math.prod(s) for s in hf_shapes.values()]
    total = sum(sizes)
    ids = torch.arange(total, dtype=torch.int32 if total < 2**31 else torch.int64)
    where = to_ours({k: t.view(s) for (k, s), t in zip(hf_shapes.items(), ids.split(sizes))})
    dtypes = {v.dtype for v in ours.values()}
    if len(dtypes) != 1:
        raise ValueError(f"weights of several dtypes {sorted(map(str, dtypes))}; cast them first")
    flat, seen = torch.empty(total, dtype=dtypes.pop()), torch.zeros(total, dtype=torch.bool)
    for key, pos in where.items():
        if ours[key].shape != pos.shape:
            raise ValueError(f"{key}: shape {tuple(ours[key].shape)}, HF's layout gives "
                             f"{tuple(pos.shape)}")
        flat[pos.flatten()] = ours[key].detach().flatten()
        seen[pos.flatten()] = True
    if not seen.all():
        raise ValueError(f"{int((~seen).sum())} HF elements have no source weight")
    for key, pos in where.items():
        if not torch.equal(flat[pos.flatten()], ours[key].detach().flatten()):
            raise ValueError(f"{key} disagrees with another weight stored in the same HF tensor")
    return {k: t.view(s).clone() for (k, s), t in zip(hf_shapes.items(), flat.split(sizes))}


def canonical_state(m: Match, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with the template's node ids (those of gpt2.yaml / llama.yaml, which graphs.hf
    writes), whatever the graph calls its nodes."""
    top = {s.id: k for k, s in m.top.items()}
    body = {s.id: k for k, s in m.layers[0].items()}  # every layer elaborates from one body
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == m.group.id:
                parts[0], parts[2] = m.tpl.group, body[parts[2]]
            else:
                parts[0] = top[parts[0]]
        except (KeyError, IndexError):
            raise ValueError(f"state-dict key {key!r} belongs to no node of the matched "
                             f"{m.tpl.arch} graph") from None
        out[".".join(parts)] = value
    return out


def _hf_shapes(cls, config, tied: bool) -> dict[str, tuple]:
    """HF's parameter names and shapes (from a model on the meta device: no memory)."""
    with torch.device("meta"):
        model = cls(config)
    shapes = {k: tuple(p.shape) for k, p in model.named_parameters(remove_duplicate=False)}
    if tied:
        shapes.pop("lm_head.weight")  # HF checkpoints store a tied table once
    return shapes


def _eot(plan: Plan, meta: dict, vocab: int) -> int | None:
    """End-of-text id for generation_config.json: meta's tokenizer, else the one the trainer
    picks for the plan's input (search.setup)."""
    tok = meta.get("tokenizer") or ("gpt2" if plan.input == "tokens" else "bytes")
    eot = tok.get("eot") if isinstance(tok, dict) else EOT.get(tok)
    return eot if isinstance(eot, int) and 0 <= eot < vocab else None


def hf_model(plan: Plan, state_dict: dict[str, Tensor], meta: dict | None = None):
    """(HF config, HF state dict) for a GPT-2- or Llama-shaped plan; raises Unsupported."""
    import transformers

    m = detect(plan)
    state = canonical_state(m, state_dict)
    n = m.group.count
    if m.tpl is GPT2:
        kw, cls, cfg_cls = gpt2_config(m), transformers.GPT2LMHeadModel, transformers.GPT2Config
        tied = kw["tie_word_embeddings"]

        def to_ours(s):
            return gpt2_from_hf(s, n, tied, expected=state)
    else:
        kw, cls = llama_config(m, plan.seq_len), transformers.LlamaForCausalLM
        cfg_cls, tied = transformers.LlamaConfig, kw["tie_word_embeddings"]

        def to_ours(s):
            return llama_from_hf(s, n, kw["num_attention_heads"], kw["num_key_value_heads"],
                                 tied, expected=state)
    eot = _eot(plan, meta or {}, kw["vocab_size"])
    dtype = next(iter(state.values())).dtype
    config = cfg_cls(**kw, bos_token_id=eot, eos_token_id=eot, architectures=[cls.__name__],
                     dtype=str(dtype).removeprefix("torch."))
    return config, invert(to_ours, _hf_shapes(cls, config, tied), state)


def write(plan: Plan, state_dict: dict[str, Tensor], out_dir: Path, meta: dict) -> list[Path]:
    """config.json, model.safetensors and (when the tokenizer is known) generation_config.json
    for stock transformers; for any other graph, a trust_remote_code folder (hf_custom)."""
    import transformers
    from safetensors.torch import save_file

    try:
        config, state = hf_model(plan, state_dict, meta)
    except Unsupported as e:
        from graphs.export import hf_custom

        print(f"hf: {e}; writing a folder for trust_remote_code=True instead", file=sys.stderr)
        return hf_custom.write(plan, state_dict, out_dir, meta, why=str(e))
    out_dir = Path(out_dir)
    files = [target(out_dir, "config.json"), target(out_dir, "model.safetensors")]
    config.to_json_file(files[0])
    save_file(state, files[1], metadata={"format": "pt"})  # HF refuses files without it
    if config.eos_token_id is not None:
        files.append(target(out_dir, "generation_config.json"))
        transformers.GenerationConfig(bos_token_id=config.bos_token_id,
                                      eos_token_id=config.eos_token_id).to_json_file(files[-1])
    return files
