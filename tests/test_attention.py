"""Attention variants (architectures.md §4) against dense references written here: GQA, QK-norm,
partial RoPE, softcaps, sliding window and local/global layers, ALiBi, Flex versus SDPA, value
residual, differential attention and MLA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import blocks
import graphs
from blocks import attention_ops as ops
from blocks.kinds import hidden, logits
from blocks.registry import Context
from graphs.elaborate import elaborate
from graphs.errors import Locator
from graphs.values import make_config

from conftest import ROOT

D, T, B = 32, 12, 2


def make(type_name: str, params: dict, ins=None, layer: int = 1, seed: int = 0, seq_len: int = T):
    cls = blocks.REGISTRY[type_name]
    ins = ins or [hidden(D)]
    cfg = make_config(cls.Config, params, {}, Locator("<test>"), ())
    msg = cls.check_config(cfg)
    assert msg is None, msg
    cls.infer(cfg, ins)
    mod = cls(cfg, ins, Context(node="attn", layer=layer, n_layer=4, seq_len=seq_len)).double()
    mod.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # weights large enough that attention is far from uniform
        for p in mod.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    return mod.eval()


def x_in(seed=1, d=D):
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(q, k, v, bias=None, cap=None):
    """softmax(cap(q k^T / sqrt(d)) + bias, causal) v with K/V repeated in HF repeat_kv order."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    if bias is not None:
        s = s + bias
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).softmax(-1) @ v


def qkv(h=4, kv=2, dh=8, seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, t, dh, generator=g, dtype=torch.float64) for n in (h, kv, kv)]


# ----- (1) GQA/MQA, QK-norm, partial RoPE, softcaps

@pytest.mark.parametrize("kv", [2, 1], ids=["gqa", "mqa"])
def test_gqa_with_replicated_kv_equals_mha(kv):
    gqa = make("attention", {"heads": 4, "kv_heads": kv, "rope": True})
    mha = make("attention", {"heads": 4, "rope": True})
    dh = D // 4
    q_w, k_w, v_w = gqa.qkv.weight.split([4 * dh, kv * dh, kv * dh])
    rep = lambda w: w.view(kv, dh, D).repeat_interleave(4 // kv, 0).reshape(4 * dh, D)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q_w, rep(k_w), rep(v_w)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x = x_in()
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-12)


def test_sdpa_enable_gqa_equals_manual_repetition():
    q, k, v = qkv(h=6, kv=2)
    ref = reference(q, k, v)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), ref)
    torch.testing.assert_close(ops.attend(q, k, v, ops.Scores(), "sdpa"), ref)


def test_qk_norm_gives_heads_of_norm_sqrt_dh_and_bounds_logits():
    m = make("attention", {"heads": 4, "kv_heads": 2, "qk_norm": True})
    q, k, _ = m.heads(x_in() * 100)
    for t in (q, k):
        torch.testing.assert_close(t.norm(dim=-1), torch.full(t.shape[:-1], math.sqrt(8.0),
                                                               dtype=torch.float64))
    # the learned gains scale the normalised heads
    with torch.no_grad():
        m.q_norm.fill_(2.0)
    q2, _, _ = m.heads(x_in() * 100)
    torch.testing.assert_close(q2, 2 * q)


def test_partial_rope_rotates_only_the_first_share_and_is_relative():
    m = make("attention", {"heads": 2, "rope": True, "rope_fraction": 0.25, "head_dim": 16})
    cos, sin = m.rope_cos, m.rope_sin
    assert cos.shape == (T, 4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g, dtype=torch.float64).unbind(0)
    from blocks.attention import apply_rope

    def at(x, p):  # x placed at position p
        return apply_rope(x, cos[p:p + 1], sin[p:p + 1])
    dots = [(at(q, m_) * at(k, n)).sum() for m_, n in ((3, 1), (7, 5), (11, 9))]
    torch.testing.assert_close(torch.stack(dots), dots[0].expand(3), rtol=1e-5, atol=1e-5)
    y = at(q, 5)
    torch.testing.assert_close(y[..., 4:], q[..., 4:], rtol=0, atol=0)    # the rest passes
    torch.testing.assert_close(y.norm(), q.norm())                          # a rotation


