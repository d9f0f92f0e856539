"""nGPT (architectures.md §1): the sphere invariants after init and after optimizer steps, the
limit cases of the residual update, the effective scalars at init, and parity of the logits and of
three AdamW steps with an independent fp64 implementation of the paper's equations written here."""
from __future__ import annotations

import math

import pytest
import torch

import graphs
from blocks import ngpt
from blocks.ngpt import NGPTResidual
from blocks.kinds import hidden
from blocks.registry import Context
from graphs.errors import GraphError

from conftest import ROOT

NGPT = ROOT / "graphs" / "ngpt.yaml"
V, D, L, H, T = 97, 32, 2, 4, 16
D_FF = 96
SETS = [f"vocab_size={V}", f"d_model={D}", f"n_layer={L}", f"n_head={H}", f"seq_len={T}", f"d_ff={D_FF}"]


def model(dtype=torch.float32, params=None, sets=(), seed=0) -> graphs.GraphModel:
    g = graphs.load(NGPT, size="tiny", sets=[*SETS, *sets])
    return graphs.build(graphs.elaborate(g.resolve(params or {})), seed=seed).to(dtype)


def axes(m: graphs.GraphModel, out_axis: int = 0) -> dict[str, int]:
    """Every normalised matrix and the axis along which it must have unit norm, written out by
    hand (the wrong axis is the classic nGPT bug): rows of the [n, d] tables and input
    projections, columns (dim 0, the d axis) of the [d, in] output projections."""
    want = {"tok.weight": 1, "head.weight": 1}
    for i in range(len(m.layers)):
        want |= {f"layers.{i}.attn.qkv.weight": 1, f"layers.{i}.attn.proj.weight": out_axis,
                 f"layers.{i}.mlp.fc.weight": 1, f"layers.{i}.mlp.proj.weight": out_axis}
    p, d = dict(m.named_parameters()), m.tok.weight.shape[1]
    d_ff = p["layers.0.mlp.proj.weight"].shape[1]
    assert p["layers.0.attn.proj.weight"].shape == (d, d)
    assert p["layers.0.mlp.proj.weight"].shape == (d, d_ff)   # [d, in]: dim 0 is d
    assert p["layers.0.mlp.fc.weight"].shape == (2 * d_ff, d)
    return want


def assert_on_sphere(m, out_axis=0, tol=1e-5):
    params = dict(m.named_parameters())
    for name, axis in axes(m, out_axis).items():
        norms = params[name].detach().double().norm(dim=axis)
        assert torch.allclose(norms, torch.ones_like(norms), atol=tol), (name, axis, norms.min(), norms.max())


def batch(seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, T), generator=g), torch.randint(0, V, (b, T), generator=g)


def train(m, steps, lr=1e-2):
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=lr, betas=(0.9, 0.95))
    for s in range(steps):
        idx, tgt = batch(s)
        _, loss = m(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.after_step()
    return m


# ----- the sphere

def test_matrices_are_unit_norm_along_their_axis_after_init_and_after_steps():
    m = model()
    assert_on_sphere(m)
    train(m, 4)
    assert_on_sphere(m)


def test_out_axis_input_normalises_the_other_axis():
    m = model(params={"vars.out_axis": "input"})
    assert_on_sphere(m, out_axis=1)
    train(m, 2)
    assert_on_sphere(m, out_axis=1)
    cols = dict(m.named_parameters())["layers.0.mlp.proj.weight"].detach().norm(dim=0)
    assert not torch.allclose(cols, torch.ones_like(cols), atol=1e-3)


def test_renorm_off_leaves_the_sphere_and_renormalising_is_idempotent():
    m = train(model(params={"vars.renorm": False}), 3)
    w = dict(m.named_parameters())["layers.0.attn.qkv.weight"].detach()
    assert (w.norm(dim=1) - 1).abs().max() > 1e-3        # the knob really turns retraction off
    m = train(model(), 2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.after_step()
    for n, p in m.named_parameters():
        assert torch.allclose(p, before[n], atol=1e-7), n


def test_batched_compiled_retraction_equals_the_eager_one(monkeypatch):
    """On CUDA the model retracts every matrix in one compiled call (ngpt._retract_all); run here
    on the CPU in place of the eager loop, it gives the same weights (fp32 and bf16)."""
    a, b = train(model(), 2), train(model(), 2)
    with torch.no_grad():   # move both off the sphere alike
        for p, q in zip(a.parameters(), b.parameters()):
            noise = torch.randn_like(p) * 0.1
            p.add_(noise)
            q.add_(noise)
    a.after_step()   # eager, matrix by matrix
    calls = []
    compiled = ngpt._retract_all
    monkeypatch.setattr(ngpt, "COMPILED_RETRACTION_ON", ("cuda", "cpu"))
    monkeypatch.setattr(ngpt, "_retract_all", lambda ws, ax: calls.append(len(ws)) or compiled(ws, ax))
    b.after_step()
    assert calls == [len(axes(b))]   # one call for all the model's matrices
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)
    assert_on_sphere(b)
    w = torch.randn(8, 16).bfloat16()
    want = w.clone()
    ngpt.retract_(want, 1)
    compiled([w], (1,))
    torch.testing.assert_close(w, want)


def test_hidden_state_is_unit_norm_after_every_block():
    m = train(model(), 3)
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, i, out: seen.append(out))
             for name, blk in m.blocks() if blk.type_name in ("ngpt_embedding", "ngpt_residual")]
    m(batch(9)[0])
    for h in hooks:
        h.remove()
    assert len(seen) == 1 + 2 * L
    for out in seen:
        assert out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=-1), torch.ones(out.shape[:-1]), atol=1e-5)


