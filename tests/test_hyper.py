"""Hyper-connections (architectures.md §2): every variant equals the Pre-Norm Transformer++ at
init (fp64 logits and block gradients; n = 1 exactly), stream shapes between blocks, expand and
collapse once per model, mHC's doubly stochastic residual matrices, and the DHC / mHC blocks
against an independent per-token implementation of the papers' equations written here."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import graphs
from blocks import hyper_ops as ops
from blocks.kinds import hidden, streams
from blocks.registry import Context
from graphs.errors import GraphError

from conftest import ROOT, logits_and_loss

HYPER, LLAMA = ROOT / "graphs" / "hyper.yaml", ROOT / "graphs" / "llama.yaml"
V, D, L, H, T, B = 97, 32, 3, 4, 16, 2
SETS = [f"vocab_size={V}", f"d_model={D}", f"n_layer={L}", f"n_head={H}", f"seq_len={T}", "d_ff=64"]
NO_EPS = ["nodes.norm.eps=0"]  # the final norm then removes the factor n exactly


def model(path, sets=(), dtype=torch.float32, seed=0) -> graphs.GraphModel:
    g = graphs.load(path, size="tiny", sets=[*SETS, *sets])
    return graphs.build(graphs.elaborate(g.resolve()), seed=seed).to(dtype)


def hyper(mode="dynamic", n=4, frac=1, sets=(), dtype=torch.float32):
    return model(HYPER, [f"hc={mode}", f"n_streams={n}", f"frac={frac}", *sets], dtype)


def pre_norm_twin(hc: graphs.GraphModel, sets=(), dtype=torch.float32) -> graphs.GraphModel:
    """graphs/llama.yaml with the hyper model's weights (the node ids are shared)."""
    pre = model(LLAMA, sets, dtype, seed=1)
    own = hc.state_dict()
    pre.load_state_dict({k: own[k] for k in pre.state_dict()}, strict=True)
    return pre


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


# ----- equal to Pre-Norm at init

@pytest.mark.parametrize("mode, n, frac", [("dynamic", 4, 1), ("static", 4, 1), ("mhc", 4, 1),
                                           ("dynamic", 2, 2)])
def test_at_init_logits_and_block_gradients_equal_pre_norm_fp64(mode, n, frac):
    """The paper's init (A_m one-hot on stream k mod n, A_r = I, B = 1, dynamic weights 0) keeps
    all n streams equal; the final norm (eps 0) removes the factor n of the collapse. mHC gets
    norm eps 0 inside too: its pre gate sums to 1.24, not 1, which only the norm removes; and
    as the RMSNorm blocks compute in fp32 (like HF), that rescaling costs fp32 rounding."""
    sets = NO_EPS + (["nodes.layers.body.attn_norm.eps=0", "nodes.layers.body.mlp_norm.eps=0"]
                     if mode == "mhc" else [])
    hc = hyper(mode, n, frac, sets, torch.float64)
    pre = pre_norm_twin(hc, sets, torch.float64)
    idx, tgt = batch()
    (la, loss_a), (lb, loss_b) = logits_and_loss(hc, idx, tgt), logits_and_loss(pre, idx, tgt)
    tol = dict(rtol=1e-5, atol=1e-6) if mode == "mhc" else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(la, lb, **tol)
    (loss_a + 0.1 * la.pow(2).mean()).backward()
    (loss_b + 0.1 * lb.pow(2).mean()).backward()
    grads = dict(hc.named_parameters())
    for name, p in pre.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        tol = dict(rtol=1e-4, atol=1e-7) if mode == "mhc" else dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[name].grad, p.grad, **tol, msg=name)


@pytest.mark.parametrize("mode, frac", [("static", 1), ("dynamic", 1), ("static", 4), ("dynamic", 2)])
def test_one_stream_with_unit_connections_is_pre_norm_exactly(mode, frac):
    hc = hyper(mode, n=1, frac=frac)
    pre = pre_norm_twin(hc)
    idx, tgt = batch(1)
    (la, loss_a), (lb, loss_b) = logits_and_loss(hc, idx, tgt), logits_and_loss(pre, idx, tgt)
    assert torch.equal(la, lb) and torch.equal(loss_a, loss_b)