@pytest.mark.parametrize("kernel", ["eager", "flex"])
def test_attention_softcap_matches_reference_and_vanishes_as_cap_grows(kernel):
    q, k, v = qkv()
    q = q * 6  # large logits, so the cap bites
    out = ops.attend(q, k, v, ops.Scores(softcap=2.0), kernel)
    torch.testing.assert_close(out, reference(q, k, v, cap=2.0))
    assert not torch.allclose(out, reference(q, k, v), atol=1e-3)
    torch.testing.assert_close(ops.attend(q, k, v, ops.Scores(softcap=1e6), kernel), reference(q, k, v))


def test_auto_kernel_is_sdpa_without_softcap_and_the_twin_on_cpu_with_it():
    cpu = torch.device("cpu")
    assert ops.choose("auto", ops.Scores(window=4, alibi=True), cpu) == "sdpa"
    assert ops.choose("auto", ops.Scores(softcap=50.0), cpu) == "eager"
    assert ops.choose("auto", ops.Scores(softcap=50.0), torch.device("cuda")) == "flex"
    with pytest.raises(ValueError):
        ops.attend(*qkv(), ops.Scores(softcap=5.0), "sdpa")


def test_final_logit_softcap_bounds_logits():
    m = make("logit_softcap", {"cap": 15.0}, ins=[logits(50)])
    lg = torch.randn(B, T, 50, dtype=torch.float64) * 10  # |lg| >> c for some, yet tanh < 1
    y = m(lg)
    assert y.abs().max() < 15.0
    torch.testing.assert_close(y, 15.0 * torch.tanh(lg / 15.0))
    small = torch.randn(B, T, 50, dtype=torch.float64) * 1e-3
    torch.testing.assert_close(make("logit_softcap", {"cap": 1e6}, ins=[logits(50)])(small), small)


# ----- (2) sliding window, local/global layers, ALiBi, Flex versus SDPA

def test_window_at_least_t_equals_causal_and_matches_a_dense_reference():
    full = make("attention", {"heads": 4, "kv_heads": 2, "rope": True})
    wide = make("attention", {"heads": 4, "kv_heads": 2, "rope": True, "window": T})
    x = x_in()
    torch.testing.assert_close(wide(x), full(x), rtol=0, atol=1e-12)
    q, k, v = qkv()
    w = 3
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bias = torch.zeros(T, T, dtype=torch.float64).masked_fill(i - j >= w, float("-inf"))
    ref = reference(q, k, v, bias=bias)
    for kernel in ("sdpa", "eager"):
        torch.testing.assert_close(ops.attend(q, k, v, ops.Scores(window=w), kernel), ref)
    assert not torch.allclose(ref, reference(q, k, v))