def test_effective_scalars_at_init_equal_their_s_init():
    m = model()
    p = dict(m.named_parameters())
    for i in range(L):
        for name, n, want, stored in [(f"layers.{i}.r1.alpha", D, 0.05, 1 / math.sqrt(D)),
                                      (f"layers.{i}.r2.alpha", D, 0.05, 1 / math.sqrt(D)),
                                      (f"layers.{i}.attn.s_qk", D, 1.0, 1 / math.sqrt(D)),
                                      (f"layers.{i}.mlp.s_uv", 2 * D_FF, 1.0, 1.0)]:
            assert torch.allclose(p[name + ".p"], torch.full((n,), stored)), name
            assert torch.allclose(m.get_submodule(name)(), torch.full((n,), want)), name
    assert torch.allclose(m.head.s_z(), torch.ones(V))
    assert torch.allclose(p["head.s_z.p"], torch.full((V,), 1 / math.sqrt(D)))


def test_logits_are_bounded_by_s_z():
    m = train(model(), 2)
    z, _ = m(batch(5)[0])   # without targets: the fused loss's graph returns the head's logits
    assert (z.abs() <= m.head.s_z().abs() + 1e-5).all()


def test_no_parameter_gets_weight_decay_and_warmup_is_refused():
    groups = model().param_groups(0.1)
    assert sum(len(g["params"]) for g in groups if g["weight_decay"] > 0) == 0
    with pytest.raises(GraphError) as e:
        graphs.elaborate(graphs.load(NGPT, size="tiny", sets=["training.warmup=0.1"]).resolve({}))
    assert "training.warmup" in str(e.value) and "ngpt" in str(e.value)


@pytest.mark.parametrize("abs_alpha", [True, False])
def test_residual_limits(abs_alpha):
    def residual(alpha):
        cfg = NGPTResidual.Config(alpha_init=alpha, abs_alpha=abs_alpha)
        r = NGPTResidual(cfg, [hidden(D), hidden(D)], Context("r"))
        r.init_weights(None)
        return r
    g = torch.Generator().manual_seed(0)
    h = torch.nn.functional.normalize(torch.randn(2, T, D, generator=g), dim=-1)
    blk = torch.randn(2, T, D, generator=g) * 3
    assert torch.allclose(residual(0.0)(h, blk), h, atol=1e-6)               # alpha = 0: identity
    unit_blk = blk / blk.norm(dim=-1, keepdim=True)
    assert torch.allclose(residual(1.0)(h, blk), unit_blk, atol=1e-6)       # alpha = 1: Norm(h_block)


# ----- parity with the paper's equations, written independently in fp64

