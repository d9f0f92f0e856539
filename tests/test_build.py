"""Graphs build into plain modules that read like their YAML, and every shipped graph builds."""
from __future__ import annotations

import time

import pytest
import torch

import graphs
from graphs.check import check_file
from graphs.compile import compile_model

from conftest import GRAPHS, ROOT, SKETCHES

BASE = """
name: t
vars: {vocab_size: 64, seq_len: 16, d_model: 32, n_layer: 3, n_head: 4}
sizes: {tiny: {}}
nodes:
  tok: {type: embedding, in: tokens, vocab: vocab_size, dim: d_model}
  h:
    repeat: n_layer
    in: tok
    body:
      n1: {type: rmsnorm, in: stream}
      attn: {type: attention, in: n1, heads: n_head}
      r1: {type: add, in: [stream, attn]}
  nf: {type: rmsnorm, in: h}
  head: {type: lm_head, in: nf, vocab: vocab_size, tie: tok}
  loss: {type: cross_entropy, in: [head, targets]}
outputs: {logits: head, loss: loss}
"""


def build(text=BASE, params=None, seed=0):
    return graphs.build(graphs.elaborate(graphs.loads(text).resolve(params)), seed=seed)


def test_state_dict_keys_follow_node_ids():
    keys = set(build().state_dict())
    assert {"tok.weight", "h.0.n1.weight", "h.2.attn.qkv.weight", "h.1.attn.proj.weight",
            "nf.weight", "head.weight"} <= keys
    assert not any("_program" in k for k in keys)


def test_forward_without_targets_skips_loss_and_tie_shares_storage():
    m = build()
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = m(idx)
    assert logits.shape == (2, 16, 64) and loss is None
    assert m.head.weight is m.tok.weight
    _, loss = m(idx, idx)
    assert loss.dim() == 0


def test_training_with_a_fused_loss_never_runs_the_head():
    """With targets, a head that only the logits read is skipped (a fused linear cross-entropy
    computes the loss from the hidden states); without targets it runs and the loss does not."""
    text = BASE.replace("loss: {type: cross_entropy, in: [head, targets]}",
                        "loss: {type: linear_cross_entropy, in: [nf, targets], vocab: vocab_size, tie: tok}")
    m, ref = build(text), build()
    ran = []
    m.head.register_forward_hook(lambda *a: ran.append("head"))
    m.loss.register_forward_hook(lambda *a: ran.append("loss"))
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = m(idx, idx)
    assert logits is None and ran == ["loss"]
    torch.testing.assert_close(loss, ref(idx, idx)[1])     # same weights (seed), same loss
    ran.clear()
    logits, loss = m(idx)
    assert ran == ["head"] and loss is None
    torch.testing.assert_close(logits, ref(idx)[0])
    ran.clear()
    _, loss = build()(idx, idx)   # a head the loss reads always runs
    assert loss.dim() == 0


def test_same_seed_same_weights_and_different_seed_differs():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.tok.weight, c.tok.weight)


def test_param_groups_exclude_norms_biases_and_tables_from_decay():
    m = build()
    decay, rest = m.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}
    assert id(m.h[0].attn.qkv.weight) in ids(decay)
    assert id(m.h[0].n1.weight) in ids(rest) and id(m.tok.weight) in ids(rest)
    assert len(ids(decay) | ids(rest)) == len(list(m.parameters()))


def test_after_step_hooks_run_for_blocks_that_declare_them(monkeypatch):
    import blocks.norms as norms
    calls = []
    monkeypatch.setattr(norms.RMSNorm, "has_after_step", True)
    monkeypatch.setattr(norms.RMSNorm, "after_step", lambda self: calls.append(self.ctx.node))
    build().after_step()
    assert calls == ["n1", "n1", "n1", "nf"]


CROSS = """
name: x
vars: {vocab_size: 16, seq_len: 4, d: 8}
sizes: {tiny: {}}
nodes:
  tok: {type: embedding, in: tokens, vocab: vocab_size, dim: d}
  h:
    repeat: 3
    in: tok
    body:
      lin: {type: linear, in: stream, dim: d}
      out: {type: add, in: [lin, 'lin@0', tok]}
  head: {type: lm_head, in: h, vocab: vocab_size}
  loss: {type: cross_entropy, in: [head, targets]}
outputs: {logits: head, loss: loss}
"""


def test_edges_across_layers_and_from_outer_nodes():
    """`lin@0` hands layer 0's output to every later layer (layer 0 reads its own); `tok`, a
    top-level node, reaches every layer."""
    m = build(CROSS)
    idx = torch.randint(0, 16, (2, 4))
    x = tok = m.tok.weight[idx]
    first = None
    for layer in m.h:
        y = layer.lin(x)
        first = y if first is None else first
        x = y + first + tok
    torch.testing.assert_close(m(idx)[0], m.head(x))


def test_reading_a_later_layer_is_an_error():
    with pytest.raises(graphs.GraphError, match="is layer 2 in layer 0"):
        build(CROSS.replace("'lin@0'", "'lin@2'"))


