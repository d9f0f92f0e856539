"""Weight maps between Hugging Face checkpoints and the reference graphs (gpt2.yaml, llama.yaml).

Each map is a pure function from an HF state dict (name -> tensor) to one keyed like our
models' state dicts (YAML node ids). The maps are strict: every source key must be used exactly
once and every destination key written exactly once, else ValueError lists the leftovers, so a
renamed or forgotten weight cannot slip through silently. Tensors are only reshaped (transposed,
concatenated), never rescaled, so the same map also carries gradients (parity tests) and its
inverse will serve the HF export.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

Tensor = torch.Tensor

# GPT-2's causal-mask buffers (older transformers keep them in the state dict): not weights.
_GPT2_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


class _Mapping:
    """Source keys still unused and destination keys written so far; finish() checks both."""

    def __init__(self, src: dict[str, Tensor], ignore: Callable[[str], bool] = lambda k: False):
        self.left = {k: v for k, v in src.items() if not ignore(k)}
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        if key not in self.left:
            raise ValueError(f"source key {key!r} is missing or was already used")
        return self.left.pop(key)

    def put(self, key: str, value: Tensor) -> None:
        if key in self.out:
            raise ValueError(f"destination key {key!r} written twice")
        self.out[key] = value

    def finish(self, expected: Iterable[str] | None) -> dict[str, Tensor]:
        if self.left:
            raise ValueError(f"unused source keys: {sorted(self.left)}")
        if expected is not None:
            expected = set(expected)
            missing, extra = sorted(expected - set(self.out)), sorted(set(self.out) - expected)
            if missing or extra:
                raise ValueError(f"destination keys not written: {missing}; "
                                 f"written but not expected: {extra}")
        return self.out


def _shape(t: Tensor, shape: tuple[int, ...], key: str) -> Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{key}: expected shape {shape}, got {tuple(t.shape)}")
    return t


def _head(m: _Mapping, embed: Tensor, key: str, tied: bool) -> None:
    """`head.weight`: the embedding table when tied (an HF copy, if present, must equal it)."""
    if tied:
        if key in m.left and not torch.equal(m.take(key), embed):
            raise ValueError(f"tied model but {key} differs from the token embedding")
        m.put("head.weight", embed)
    else:
        m.put("head.weight", _shape(m.take(key), tuple(embed.shape), key))


def gpt2_from_hf(hf_state: dict[str, Tensor], n_layer: int, tied: bool = True,
                 conv1d: bool | None = None,
                 expected: Iterable[str] | None = None) -> dict[str, Tensor]:
    """`GPT2LMHeadModel` state -> gpt2.yaml state.

    HF's `Conv1D` stores weights as [in, out]; ours are `nn.Linear` [out, in]. `conv1d=None`
    infers the layout from the (non-square) c_attn weight instead of assuming it, since the
    attention c_proj is square and cannot tell. `expected`: our model's state-dict keys.
    """
    m = _Mapping(hf_state, lambda k: bool(_GPT2_BUFFER.match(k)))
    wte = m.take("transformer.wte.weight")
    d = wte.shape[1]
    m.put("tok.weight", wte)
    m.put("pos.weight", m.take("transformer.wpe.weight"))
    if conv1d is None:
        c_attn = hf_state.get("transformer.h.0.attn.c_attn.weight")
        shape = tuple(c_attn.shape) if c_attn is not None else None
        if shape not in ((d, 3 * d), (3 * d, d)):
            raise ValueError(f"cannot tell the c_attn layout from shape {shape} (d={d})")
        conv1d = shape == (d, 3 * d)

    def linear(src: str, dst: str, n_in: int, n_out: int) -> None:
        w = m.take(f"{src}.weight")
        if conv1d:
            w = _shape(w, (n_in, n_out), src).t().contiguous()
        m.put(f"{dst}.weight", _shape(w, (n_out, n_in), src))
        m.put(f"{dst}.bias", _shape(m.take(f"{src}.bias"), (n_out,), src))

    def norm(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            m.put(f"{dst}.{p}", _shape(m.take(f"{src}.{p}"), (d,), src))

    for i in range(n_layer):
        s, o = f"transformer.h.{i}", f"h.{i}"
        norm(f"{s}.ln_1", f"{o}.ln_1")
        linear(f"{s}.attn.c_attn", f"{o}.attn.qkv", d, 3 * d)  # output splits q|k|v, like ours
        linear(f"{s}.attn.c_proj", f"{o}.attn.proj", d, d)
        norm(f"{s}.ln_2", f"{o}.ln_2")
        fc_bias = hf_state.get(f"{s}.mlp.c_fc.bias")  # n_inner may differ from 4d
        hidden = fc_bias.shape[0] if fc_bias is not None else 4 * d
        linear(f"{s}.mlp.c_fc", f"{o}.mlp.fc", d, hidden)
        linear(f"{s}.mlp.c_proj", f"{o}.mlp.proj", hidden, d)
    norm("transformer.ln_f", "ln_f")
    _head(m, wte, "lm_head.weight", tied)
    return m.finish(expected)


def llama_from_hf(hf_state: dict[str, Tensor], n_layer: int, n_head: int, n_kv_head: int,
                  tied: bool, expected: Iterable[str] | None = None) -> dict[str, Tensor]:
    """`LlamaForCausalLM` state -> llama.yaml state.

    Everything is `nn.Linear` layout, so nothing is transposed. Our attention fuses q|k|v and
    our SwiGLU fuses gate|up along dim 0. No RoPE permutation: our rotary embedding uses HF's
    half-split pairing. `expected`: our model's state-dict keys.
    """
    m = _Mapping(hf_state)
    emb = m.take("model.embed_tokens.weight")
    d = emb.shape[1]
    m.put("tok.weight", emb)
    for i in range(n_layer):
        s, o = f"model.layers.{i}", f"layers.{i}"
        m.put(f"{o}.attn_norm.weight", _shape(m.take(f"{s}.input_layernorm.weight"), (d,), s))
        q = m.take(f"{s}.self_attn.q_proj.weight")
        if q.shape[0] % n_head:
            raise ValueError(f"{s}.self_attn.q_proj: {q.shape[0]} rows for {n_head} heads")
        kv_rows = q.shape[0] // n_head * n_kv_head
        k = _shape(m.take(f"{s}.self_attn.k_proj.weight"), (kv_rows, d), f"{s}.k_proj")
        v = _shape(m.take(f"{s}.self_attn.v_proj.weight"), (kv_rows, d), f"{s}.v_proj")
        m.put(f"{o}.attn.qkv.weight", torch.cat([q, k, v], dim=0))
        m.put(f"{o}.attn.proj.weight", _shape(m.take(f"{s}.self_attn.o_proj.weight"),
                                              (d, q.shape[0]), f"{s}.o_proj"))
        post = m.take(f"{s}.post_attention_layernorm.weight")
        m.put(f"{o}.mlp_norm.weight", _shape(post, (d,), s))
        gate, up = m.take(f"{s}.mlp.gate_proj.weight"), m.take(f"{s}.mlp.up_proj.weight")
        _shape(up, tuple(gate.shape), f"{s}.mlp.up_proj")
        m.put(f"{o}.mlp.fc.weight", torch.cat([gate, up], dim=0))
        m.put(f"{o}.mlp.proj.weight", _shape(m.take(f"{s}.mlp.down_proj.weight"),
                                             (d, gate.shape[0]), f"{s}.down_proj"))
    m.put("norm.weight", _shape(m.take("model.norm.weight"), (d,), "model.norm"))
    _head(m, emb, "lm_head.weight", tied)
    return m.finish(expected)