def test_a_window_covering_every_key_takes_sdpas_causal_path_without_a_mask(monkeypatch):
    """The global layers of a local/global model have window = seq_len: plain causal attention,
    which SDPA runs as flash; with the dense mask it took a slower kernel. A shorter window still
    passes its mask."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask") is not None))
        return real(*args, **kwargs)
    monkeypatch.setattr(ops.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv()
    wide = ops.attend(q, k, v, ops.Scores(window=T), "sdpa")
    wider = ops.attend(q, k, v, ops.Scores(window=T + 5), "sdpa")
    narrow = ops.attend(q, k, v, ops.Scores(window=T - 1), "sdpa")
    assert calls == [(True, False), (True, False), (False, True)]
    torch.testing.assert_close(wide, reference(q, k, v))
    torch.testing.assert_close(wider, wide, rtol=0, atol=0)
    assert not torch.allclose(narrow, wide)


def test_window_as_an_expression_of_the_layer_gives_local_and_global_layers():
    g = graphs.load(ROOT / "graphs" / "llama.yaml", size="tiny",
                    sets=["nodes.layers.body.attn.window=if(layer % 2 == 0, 8, seq_len)", "vocab_size=512"])
    plan = elaborate(g.resolve())
    windows = [s.cfg.window for _, _, s in plan.steps() if s.id == "attn"]
    assert windows == [8, 64]
    model = graphs.build(plan, seed=0)
    x = torch.randint(0, 512, (1, 64))
    lg, _ = model(x)
    assert torch.isfinite(lg).all()


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(ops.alibi_slopes(8), 2.0 ** -torch.arange(1.0, 9.0))
    # 6 heads: the 4-head slopes, then every other slope of the 8-head set
    want = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    torch.testing.assert_close(ops.alibi_slopes(6), torch.tensor(want))


def test_alibi_equals_an_explicit_bias_matrix():
    q, k, v = qkv(h=4, kv=2)
    slopes = ops.alibi_slopes(4).double()
    bias = torch.empty(4, T, T, dtype=torch.float64)
    for h in range(4):
        for i in range(T):
            for j in range(T):
                bias[h, i, j] = -slopes[h] * (i - j)
    ref = reference(q, k, v, bias=bias)
    for kernel in ("sdpa", "eager", "flex"):
        torch.testing.assert_close(ops.attend(q, k, v, ops.Scores(alibi=True), kernel, slopes), ref)
    m = make("attention", {"heads": 4, "alibi": True})
    assert m(x_in()).shape == (B, T, D)


def test_flex_paths_equal_sdpa_with_the_dense_mask():
    from torch.nn.attention.flex_attention import create_mask
    t = 24
    q, k, v = qkv(h=4, kv=2, t=t)
    for window in (None, 5):
        s = ops.Scores(window=window, alibi=True)
        slopes = ops.alibi_slopes(4).double()

        def mask_mod(b, h, qi, kj, w=window):
            keep = qi >= kj
            return keep & (qi - kj < w) if w is not None else keep
        mask = create_mask(mask_mod, None, None, t, t, device="cpu")
        bias = ops.alibi_bias(slopes, t).masked_fill(~mask[0], float("-inf"))
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None], enable_gqa=True)
        torch.testing.assert_close(ops.attend(q, k, v, s, "flex", slopes), dense)
    assert ops.block_mask(t, 5, "cpu") is ops.block_mask(t, 5, "cpu")  # reused across layers


@pytest.mark.gpu
@pytest.mark.parametrize("scores", [ops.Scores(window=100), ops.Scores(softcap=30.0),
                                    ops.Scores(alibi=True, window=64)])
def test_compiled_flex_on_cuda_matches_the_eager_twin(scores):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = [torch.randn(2, n, 256, 64, device="cuda", generator=g, requires_grad=True)
               for n in (8, 2, 2)]
    slopes = ops.alibi_slopes(8).cuda()
    out = ops.attend(q, k, v, scores, "flex", slopes)
    ref = ops.attend(q, k, v, scores, "eager", slopes)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    gq, = torch.autograd.grad(out.sum(), q)
    rq, = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, rq, rtol=2e-3, atol=2e-3)


# ----- (3) value residual and differential attention

def _value_residual_pair(mix: float):
    """(attention fed [x, v, v_first] with `mix`, the same weights as a one-input attention)."""
    kv, dh = 2, D // 4
    vk = hidden(kv * dh)
    vr = make("attention", {"heads": 4, "kv_heads": kv, "rope": True, "value_mix": mix,
                            "value_mix_learn": False}, ins=[hidden(D), vk, vk], layer=2)
    base = make("attention", {"heads": 4, "kv_heads": kv, "rope": True})
    w_v = torch.randn(kv * dh, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base.qkv.weight.copy_(torch.cat([vr.qkv.weight, w_v]))
        base.proj.weight.copy_(vr.proj.weight)
    return vr, base, w_v


def test_value_residual_with_zero_weight_on_the_first_layer_is_the_baseline():
    vr, base, w_v = _value_residual_pair(0.0)
    x = x_in()
    v_first = torch.randn(B, T, w_v.shape[0], dtype=torch.float64)
    torch.testing.assert_close(vr(x, x @ w_v.T, v_first), base(x), rtol=0, atol=1e-12)


def test_value_residual_mixes_the_first_layers_values():
    vr, base, w_v = _value_residual_pair(0.3)
    x, x0 = x_in(1), x_in(2)
    # base computes values w_v x; make them 0.7 w_v x + 0.3 v_first by shifting its input's v
    v_first = x0 @ w_v.T
    _, _, v = vr.heads(x, x @ w_v.T, v_first)
    _, _, v_base = base.heads(x)
    v_first_h = v_first.view(B, T, 2, -1).transpose(1, 2)
    torch.testing.assert_close(v, 0.7 * v_base + 0.3 * v_first_h)
    layer0 = make("attention", {"heads": 4, "kv_heads": 2}, ins=[hidden(D), hidden(16), hidden(16)],
                  layer=0)
    assert not hasattr(layer0, "value_lambda")  # the first layer is V_1 itself


def test_value_residual_edge_across_layers_in_a_graph():
    g = graphs.load(ROOT / "docs" / "sketches" / "speedrun.yaml", size="tiny",  # no zero init
                    sets=["nodes.layers.body.attn.proj_std=0.02", "nodes.layers.body.mlp.proj_std=0.02",
                          "vocab_size=512"])
    plan = elaborate(g.resolve())
    model = graphs.build(plan, seed=0)
    attn1 = [s for _, _, s in plan.steps() if s.id == "attn"][1]
    assert [(r.node, r.layer) for r in attn1.ins] == [("attn_norm", None), ("v", None), ("v", 0)]
    assert not hasattr(model.layers[0].attn, "value_lambda")
    x = torch.randint(0, 512, (2, 64))
    _, loss = model(x, x.roll(-1, 1))
    loss.backward()
    assert model.layers[1].attn.value_lambda.grad is not None
    # layer 0's value projection also learns through layer 1's mixing
    g0 = model.layers[0].v.proj.weight.grad.clone()
    model.zero_grad()
    with torch.no_grad():
        model.layers[1].attn.value_lambda.copy_(torch.tensor([1.0, 0.0]))
    model(x, x.roll(-1, 1))[1].backward()
    assert not torch.allclose(g0, model.layers[0].v.proj.weight.grad)


def _diff_parts(m, x):
    b, t, _ = x.shape
    h, dh = m.h, m.dh
    q, k, v = m.qkv(x).split([2 * h * dh] * 3, dim=-1)
    q = q.view(b, t, 2 * h, dh).transpose(1, 2)
    k = k.view(b, t, 2 * h, dh).transpose(1, 2)
    v = v.view(b, t, h, 2 * dh).transpose(1, 2)
    return q[:, 0::2], k[:, 0::2], q[:, 1::2], k[:, 1::2], v


def _head_rms(y, w, eps=1e-5):
    return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * w


def test_diff_attention_with_lambda_zero_is_attention_plus_head_norm():
    m = make("diff_attention", {"heads": 2, "rope": False, "lambda_init": 0.0})
    with torch.no_grad():
        m.lambdas.zero_()           # lambda = e^0 - e^0 + 0 = 0
        m.subln.uniform_(0.5, 1.5)
    assert float(m.lam()) == 0.0
    x = x_in()
    q1, k1, _, _, v = _diff_parts(m, x)
    y = _head_rms(reference(q1, k1, v), m.subln)
    want = m.proj(y.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(m(x), want)


def test_diff_attention_matches_a_dense_reference():
    m = make("diff_attention", {"heads": 2, "rope": False}, layer=3)
    lam_init = 0.8 - 0.6 * math.exp(-0.9)
    assert m.lambda_init == pytest.approx(lam_init)
    assert make("diff_attention", {"heads": 2}, layer=0).lambda_init == pytest.approx(0.2)
    x = x_in()
    q1, k1, q2, k2, v = _diff_parts(m, x)
    lq1, lk1, lq2, lk2 = m.lambdas
    lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + lam_init
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a1 = (q1 @ k1.transpose(-1, -2) / math.sqrt(m.dh)).masked_fill(~causal, -math.inf).softmax(-1)
    a2 = (q2 @ k2.transpose(-1, -2) / math.sqrt(m.dh)).masked_fill(~causal, -math.inf).softmax(-1)
    y = _head_rms((a1 - lam * a2) @ v, m.subln) * (1 - lam_init)
    torch.testing.assert_close(m(x), m.proj(y.transpose(1, 2).reshape(B, T, -1)))


# ----- (4) MLA

@pytest.mark.parametrize("q_rank", [12, None], ids=["q-latent", "q-direct"])
def test_mla_absorbed_path_equals_naive_and_caches_latent_plus_rope(q_rank):
    m = make("mla", {"heads": 4, "kv_rank": 10, "q_rank": q_rank, "rope_dim": 4, "v_head_dim": 6})
    x = x_in()
    out, (c_kv, k_r) = m.absorbed(x)
    torch.testing.assert_close(out, m(x), rtol=1e-10, atol=1e-10)
    assert c_kv.shape == (B, T, 10) and k_r.shape == (B, 1, T, 4)   # d_c + d_R per token
    # the naive path is causal attention over [content; rotary] with scale 1/sqrt(dh + dR)
    q_c, q_r, c, kr = m.latents(x)
    kv = m.kv_up(c).view(B, T, 4, 14).transpose(1, 2)
    q = torch.cat([q_c, q_r], -1)
    k = torch.cat([kv[..., :8], kr.expand(-1, 4, -1, -1)], -1)
    y = reference(q, k, kv[..., 8:])  # reference scales by 1/sqrt(8 + 4) = 1/sqrt(dh + dR)
    torch.testing.assert_close(m(x), m.proj(y.transpose(1, 2).reshape(B, T, -1)))


@pytest.mark.parametrize("mode", ["regional", "full", "nested"])
def test_compiled_regions_read_flex_block_masks_made_outside_them(mode):
    """Flex's block masks were built inside every compiled region at every call (Dynamo traced
    through their lru_cache: arange, vmap, argsort, ~70 graph nodes a layer). graphs.compile now
    makes them eagerly from the input's length before each call, and the graphs take them as
    inputs: no mask-building node is left in any graph, and the model computes what it did
    eagerly (no gradients: Flex has no backward on the CPU)."""
    import torch._dynamo

    from graphs.compile import compile_model
    sets = ["nodes.layers.body.attn.window=if(layer % 2 == 0, 16, seq_len)",
            "nodes.layers.body.attn.softcap=20.0", "nodes.layers.body.attn.kernel=flex"]
    g = graphs.load(ROOT / "graphs" / "llama.yaml", size="tiny", sets=sets)
    model = graphs.build(elaborate(g.resolve()), seed=0).requires_grad_(False)
    x = torch.randint(0, 50304, (2, 64))
    eager_logits = model(x)[0]
    ops._BLOCK_MASKS.clear()
    torch._dynamo.reset()
    traced = []

    def backend(gm, example_inputs):
        traced.append(gm)
        return gm.forward
    logits = compile_model(model, mode, backend=backend)(x)[0]
    assert traced
    nodes = [str(n.target) for gm in traced for n in gm.graph.nodes if n.op == "call_function"]
    assert any("flex_attention" in t for t in nodes)
    assert not [t for t in nodes if "vmap" in t or "arange" in t or "argsort" in t]
    assert set(ops._BLOCK_MASKS) == {(64, 16, "cpu"), (64, None, "cpu")}   # local and global layers
    torch.testing.assert_close(logits, eager_logits, rtol=0, atol=0)


@pytest.mark.gpu
def test_compiled_llama_with_window_and_softcap_matches_eager_on_cuda():
    """The flex path (block masks cached across layers) inside a compiled model."""
    sets = ["nodes.layers.body.attn.window=if(layer % 2 == 0, 16, seq_len)",
            "nodes.layers.body.attn.softcap=20.0", "nodes.layers.body.attn.qk_norm=true"]
    g = graphs.load(ROOT / "graphs" / "llama.yaml", size="tiny", sets=sets)
    model = graphs.build(elaborate(g.resolve()), seed=0).cuda()
    x = torch.randint(0, 50304, (4, 64), device="cuda")
    eager_logits, _ = model(x, x.roll(-1, 1))
    compiled = torch.compile(model)
    logits, loss = compiled(x, x.roll(-1, 1))
    torch.testing.assert_close(logits, eager_logits, rtol=2e-3, atol=2e-3)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_llama_with_qk_norm_and_grouped_kv_matches_hf_qwen3():
    """QK-norm as Qwen3 does it (per-head RMSNorm over head_dim before RoPE), against HF."""
    import test_parity_hf as P
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(
        vocab_size=P.V, hidden_size=P.D, intermediate_size=P.D_FF, num_hidden_layers=P.L,
        num_attention_heads=P.H, num_key_value_heads=2, head_dim=P.D // P.H,
        max_position_embeddings=P.SEQ, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True,
        attention_bias=False, use_sliding_window=False, attention_dropout=0.0, bos_token_id=0,
        eos_token_id=0, attn_implementation="sdpa")
    hf = transformers.Qwen3ForCausalLM(cfg)
    P.randomize(hf, seed=2)
    hf = hf.double().eval()
    model = P.ours(ROOT / "graphs" / "llama.yaml", [f"d_ff={P.D_FF}"],
                   {"vars.n_kv_head": 2, "nodes.head.tie": "tok",
                    "nodes.layers.body.attn.qk_norm": True}, torch.float64)

    def to_ours(state, expected):
        state, norms = dict(state), {}
        for i in range(P.L):
            for n in ("q_norm", "k_norm"):
                norms[f"layers.{i}.attn.{n}"] = state.pop(f"model.layers.{i}.self_attn.{n}.weight")
        out = P.llama_from_hf(state, P.L, P.H, 2, True, expected=set(expected) - set(norms))
        return {**out, **norms}
    P.check_parity(hf, model, to_ours, torch.float64)


def test_mla_matches_hf_deepseek_v3_attention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds
    cfg = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12,
        kv_lora_rank=10, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6,
        rope_interleave=False, rms_norm_eps=1e-6, max_position_embeddings=T, rope_theta=1e4,
        attention_bias=False, attn_implementation="sdpa")
    hf = ds.DeepseekV3Attention(cfg, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        hf.q_a_layernorm.weight.add_(1.0)
        hf.kv_a_layernorm.weight.add_(1.0)
    ours = make("mla", {"heads": 4, "kv_rank": 10, "q_rank": 12, "rope_dim": 4, "v_head_dim": 6})
    names = {"q_down.weight": "q_a_proj.weight", "q_norm": "q_a_layernorm.weight",
             "q_up.weight": "q_b_proj.weight", "kv_down.weight": "kv_a_proj_with_mqa.weight",
             "kv_norm": "kv_a_layernorm.weight", "kv_up.weight": "kv_b_proj.weight",
             "proj.weight": "o_proj.weight"}
    theirs = hf.state_dict()
    ours.load_state_dict({k: theirs[v].clone() for k, v in names.items()}, strict=True)
    x = x_in().requires_grad_()
    cos, sin = ds.DeepseekV3RotaryEmbedding(cfg).double()(x, torch.arange(T)[None].expand(B, T))
    ref, _ = hf(x, position_embeddings=(cos, sin), attention_mask=None)
    out = ours(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (g_ours,) = torch.autograd.grad(out.square().sum(), x)
    (g_hf,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(g_ours, g_hf, rtol=1e-10, atol=1e-10)