def test_mhc_with_one_stream_is_pre_norm_up_to_the_norm_eps():
    """mHC's pre gate is sigmoid(2) = 0.88, not 1: only the sublayer's norm removes it."""
    eps0 = ["nodes.layers.body.attn_norm.eps=0", "nodes.layers.body.mlp_norm.eps=0"]
    hc = hyper("mhc", n=1, sets=eps0)
    la, lb = hc(batch(2)[0])[0], pre_norm_twin(hc, eps0)(batch(2)[0])[0]
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


def test_frac_connections_do_not_widen_the_residual():
    shapes = {}
    m = hyper("dynamic", n=1, frac=4)
    m.expand.register_forward_hook(lambda mod, i, out: shapes.update(s=out.shape))
    m(batch()[0])
    assert shapes["s"] == (B, T, 4, D // 4)  # n*m pieces of d/m: B*T*d numbers, as Pre-Norm


# ----- streams between blocks, expand and collapse once

def test_stream_shapes_between_blocks_and_expand_collapse_once():
    m = hyper("dynamic", n=4)
    calls, layer_io, streams_out = {"hc_expand": 0, "hc_collapse": 0}, [], []
    for (_, _, step), (_, blk) in zip(m.plan.steps(), m.blocks()):
        if blk.type_name in calls:
            blk.register_forward_hook(lambda mod, i, o: calls.__setitem__(mod.type_name, calls[mod.type_name] + 1))
        if step.out_kinds[0].name == "streams":  # every block that gives streams: its real shape
            blk.register_forward_hook(lambda mod, i, o: streams_out.append(o.shape))
    for layer in m.layers:
        layer.register_forward_hook(lambda mod, i, o: layer_io.append((i[0].shape, o[0].shape)))
    m(batch()[0])
    assert calls == {"hc_expand": 1, "hc_collapse": 1}
    assert layer_io == [((B, T, 4, D), (B, T, 4, D))] * L
    assert streams_out == [(B, T, 4, D)] * (1 + 2 * L)   # expand, then every hc_write
    plan = m.plan
    top = [s.block.type_name for g, _, s in plan.steps() if g is None]
    body = [s.block.type_name for g, _, s in plan.steps() if g is not None]
    assert top.count("hc_expand") == top.count("hc_collapse") == 1
    assert "hc_expand" not in body and "hc_collapse" not in body
    assert body.count("hc_read") == body.count("hc_write") == 2 * L
    assert m.layers[0].a_read.coefficients(torch.zeros(1, 1, 4, D)).shape[-2:] == (4, 1)
    with pytest.raises(ValueError, match="expected"):
        m.layers[0].a_read(torch.zeros(B, T, 2, D))


PER_BLOCK = """
name: per-block
vars: {vocab_size: 64, seq_len: 16, d_model: 32, n_layer: 2, n_head: 4}
sizes: {tiny: {}}
nodes:
  tok: {type: embedding, in: tokens, vocab: vocab_size, dim: d_model}
  layers:
    repeat: n_layer
    in: tok
    body:
      up:   {type: hc_expand, in: stream, n: 4}
      rd:   {type: hc_read, in: up}
      n1:   {type: rmsnorm, in: rd}
      attn: {type: attention, in: n1, heads: n_head}
      wr:   {type: hc_write, in: [up, attn]}
      down: {type: hc_collapse, in: wr}
  norm: {type: rmsnorm, in: layers}
  head: {type: lm_head, in: norm, vocab: vocab_size, tie: tok}
  loss: {type: cross_entropy, in: [head, targets]}
outputs: {logits: head, loss: loss}
"""


def test_expand_or_collapse_inside_a_repeat_group_is_refused_at_its_line():
    """Per-block expand/collapse type-checks (hidden in, hidden out) but silently gives n
    independent plain residuals: the checker refuses it."""
    with pytest.raises(GraphError, match="once per model") as e:
        graphs.elaborate(graphs.loads(PER_BLOCK).resolve())
    assert ":11:" in str(e.value)  # the line of `up`


# ----- mHC: doubly stochastic residual matrices

def perturb(m: torch.nn.Module, seed=0, std=1.0):
    """Random hyper-connection parameters, far from init, so every matrix is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, blk in m.blocks() if hasattr(m, "blocks") else [("", m)]:
            if blk.type_name in ("hc_read", "hc_write"):
                for p in blk.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * std)


def test_mhc_residual_matrices_are_doubly_stochastic_and_gates_bounded():
    m = hyper("mhc", n=4)
    perturb(m, std=0.1)  # logits of a few units, as training reaches from the 0.01 scales
    seen = []
    for _, blk in m.blocks():
        if blk.type_name == "hc_write":
            blk.register_forward_hook(lambda mod, i, o: seen.append((mod.res_matrix(i[0]),
                                                                     mod.coefficients(i[0])[1])))
        if blk.type_name == "hc_read":
            blk.register_forward_hook(lambda mod, i, o: seen.append((None, mod.coefficients(i[0]))))
    m(batch()[0])
    assert len(seen) == 4 * L
    for res, gate in seen:
        if res is not None:
            assert res.shape == (B, T, 4, 4) and (res >= 0).all()
            assert (res.sum(-1) - 1).abs().max() < 1e-4 and (res.sum(-2) - 1).abs().max() < 1e-4
            assert ((gate > 0) & (gate < 2)).all()           # H_post = 2 sigmoid
        else:
            assert ((gate > 0) & (gate < 1)).all()           # H_pre = sigmoid
    res = seen[1][0]
    assert (res[0, 0] - res[1, 5]).abs().max() > 1e-2       # they depend on the token


def test_sinkhorn_matches_an_independent_loop():
    logits = torch.randn(5, 3, 3, dtype=torch.float64) * 3
    want = logits.exp()
    for _ in range(20):
        for M in want:
            for i in range(3):
                M[i] /= M[i].sum()
            for j in range(3):
                M[:, j] /= M[:, j].sum()
    torch.testing.assert_close(ops.sinkhorn(logits, 20), want, rtol=1e-12, atol=1e-12)


def test_sinkhorn_stays_finite_and_doubly_stochastic_for_logits_far_apart():
    """A row of logits 150 below another's (a large learned res_scale) is still a distribution:
    exp of the row alone is what the first row normalisation sees."""
    logits = torch.tensor([[[200.0, 199.0, 198.0, 197.0], [50.0, 49.0, 48.0, 51.0],
                            [0.0, 1.0, 2.0, 3.0], [-5.0, -4.0, -6.0, -3.0]]], requires_grad=True)
    p = ops.sinkhorn(logits, 20)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(1, 4), atol=1e-6, rtol=0)
    p[0, 0, 0].backward()
    assert torch.isfinite(logits.grad).all()
    want = ops.sinkhorn(logits.double() - 100, 20)                  # shifted: no underflow in fp64
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-6)


# ----- the blocks against the papers' equations, token by token (fp64, random parameters)

def blocks_for(mode, n=3, d=8, frac=1):
    import blocks
    kind = streams(n * frac, d // frac, frac=frac)
    made = []
    for name, ins in (("hc_read", [kind]), ("hc_write", [kind, hidden(d)])):
        cls = blocks.get(name)
        cfg = cls.Config(mode=mode, eps=0.0)  # the equations below have no eps
        blk = cls(cfg, ins, Context("x", layer=1, n_layer=2)).double()
        blk.init_weights(None)
        perturb(blk, seed=len(made) + 3, std=0.5)
        made.append(blk)
    return made


def rms(v):
    return v / v.pow(2).mean().sqrt()


def test_dhc_equals_the_paper_equations():
    read, write = blocks_for("dynamic")
    Hs, y = torch.randn(2, 3, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    got_in, got_out = read(Hs)[0], write(Hs, y)
    for b in range(2):
        for t in range(3):
            Ht, n = Hs[b, t], 3
            Hbar = torch.stack([rms(Ht[i]) for i in range(n)])
            a_m = read.a_m[:, 0] + read.s_alpha * torch.tanh(Hbar @ read.w_m[:, 0])
            a_r = write.a_r + write.s_alpha * torch.tanh(Hbar @ write.w_r)    # row i from H_i
            beta = write.beta[0] + write.s_beta * torch.tanh(Hbar @ write.w_beta[:, 0])
            h_in = sum(a_m[i] * Ht[i] for i in range(n))
            out = torch.stack([beta[j] * y[b, t] + sum(a_r[i, j] * Ht[i] for i in range(n))
                               for j in range(n)])
            torch.testing.assert_close(got_in[b, t], h_in)
            torch.testing.assert_close(got_out[b, t], out)


def test_mhc_equals_deepseek_equations():
    read, write = blocks_for("mhc")
    Hs, y = torch.randn(2, 3, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    got_in, got_out = read(Hs)[0], write(Hs, y)
    for b in range(2):
        for t in range(3):
            x = Hs[b, t]                                      # x_l: n x C
            xt = rms(x.flatten())                             # RMSNorm(vec(x_l)), no weight
            pre = torch.sigmoid(read.pre_scale * (xt @ read.pre_proj) + read.pre_bias)
            post = 2 * torch.sigmoid(write.post_scale * (xt @ write.post_proj) + write.post_bias)
            res_logits = write.res_scale * (xt @ write.res_proj).reshape(3, 3) + write.res_bias
            res = ops.sinkhorn(res_logits, 20)
            torch.testing.assert_close(got_in[b, t], pre @ x)
            torch.testing.assert_close(got_out[b, t], res @ x + post[:, None] * y[b, t][None])


def test_dynamic_coefficients_read_the_normed_streams_and_mixing_the_raw_ones():
    read, write = blocks_for("dynamic", frac=2, d=8)
    h = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(read.coefficients(3.0 * h), read.coefficients(h))
    torch.testing.assert_close(write.coefficients(3.0 * h)[0], write.coefficients(h)[0])
    torch.testing.assert_close(read(3.0 * h)[0], 3.0 * read(h)[0])
    assert not torch.allclose(read.coefficients(h)[0, 0], read.coefficients(h)[1, 2])


def test_expand_then_collapse_is_n_times_the_input():
    x = torch.randn(2, 3, 12)
    for n, m in ((1, 1), (4, 1), (2, 3), (1, 4)):
        torch.testing.assert_close(ops.collapse(ops.expand(x, n, m), m), n * x)


# ----- training

@pytest.mark.parametrize("mode", ["dynamic", "static", "mhc"])
def test_a_training_step_moves_the_connections_without_weight_decay(mode):
    m = hyper(mode, n=2)
    groups = m.param_groups(0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    hc = [(n, p) for n, p in m.named_parameters() if ".a_read." in n or ".a_write." in n]
    assert hc and all(id(p) in no_decay for _, p in hc)
    before = {n: p.detach().clone() for n, p in hc}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    _, loss = m(*batch())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in hc if not torch.equal(p, before[n])]
    learns = {"dynamic": "w_m", "static": "a_m", "mhc": "pre_proj"}[mode]
    assert any(n.endswith(learns) for n in moved), moved


def test_mix_with_static_or_per_token_coefficients_equals_einsum():
    """Both forms of `mix` (U pointwise terms for a 2-D A, broadcast-and-sum for a batched A)."""
    from blocks import hyper_ops
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    for a in (torch.randn(4, 4, dtype=torch.float64, generator=g),
              torch.randn(4, 2, dtype=torch.float64, generator=g),
              torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g)):
        want = torch.einsum("...ut,...uw->...tw", a.expand(2, 3, *a.shape[-2:]), x)
        torch.testing.assert_close(hyper_ops.mix(a, x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["static", "dynamic", "mhc"])
def test_compiled_bf16_step_matches_eager(mode):
    dev = torch.device("cuda")
    m = hyper(mode, n=4).to(dev)
    idx, tgt = (t.to(dev) for t in batch())
    with torch.autocast("cuda", torch.bfloat16):
        eager = m(idx, tgt)[1]
        compiled = torch.compile(m, fullgraph=False)(idx, tgt)[1]
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


# ----- Liger's fused mHC as a backend (blocks/liger.py; the GPU parity is in tests/test_liger.py)

def liger_equations(x, phi, b, a_pre, a_post, a_res, *, tmax, rms_eps, pre_eps, sinkhorn_eps,
                    post_mult, allow_fp32):
    """Liger's mHC coefficients as liger_kernel/ops/mhc.py (0.8.5) defines them, written out:
    one projection of the flattened streams, columns [pre | post | res], scaled by the RMS of
    the input; Sinkhorn starts with a row softmax and adds sinkhorn_eps at every normalisation."""
    n = x.shape[-2]
    v = x.flatten(-2)
    mix = (v @ phi) * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + rms_eps)
    pre = torch.sigmoid(a_pre * mix[..., :n] + b[:n]) + pre_eps
    post = post_mult * torch.sigmoid(a_post * mix[..., n:2 * n] + b[n:2 * n])
    m = torch.softmax((a_res * mix[..., 2 * n:] + b[2 * n:]).unflatten(-1, (n, n)), -1) + sinkhorn_eps
    m = m / (m.sum(-2, keepdim=True) + sinkhorn_eps)
    for _ in range(tmax - 1):
        m = m / (m.sum(-1, keepdim=True) + sinkhorn_eps)
        m = m / (m.sum(-2, keepdim=True) + sinkhorn_eps)
    return pre, post, m


def mhc_pair(n, d, eps, iters, impl="torch"):
    import blocks
    kind = streams(n, d)
    read = blocks.get("hc_read")(blocks.get("hc_read").Config(mode="mhc", eps=eps, impl=impl),
                                 [kind], Context("x", layer=1, n_layer=2))
    write = blocks.get("hc_write")(blocks.get("hc_write").Config(mode="mhc", eps=eps, impl=impl,
                                                                 sinkhorn_iters=iters),
                                   [kind, hidden(d)], Context("y", layer=1, n_layer=2))
    for i, blk in enumerate((read, write)):
        blk.double().init_weights(None)
        perturb(blk, seed=i + 7, std=0.3)
    return read, write


@pytest.mark.parametrize("eps, iters", [(1e-6, 20), (0.0, 3), (1e-2, 1)])
def test_our_parameters_in_liger_equations_give_our_mhc(eps, iters):
    """The mapping onto Liger's arguments (mhc_liger_args, and the options: pre_eps 0,
    sinkhorn_eps 0, post_mult 2, rms_eps = our eps, tmax = our iterations) is our math, fp64."""
    from blocks import liger
    read, write = mhc_pair(4, 8, eps, iters)
    h, y = torch.randn(2, 3, 4, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    args = liger.mhc_liger_args(4, pre=(read.pre_proj, read.pre_bias, read.pre_scale))
    pre, _, _ = liger_equations(h, *args, **liger._mhc_options(eps, 1))
    torch.testing.assert_close(read(h)[0], (pre.unsqueeze(-1) * h).sum(-2), rtol=1e-12, atol=1e-12)
    args = liger.mhc_liger_args(4, post=(write.post_proj, write.post_bias, write.post_scale),
                                res=(write.res_proj, write.res_bias, write.res_scale))
    _, post, res = liger_equations(h, *args, **liger._mhc_options(eps, iters))
    want = res @ h + post.unsqueeze(-1) * y.unsqueeze(-2)   # x'[o] = sum_i res[o, i] x_i + post[o] y
    torch.testing.assert_close(write(h, y), want, rtol=1e-12, atol=1e-12)
    # Liger's own defaults (sinkhorn_eps 1e-6) would not be our mHC
    _, _, res_default = liger_equations(h, *args, **{**liger._mhc_options(eps, iters), "sinkhorn_eps": 1e-6})
    assert (res_default - res).abs().max() > 1e-8


def test_impl_liger_on_static_or_dynamic_connections_is_refused_at_the_node():
    with pytest.raises(GraphError, match="a_read: impl liger: Liger has a fused op for mode mhc only"):
        hyper("dynamic", sets=["nodes.layers.body.a_read.impl=liger"])
    with pytest.raises(GraphError, match="m_write.*impl liger.*mode mhc only, not static"):
        hyper("static", sets=["nodes.layers.body.m_write.impl=liger"])
    hyper("dynamic", sets=["nodes.layers.body.a_read.impl=auto"])   # auto: the twin


def test_impl_liger_needs_a_power_of_two_number_of_streams():
    with pytest.raises(GraphError, match=r"m_write.*impl liger cannot run this mHC: 3 streams.*power of two"):
        hyper("mhc", n=3, sets=["nodes.layers.body.m_write.impl=liger"])


HC_IMPL = [f"nodes.layers.body.{n}.impl=auto" for n in ("a_read", "a_write", "m_read", "m_write")]


def test_mhc_with_impl_auto_on_cpu_is_the_twin_exactly():
    m, twin = hyper("mhc", sets=HC_IMPL), hyper("mhc")
    perturb(m, std=0.1)
    twin.load_state_dict(m.state_dict())   # the backends share every parameter name
    idx, tgt = batch(3)
    (la, loss_a), (lb, loss_b) = logits_and_loss(m, idx, tgt), logits_and_loss(twin, idx, tgt)
    assert torch.equal(la, lb) and torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("n, dtype", [(3, torch.float32), (4, torch.float64)])
def test_where_liger_cannot_take_the_streams_auto_runs_the_twin_and_liger_refuses(n, dtype, monkeypatch):
    """Even where Liger could run (CUDA pretended): 3 streams (tl.arange takes powers of two) and
    fp64 (Liger's mHC takes fp32, bf16, fp16) fall back under auto, and impl liger says why."""
    from blocks import liger
    monkeypatch.setattr(liger, "can_run", lambda device: True)
    auto, twin = (mhc_pair(n, 8, 1e-6, 20, impl) for impl in ("auto", "torch"))
    h, y = torch.randn(2, 3, n, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    a_read, a_write, t_read, t_write = (b.to(dtype) for b in (*auto, *twin))
    h, y = h.to(dtype), y.to(dtype)
    assert torch.equal(a_read(h)[0], t_read(h)[0]) and torch.equal(a_write(h, y), t_write(h, y))
    assert not [k for k in liger._AUTO if k[0].startswith("mhc")]   # nothing was benchmarked
    a_read.cfg = dataclasses.replace(a_read.cfg, impl="liger")
    with pytest.raises(RuntimeError, match="hc_read 'x': impl liger: .*(power of two|float64)"):
        a_read(h)


def test_bench_variant_liger_puts_the_liger_mhc_on_mhc_connections_only():
    from search.bench_models import variant_sets
    sets = variant_sets("hyper+hc=mhc@liger", "tiny")
    assert {f"nodes.layers.body.{n}.impl=liger" for n in ("a_read", "a_write", "m_read", "m_write")} <= set(sets)
    dyn = variant_sets("hyper@liger", "tiny")   # dynamic connections have no Liger op
    assert not [s for s in dyn if "_read." in s or "_write." in s] and "nodes.norm.impl=liger" in dyn
    graphs.elaborate(graphs.load(HYPER, size="tiny", sets=dyn).resolve())   # not refused