def test_whole_node_choice_and_conditional_dims():
    text = BASE.replace("      r1: {type: add, in: [stream, attn]}",
                        "      r1: {type: add, in: [stream, attn]}\n"
                        "      n2: {type: rmsnorm, in: r1}\n"
                        "      mlp: {choice: [{type: mlp, in: n2, hidden: 4 * d_model},\n"
                        "                     {type: swiglu, in: n2, hidden: {int: [16, 64], step: 16, default: 32}}]}\n"
                        "      r2: {type: add, in: [r1, mlp]}")
    g = graphs.loads(text)
    dims = {d.name: d for d in g.space()}
    assert dims["nodes.h.body.mlp"].choices == ("mlp", "swiglu")
    inner = dims["nodes.h.body.mlp[swiglu].hidden"]
    assert inner.parent == ("nodes.h.body.mlp", "swiglu")
    a = graphs.elaborate(g.resolve())
    b = graphs.elaborate(g.resolve({"nodes.h.body.mlp": "swiglu", "nodes.h.body.mlp[swiglu].hidden": 48}))
    assert a.hash != b.hash
    m = graphs.build(b)
    assert m.h[0].mlp.fc.weight.shape == (96, 32)
    # the same concrete graph reached two ways has one hash
    c = graphs.elaborate(g.resolve({"nodes.h.body.mlp": "mlp", "nodes.h.body.mlp[swiglu].hidden": 48}))
    assert c.hash == a.hash


def test_resolve_rejects_unknown_and_out_of_range_values():
    g = graphs.load(GRAPHS[0], size="tiny")
    name = g.space()[-1].name
    with pytest.raises(graphs.GraphError, match="unknown search parameter"):
        g.resolve({"no.such.dim": 1})
    with pytest.raises(graphs.GraphError, match="outside the space"):
        g.resolve({name: 1e9})


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_model_matches_eager(mode):
    torch._dynamo.reset()
    eager = build()
    model = build()
    compiled = compile_model(model, mode, backend="aot_eager")
    idx = torch.randint(0, 64, (2, 16))
    l1, loss1 = eager(idx, idx)
    l2, loss2 = compiled(idx, idx)
    torch.testing.assert_close(l1, l2)
    loss2.backward()
    assert model.tok.weight.grad is not None


def test_regional_compile_of_ten_unlike_layers_never_falls_back_to_eager(monkeypatch):
    """Layers whose bodies differ (a window per layer) each take a Dynamo entry of the code all
    layers share; past Dynamo's default limit of 8 the rest would silently run eagerly."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    g = graphs.load(ROOT / "graphs" / "llama.yaml", size="tiny",
                    sets=["n_layer=10", "nodes.layers.body.attn.window=seq_len // 2 + layer"])
    model = graphs.build(graphs.elaborate(g.resolve()), seed=0)
    compiled = compile_model(model, "regional", backend="aot_eager")
    idx = torch.randint(0, 64, (2, 16))
    compiled(idx, idx)[1].backward()        # training: ten layers traced apart
    with torch.no_grad():
        compiled(idx, idx)                  # evaluation: ten more, and the regions again
        compiled(idx)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", GRAPHS + SKETCHES, ids=lambda p: p.stem)
def test_every_graph_checks_and_builds_at_every_size(path):
    reports = check_file(str(path), "all")
    assert {r.graph.size for r in reports} >= {"tiny"}
    for r in reports:
        assert r.cost.params > 0 and r.cost.flops_per_token > 0


@pytest.mark.parametrize("path", GRAPHS + SKETCHES, ids=lambda p: p.stem)
def test_tiny_training_step_is_well_under_a_second(path):
    g = graphs.load(path, size="tiny")
    plan = graphs.elaborate(g.resolve())
    m = graphs.build(plan)
    opt = torch.optim.AdamW(m.param_groups(0.1), lr=1e-3)
    V, T = plan.vars["vocab_size"], plan.seq_len
    times = []
    for _ in range(3):
        idx = torch.randint(0, min(V, 50257), (4, T))
        t0 = time.perf_counter()
        _, loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        assert torch.isfinite(loss)
    assert min(times) < 1.0, times


def test_gpt2_is_124m_parameters():
    (r,) = check_file(str(GRAPHS[[p.stem for p in GRAPHS].index("gpt2")]))
    assert 124.0e6 < r.cost.params < 124.6e6
    # FLOPs per token follow PaLM's 6N + 12*L*d*T with N the matmul weights (tied table once)
    L, d, T = 12, 768, 1024
    n_matmul = L * (4 * d * d + 8 * d * d) + 50304 * d
    assert r.cost.flops_per_token == pytest.approx(6 * n_matmul + 12 * L * d * T, rel=1e-6)


def test_layers_differ_only_where_the_body_uses_the_layer_index():
    uniform = graphs.elaborate(graphs.loads(BASE).resolve())
    (group,) = [it for it in uniform.items if hasattr(it, "layers")]
    assert [s.ctx.layer for layer in group.layers for s in layer][::3] == [0, 1, 2]
    assert len({s.cfg for layer in group.layers for s in layer if s.id == "attn"}) == 1
    varying = graphs.elaborate(graphs.loads(BASE.replace(
        "attn: {type: attention, in: n1, heads: n_head}",
        "attn: {type: attention, in: n1, heads: n_head, proj_std: '0.01 * (layer + 1)'}")).resolve())
    (group,) = [it for it in varying.items if hasattr(it, "layers")]
    stds = [s.cfg.proj_std for layer in group.layers for s in layer if s.id == "attn"]
    assert stds == pytest.approx([0.01, 0.02, 0.03])
    assert uniform.hash != varying.hash
