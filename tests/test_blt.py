"""Byte Latent Transformer: patchers on synthetic entropies, hash n-grams against a reference
hash, cross-attention against loop-by-loop math, and causality of the whole graph (fp64)."""
from __future__ import annotations

import math

import pytest
import torch

import graphs
from blocks.blt_cross import decoder_mask, encoder_mask
from blocks.blt_hash import PRIME, ngram_buckets
from blocks.blt_patch import (
    entropies,
    entropy_starts,
    fixed_starts,
    maps_from_starts,
    patch_lengths,
    space_starts,
)
from blocks.kinds import hidden, patch_map
from blocks.registry import Context
from graphs.errors import Locator
from graphs.values import make_config

# ---------------------------------------------------------------- patchers


def test_global_rule_starts_exactly_where_entropy_passes_threshold():
    g = torch.Generator().manual_seed(0)
    ent = torch.rand(3, 50, generator=g) * 3           # ent[t] = H of byte t + 1
    theta = 1.5
    starts = entropy_starts(ent, theta, "global")
    assert starts.shape == (3, 51)
    for r in range(3):
        want = [t for t in range(51) if t < 2 or ent[r, t - 1] > theta]
        assert torch.nonzero(starts[r]).flatten().tolist() == want
    for lens in patch_lengths(starts):
        assert sum(lens) == 50 and lens[0] == 1


def test_monotonic_and_combined_rules():
    ent = torch.tensor([[0.5, 0.2, 1.0, 1.1, 3.0, 0.1, 0.4, 0.3]])
    h = {t + 1: float(ent[0, t]) for t in range(8)}   # H_1 .. H_8
    mono = entropy_starts(ent, 0.0, "monotonic", threshold_r=0.25)
    assert torch.nonzero(mono[0]).flatten().tolist() == \
        [0, 1] + [t for t in range(2, 9) if h[t] - h[t - 1] > 0.25]
    comb = entropy_starts(ent, 0.8, "combined", threshold_r=0.05)
    assert torch.nonzero(comb[0]).flatten().tolist() == \
        [0, 1] + [t for t in range(2, 9) if h[t] > 0.8 and h[t] - h[t - 1] > 0.05]
    for s in (mono, comb):
        lens = patch_lengths(s)[0]
        assert sum(lens) == 8 and lens[0] == 1


def test_entropy_rule_is_prefix_only():
    """Whether byte t starts a patch depends only on entropies before t (incremental patching)."""
    ent = torch.rand(1, 30, generator=torch.Generator().manual_seed(1)) * 3
    ent2 = ent.clone()
    ent2[0, 20:] = 0.0
    for rule in ("global", "monotonic", "combined"):
        a, b = entropy_starts(ent, 1.2, rule, 0.1), entropy_starts(ent2, 1.2, rule, 0.1)
        assert torch.equal(a[:, :21], b[:, :21])