def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x [B, H, T, dh]: channel pairs (i, i + dh/2) rotate by t * theta^(-2i/dh). The angles'
    cos and sin are taken in fp32, as Meta's and Hugging Face's tables are (and ours)."""
    dh, t = x.shape[-1], torch.arange(x.shape[-2], dtype=torch.float32)
    freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    ang = t[:, None] * freq[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def paper_logits(p: dict, idx: torch.Tensor) -> torch.Tensor:
    """Sections 2.2-2.5 of arXiv 2410.01131 with the scaling-vector trick; p = named parameters."""
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)   # noqa: E731
    eff = lambda name, init, scale: p[name] * (init / scale)   # noqa: E731
    dh, sd = D // H, 1 / math.sqrt(D)
    h = p["tok.weight"][idx]
    b = idx.shape[0]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(L):
        pre = f"layers.{i}."
        wq, wk, wv = p[pre + "attn.qkv.weight"].split(D)
        heads = lambda x: x.view(b, T, H, dh).transpose(1, 2)   # noqa: E731
        s_qk = eff(pre + "attn.s_qk.p", 1.0, sd).view(H, 1, dh)
        q = s_qk * norm(rope(heads(h @ wq.T)))
        k = s_qk * norm(rope(heads(h @ wk.T)))
        scores = (q @ k.transpose(-1, -2)) * math.sqrt(dh)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ heads(h @ wv.T)
        h_a = att.transpose(1, 2).reshape(b, T, D) @ p[pre + "attn.proj.weight"].T
        a_a = eff(pre + "r1.alpha.p", 0.05, sd).abs()
        h = norm(h + a_a * (norm(h_a) - h))
        s_u, s_nu = eff(pre + "mlp.s_uv.p", 1.0, 1.0).split(D_FF)
        w_u, w_nu = p[pre + "mlp.fc.weight"].split(D_FF)
        u, nu = s_u * (h @ w_u.T), s_nu * (h @ w_nu.T) * math.sqrt(D)
        h_m = (u * nu * torch.sigmoid(nu)) @ p[pre + "mlp.proj.weight"].T
        a_m = eff(pre + "r2.alpha.p", 0.05, sd).abs()
        h = norm(h + a_m * (norm(h_m) - h))
    return eff("head.s_z.p", 1.0, sd) * (h @ p["head.weight"].T)


def randomized_fp64():
    m = model(torch.float64, seed=3)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():   # scalars far from their init (some alphas negative), so each one shows
        for name, q in m.named_parameters():
            if q.ndim == 1:
                q.mul_(1 + 0.5 * torch.randn(q.shape, generator=g, dtype=torch.float64))
    return m


def test_logits_match_the_paper_equations_fp64():
    m = randomized_fp64()
    idx, _ = batch(1)
    got, _ = m(idx)
    want = paper_logits({n: q.detach() for n, q in m.named_parameters()}, idx)
    assert got.dtype == torch.float64
    assert (got - want).abs().max() < 1e-10


def test_three_adamw_steps_with_renormalisation_match_the_reference():
    m = randomized_fp64()
    ref = {n: q.detach().clone().requires_grad_() for n, q in m.named_parameters()}
    ours_opt = torch.optim.AdamW(m.param_groups(0.0), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rows = [n for n, ax in axes(m).items() if ax == 1]
    cols = [n for n, ax in axes(m).items() if ax == 0]
    for s in range(3):
        idx, tgt = batch(10 + s)
        _, loss = m(idx, tgt)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad()
        m.after_step()
        z = paper_logits(ref, idx)
        torch.nn.functional.cross_entropy(z.reshape(-1, V), tgt.reshape(-1)).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with torch.no_grad():   # normalize_matrices(): rows of [n, d], columns of [d, in]
            for n in rows:
                ref[n].div_(ref[n].norm(dim=1, keepdim=True))
            for n in cols:
                ref[n].div_(ref[n].norm(dim=0, keepdim=True))
    for n, q in m.named_parameters():
        torch.testing.assert_close(q.detach(), ref[n].detach(), atol=1e-9, rtol=1e-9, msg=n)


def test_the_trainer_renormalises_after_every_step(tmp_path):
    """End to end: `search.train`'s loop calls the blocks' after-step hook, so the checkpointed
    weights are on the sphere along the stated axes."""
    from safetensors.torch import load_file

    from search.setup import RunConfig
    from search.train import run_training
    sets = tuple(x for x in SETS if not x.startswith("vocab_size"))   # the real tokenizer's vocab
    r = run_training(RunConfig(graph=str(NGPT), size="tiny", sets=sets, max_tokens=3 * 8 * T,
                               evals=1, eval_bytes=2048, track=False, out=str(tmp_path),
                               progress=False))
    assert r.status == "completed" and r.step >= 2
    sd = load_file(str(next(tmp_path.glob("step_*")) / "model.safetensors"))
    for name, axis in axes(model()).items():   # the same names and axes at any vocabulary size
        norms = sd[name].double().norm(dim=axis)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name


@pytest.mark.gpu
@pytest.mark.parametrize("rope_fp32", [True, False])
def test_compiled_bf16_stays_on_the_sphere_and_close_to_fp32(rope_fp32):
    """Under torch.compile and bf16 autocast the chained L2 normalisations must not compound
    (pytorch#168126): the blocks normalise in fp32 and keep the residual stream in fp32. Rotating
    q and k in bf16 (`rope_fp32: false`) must stay as close: they are normalised in fp32 after."""
    from graphs.compile import compile_model
    dev = torch.device("cuda")
    sets = ["d_model=256", "n_layer=12", "n_head=4", "seq_len=256",
            f"nodes.layers.body.attn.rope_fp32={str(rope_fp32).lower()}"]
    eager = model(sets=sets).to(dev)
    comp = model(sets=sets).to(dev)
    comp.load_state_dict(eager.state_dict())
    compiled = compile_model(comp, "regional", dynamic=False)
    opt = torch.optim.AdamW(comp.param_groups(0.0), lr=3e-3, fused=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, V, (4, 257), generator=g).to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        comp.after_step()
    assert torch.isfinite(loss)
    assert_on_sphere(comp)
    eager.load_state_dict(comp.state_dict())
    idx = torch.randint(0, V, (4, 256), generator=g).to(dev)
    with torch.no_grad():
        want, _ = eager(idx)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, _ = compiled(idx)
    got = got.float()   # the head's matmul runs in bf16 under autocast, as GPT-2's does
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 2e-2, rel          # bf16 matmuls; compounding over 24 residual updates would be O(1)
    assert (got.abs() <= comp.head.s_z().abs() * 1.02).all()   # |cos| <= 1 up to bf16 rounding