def test_maps_from_starts():
    starts = torch.tensor([[1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool)   # N = 6, byte 6 starts
    m, nxt = maps_from_starts(starts)
    assert m.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert nxt.tolist() == [[1, 1, 1, 2, 2, 3]]       # patch of byte t + 1
    assert maps_from_starts(starts, shift=False)[1].tolist() == m.tolist()


def test_fixed_stride():
    m, nxt = maps_from_starts(fixed_starts(2, 10, 3))
    assert m[0].tolist() == [t // 3 for t in range(10)]
    assert nxt[1].tolist() == [(t + 1) // 3 for t in range(10)]


def test_space_patching_on_text():
    text = b"ab, cd  e1\xc3\xa9f!"
    ids = torch.tensor([list(text)])
    lens = patch_lengths(space_starts(ids))[0]
    pieces, i = [], 0
    for n in lens:
        pieces.append(text[i:i + n])
        i += n
    # bytes 0 and 1 start; then a patch starts at each word byte after non-word bytes
    assert pieces == [b"a", b"b, ", b"cd  ", b"e1\xc3\xa9f!"]
    assert sum(lens) == len(text)


# ---------------------------------------------------------------- hash n-grams


def reference_hash(seq: list[int], i: int, n: int, buckets: int) -> int:
    """Σ_k b_{i-n+1+k} a^k over the n bytes ending at i (zeros before the start), wrapped to
    int64 (the reference code's order: the oldest byte gets a^0)."""
    window = [seq[i - n + 1 + k] if i - n + 1 + k >= 0 else 0 for k in range(n)]
    v = sum(b * PRIME ** k for k, b in enumerate(window)) % (1 << 64)
    if v >= 1 << 63:
        v -= 1 << 64
    return v % buckets


def test_hash_matches_reference_function():
    seq = [104, 101, 108, 108, 111, 32, 255, 0, 200, 17, 256, 3]
    ids = torch.tensor([seq])
    for n in range(3, 9):
        got = ngram_buckets(ids, n, 500002)[0].tolist()
        assert got == [reference_hash(seq, i, n, 500002) for i in range(len(seq))]


def test_hash_matches_hugging_face_blt():
    hf = pytest.importorskip("transformers.models.blt.modeling_blt")
    ids = torch.randint(0, 260, (2, 50), generator=torch.Generator().manual_seed(0))
    for n in range(3, 9):
        want = hf.byte_group_hash_function(ids, n, PRIME, 500002)
        assert torch.equal(ngram_buckets(ids, n, 500002), want)


def test_identical_ngrams_hash_identically_at_any_position():
    text = list(b"the cat and the cat and the dog")
    ids = torch.tensor([text])
    for n in range(3, 9):
        h = ngram_buckets(ids, n, 4099)[0]
        for i in range(n - 1, len(text)):
            for j in range(n - 1, len(text)):
                if text[i - n + 1:i + 1] == text[j - n + 1:j + 1]:
                    assert h[i] == h[j]
        assert len(set(h.tolist())) > 1


# ---------------------------------------------------------------- cross-attention


def make_cross(qk, kvk, heads=2, slots=2):
    from blocks.blt_cross import PatchCross as C
    cfg = make_config(C.Config, {"heads": heads, "slots": slots}, {}, Locator("<t>"), ())
    mod = C(cfg, [qk, kvk, patch_map()], Context(node="c")).double()
    mod.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        mod.q_norm.uniform_(0.5, 1.5)
        mod.kv_norm.uniform_(0.5, 1.5)
    return mod


def rms(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def reference_cross(mod, q, kv, allowed):
    """Loop-by-loop: each query row attends over the key rows allowed[i] (zero if none)."""
    h, out = mod.cfg.heads, torch.zeros_like(q)
    qn, kvn = rms(q, mod.q_norm), rms(kv, mod.kv_norm)
    Q, K, V = qn @ mod.wq.weight.T, kvn @ mod.wk.weight.T, kvn @ mod.wv.weight.T
    dh = Q.shape[-1] // h
    for i in range(q.shape[0]):
        keys = allowed(i)
        if not keys:
            continue
        heads = []
        for hh in range(h):
            sl = slice(hh * dh, (hh + 1) * dh)
            s = torch.stack([Q[i, sl] @ K[j, sl] for j in keys]) / math.sqrt(dh)
            p = torch.softmax(s, 0)
            heads.append(sum(p[a] * V[j, sl] for a, j in enumerate(keys)))
        out[i] = torch.cat(heads) @ mod.wo.weight.T
    return out


def test_encoder_cross_attention_reads_only_its_own_bytes():
    mod = make_cross(hidden(16, "patch"), hidden(6, "byte"))
    pmap = torch.tensor([[0, 1, 1, 1, 2, 2, 4]])          # patch 3 empty
    q, kv = torch.randn(1, 5, 16, dtype=torch.float64), torch.randn(1, 7, 6, dtype=torch.float64)
    y = mod(q, kv, pmap)
    qs = q.reshape(10, 8)                                  # 2 slots per patch
    want = reference_cross(mod, qs, kv[0], lambda i: [t for t in range(7) if pmap[0, t] == i // 2])
    torch.testing.assert_close(y.reshape(10, 8), want)
    assert (y[0, 3] == 0).all()


def test_decoder_cross_attention_reads_previous_patch():
    mod = make_cross(hidden(8, "byte"), hidden(12, "patch"))
    nxt = torch.tensor([[1, 1, 2, 2, 2, 3, 0]])
    q, kv = torch.randn(1, 7, 8, dtype=torch.float64), torch.randn(1, 3, 12, dtype=torch.float64)
    y = mod(q, kv, nxt)
    kvs = kv.reshape(6, 6)
    allowed = lambda t: [j for j in range(6) if j // 2 == min(int(nxt[0, t]), 3) - 1]
    torch.testing.assert_close(y[0], reference_cross(mod, q[0], kvs, allowed))


def test_masks_shapes():
    pmap = torch.tensor([[0, 0, 1, 2]])
    assert encoder_mask(pmap, 3, 2).shape == (1, 6, 4)
    assert decoder_mask(pmap, 3, 2).shape == (1, 4, 6)
    assert not decoder_mask(pmap, 3, 2)[0, 0].any()


# ---------------------------------------------------------------- the whole graph


def blt_model(patcher_sets=(), extra=()):
    # max_patches < the patches of the text: the overflow path is exercised too
    sets = ("n_global=1", "d_local=16", "seq_len=32", "max_patches=6", "buckets=97") + extra
    plan = graphs.elaborate(graphs.load("graphs/blt.yaml", "tiny", sets + patcher_sets).resolve())
    return graphs.build(plan, seed=0).double().eval()


def entropy_lm():
    plan = graphs.elaborate(graphs.load("graphs/blt_entropy.yaml", "tiny", ("seq_len=32",)))
    return graphs.build(plan, seed=3).double().eval()


PATCHERS = {
    "space": (),
    "fixed": ("nodes.pmap={type: patch_fixed, in: bytes, stride: 3}",),
    "entropy": ("nodes.pmap={type: patch_entropy, in: bytes, threshold: THETA}",),
}


@pytest.mark.parametrize("name", sorted(PATCHERS))
def test_causality_perturbing_a_byte_never_changes_earlier_logits(name):
    text = torch.tensor([list(b"The cat, the dog. Entropy patches: xyz 123 abc!")[:32]])
    sets = PATCHERS[name]
    if name == "entropy":   # threshold at the median entropy of this (random) byte LM
        lm = entropy_lm()
        with torch.no_grad():
            theta = float(entropies(lm(text)[0]).median())
        sets = (sets[0].replace("THETA", f"{theta:.6f}"),)
    model = blt_model(sets)
    if name == "entropy":
        model.pmap._lm = [lm]
    with torch.no_grad():
        base, _ = model(text)
        n_patches = 32 / float(model.pmap.mean_patch_len)
        assert 6 < n_patches < 32                           # patches vary, some overflow
        for t in (1, 5, 9, 14, 31):
            x = text.clone()   # flip word <-> non-word byte: changes the space patches too
            x[0, t] = 32 if chr(int(x[0, t])).isalnum() else 97
            y, _ = model(x)
            torch.testing.assert_close(y[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.equal(y[:, t:], base[:, t:])


def test_blt_trains_one_step():
    model = blt_model().float().train()
    x = torch.randint(0, 256, (2, 33))
    _, loss = model(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(260)) < 0.5
    loss.backward()
    assert model.hash.weight.grad.abs().sum() > 0 and model.ecross.wq.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- entropy model and threshold


def test_tune_threshold_hits_target_patch_length():
    from search.entropy import mean_patch_len, tune
    ent = torch.rand(4, 256, generator=torch.Generator().manual_seed(2)) * 4
    for target in (2.0, 4.5):
        th = tune(ent, target)
        assert mean_patch_len(ent, th) == pytest.approx(target, rel=0.05)
    th_r = tune(ent, 3.0, "monotonic")
    assert mean_patch_len(ent, 0.0, "monotonic", th_r) == pytest.approx(3.0, rel=0.05)


def test_entropy_model_folder_round_trip_and_scores(tmp_path):
    """The folder `search.entropy train` writes loads back frozen; cached scores equal a direct
    forward, and the patch_entropy block patches with them."""
    import numpy as np
    import yaml
    from safetensors.torch import save_model

    from blocks.blt_patch import load_entropy_model
    from search.entropy import score
    g = graphs.load("graphs/blt_entropy.yaml", "tiny", ("seq_len=16",)).resolve()
    (tmp_path / "graph.yaml").write_text(yaml.safe_dump(g.data, sort_keys=False))
    lm = graphs.build(graphs.elaborate(g), seed=4).eval()
    save_model(lm, str(tmp_path / "model.safetensors"))
    back = load_entropy_model(str(tmp_path), "cpu")
    assert not any(p.requires_grad for p in back.parameters())
    ids = np.frombuffer(b"hello world, hello entropy " * 5, dtype=np.uint8)
    got = score(back, ids, window=16)
    with torch.no_grad():
        want = entropies(lm(torch.from_numpy(ids[16:32].astype(np.int64))[None])[0])[0]
    np.testing.assert_allclose(got[16:32], want.numpy(), rtol=1e-5, atol=1e-5)
    pmap = f"nodes.pmap={{type: patch_entropy, in: bytes, threshold: 5.3, model: '{tmp_path}'}}"
    model = blt_model((pmap,))
    x = torch.from_numpy(ids[:32].astype(np.int64))[None]
    model(x)   # seq_len 32 > the entropy model's 16: scored in two fresh windows, as cached
    assert model.pmap._lm is not None and float(model.pmap.mean_patch_len) >= 1
    np.testing.assert_allclose(model.pmap.entropies(x)[0].numpy(), got[:32], rtol=1e-5, atol=1e-5)


def _entropy_folder(folder, window: int = 16):
    import yaml
    from safetensors.torch import save_model
    g = graphs.load("graphs/blt_entropy.yaml", "tiny", (f"seq_len={window}",)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graph.yaml").write_text(yaml.safe_dump(g.data, sort_keys=False))
    save_model(graphs.build(graphs.elaborate(g), seed=4).eval(), str(folder / "model.safetensors"))
    return folder


def test_training_reads_cached_entropies_and_runs_no_entropy_model_per_step(tmp_path, monkeypatch):
    """`search.entropy cache --split train` scores each shard once; a training run whose
    patch_entropy names that folder feeds each batch its cached entropies through the loader, and
    its training steps run no entropy model (validation still scores with it). With the window a
    multiple of the model's context, the cache holds what the model computes on the batch."""
    import argparse

    import numpy as np

    from blocks.blt_patch import PatchEntropy, load_entropy_model
    from search import data
    from search.entropy import cache, cached_shards, score
    from search.setup import RunConfig, Setup
    from search.train import run_training
    ds = data.prepare(argparse.__file__, tmp_path / "bytes", "bytes", shard_tokens=40_000,
                      val_share=0.05, progress=False)
    assert len(ds.train) >= 2                       # shards are scored from their own start
    folder = _entropy_folder(tmp_path / "ent")
    assert cached_shards(folder, ds) is None
    cache(str(folder), str(tmp_path / "bytes"), "train")
    shards = cached_shards(folder, ds)
    lm = load_entropy_model(str(folder), "cpu")
    np.testing.assert_allclose(shards[1][:4000].astype(np.float32),
                               score(lm, np.asarray(ds.train[1][:4000]), 16), rtol=2e-3, atol=2e-3)

    pmap = f"nodes.pmap={{type: patch_entropy, in: bytes, threshold: 5.3, model: '{folder}'}}"
    sets = ("n_global=1", "d_local=16", "seq_len=32", "max_patches=16", "buckets=97", pmap)
    cfg = RunConfig(graph="graphs/blt.yaml", size="tiny", sets=sets, data=str(tmp_path / "bytes"),
                    max_tokens=4 * 512, evals=1, eval_bytes=1024, track=False,
                    out=str(tmp_path / "run"), progress=False, checkpoint=False)
    s = Setup(cfg)
    assert s.entropy_source.startswith("cache ") and s.loader.side is not None
    x, _ = s.loader.next()
    fed = s.patchers[0].fed
    s.feed_entropies(None)
    with torch.no_grad():
        torch.testing.assert_close(fed, s.patchers[0].entropies(x), rtol=2e-3, atol=2e-3)
    s.tracker.end("FINISHED")

    calls = {"train": 0, "eval": 0}
    scoring = PatchEntropy.entropy_model

    def counted(self, device):
        if device.type != "meta":   # the cost model's pass runs no model
            calls["train" if torch.is_grad_enabled() else "eval"] += 1
        return scoring(self, device)
    monkeypatch.setattr(PatchEntropy, "entropy_model", counted)
    r = run_training(cfg)
    assert r.status == "completed" and r.step >= 2, r.message
    assert calls["train"] == 0 and calls["eval"] >= 1


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_cross_attention_matches_hugging_face_blt(side):
    """Same weights, same mask: HF's BltCrossAttention returns x + attn (its residual inside);
    ours returns attn and leaves the residual to an `add` node. Slots are reshaped alike."""
    hf = pytest.importorskip("transformers.models.blt.modeling_blt")
    from transformers.models.blt.configuration_blt import BltLocalDecoderConfig
    cfg = BltLocalDecoderConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    theirs = hf.BltCrossAttention(cfg, layer_idx=0).eval()
    pmap = torch.tensor([[0, 1, 1, 2, 2, 2, 3, 3]])
    if side == "encoder":   # 4 patches x 2 slots of width 8 attend to 8 bytes of width 8
        ours = make_cross(hidden(16, "patch"), hidden(8, "byte")).float()
        q, kv = torch.randn(1, 4, 16), torch.randn(1, 8, 8)
        q_flat, kv_flat, mask = q.reshape(1, 8, 8), kv, encoder_mask(pmap, 4, 2)
    else:                   # 8 bytes attend to 3 patches x 2 slots
        ours = make_cross(hidden(8, "byte"), hidden(16, "patch")).float()
        q, kv = torch.randn(1, 8, 8), torch.randn(1, 3, 16)
        q_flat, kv_flat, mask = q, kv.reshape(1, 6, 8), decoder_mask(pmap, 3, 2)
    with torch.no_grad():
        for a, b in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
            getattr(theirs, a).weight.copy_(getattr(ours, b).weight)
        theirs.q_norm.weight.copy_(ours.q_norm)
        theirs.k_norm.weight.copy_(ours.kv_norm)
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, None]
        rows = mask.any(-1)[0]
        want = theirs(q_flat, kv_flat, attention_mask=additive)[0] - q_flat
        got = ours(q, kv, pmap).reshape(q_flat.shape)
    torch.testing.assert_close(got[0, rows], want[0, rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stack", ["encoder", "latent", "decoder"])
def test_transformer_layers_match_hugging_face_blt(stack):
    """Our encoder, global and decoder self-attention layers (RMSNorm, RoPE attention with
    theta 500000, SwiGLU, standard residuals) against HF's BltTransformerLayer with mapped weights
    (fp64 in, eager, causal). BLT's RoPE rotates interleaved pairs (2i, 2i+1), ours Llama's halves
    (i, i + d/2): the same rotation after permuting each head's q and k rows, which the map does.
    The decoder layer's self-attention part is compared (its cross-attention is tested above)."""
    hf = pytest.importorskip("transformers.models.blt.modeling_blt")
    from transformers.models.blt.configuration_blt import BltGlobalTransformerConfig
    model = blt_model(extra=("n_decoder=1",))
    layer = getattr(model, stack)[0]
    attn = layer.attn
    d, h = attn.qkv.in_features, attn.h
    dh = d // h
    cfg = BltGlobalTransformerConfig(hidden_size=d, num_attention_heads=h, num_key_value_heads=h,
                                     intermediate_size=layer.mlp.proj.in_features,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                     rms_norm_eps=layer.n1.cfg.eps, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    theirs = hf.BltTransformerLayer(cfg, layer_idx=0).double().eval()
    rope = hf.BltRotaryEmbedding(cfg).double()
    # HF row 2i+e of a head (pair i, element e) is our row i + e * dh/2
    perm = torch.tensor([i + e * dh // 2 for i in range(dh // 2) for e in (0, 1)])
    heads = lambda w: w.view(h, dh, d)[:, perm].reshape(d, d)     # noqa: E731
    q, k, v = attn.qkv.weight.detach().split(d)
    gate, up = layer.mlp.fc.weight.detach().chunk(2)
    with torch.no_grad():
        for name, w in (("self_attn.q_proj", heads(q)), ("self_attn.k_proj", heads(k)),
                        ("self_attn.v_proj", v), ("self_attn.o_proj", attn.proj.weight),
                        ("mlp.gate_proj", gate), ("mlp.up_proj", up), ("mlp.down_proj", layer.mlp.proj.weight),
                        ("input_layernorm", layer.n1.weight), ("post_attention_layernorm", layer.n2.weight)):
            theirs.get_submodule(name).weight.copy_(w + 0.1 * torch.randn_like(w) * ("norm" in name))
        layer.n1.weight.copy_(theirs.input_layernorm.weight)
        layer.n2.weight.copy_(theirs.post_attention_layernorm.weight)
        T = 24
        x = torch.randn(2, T, d, dtype=torch.float64)
        cos, sin = rope(x, torch.arange(T)[None].expand(2, -1))
        causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        want = theirs(x, attention_mask=causal, position_embeddings=(cos, sin))
        want = want[0] if isinstance(want, tuple) else want
        if stack == "decoder":   # self-attention and MLP only: drop the cross-attention residual
            got = x + attn(layer.n1(x))
            got = got + layer.mlp(layer.n2(got))
        else:
            got = layer(x)[0]
    # HF's RMSNorm and RoPE tables work in fp32 whatever the input dtype: fp32-level agreement
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


def test_patch_stats_report_mean_patch_length_and_reset():
    from blocks.blt_patch import patch_stats
    model = blt_model(PATCHERS["fixed"])          # stride 3 over 32 bytes: 11 patches per row
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 32)))
    assert patch_stats(model) == {"val/patch_len": pytest.approx(64 / 22)}
    assert patch_stats(model) == {}
