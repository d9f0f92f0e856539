"""Golden parity against Hugging Face (architectures.md §5): a tiny random `GPT2LMHeadModel` and
`LlamaForCausalLM` (tied and untied, MHA and grouped KV heads) mapped into gpt2.yaml / llama.yaml
through graphs.hf must give the same logits, loss and parameter gradients, in fp64 and fp32."""
from __future__ import annotations

import pytest
import torch

import graphs
from graphs.hf import gpt2_from_hf, llama_from_hf

from conftest import ROOT, logits_and_loss

transformers = pytest.importorskip("transformers")

V, D, L, H, SEQ, D_FF = 257, 64, 2, 4, 64, 172
B, T = 2, SEQ
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # fp64 absolute, fp32 relative to the max


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (gains != 1, biases != 0), so a swapped or dropped weight
    shows, and weights large enough that attention is far from uniform (RoPE, masks matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            mean = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            std = 0.1 if p.ndim == 1 else 0.15
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + mean)


def hf_gpt2(dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=SEQ, n_embd=D, n_layer=L, n_head=H,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg)
    randomize(model, seed=1)
    return model.to(dtype).eval()


def hf_llama(dtype: torch.dtype, n_kv: int, tied: bool, attn: str) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=D_FF, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=n_kv, max_position_embeddings=SEQ,
        rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=tied, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    randomize(model, seed=2)
    return model.to(dtype).eval()


def ours(path: str, sets: list[str], params: dict, dtype: torch.dtype) -> graphs.GraphModel:
    g = graphs.load(path, size="tiny", sets=[f"vocab_size={V}", *sets])
    return graphs.build(graphs.elaborate(g.resolve(params)), seed=0).to(dtype)


def ours_gpt2(dtype):
    return ours(ROOT / "graphs" / "gpt2.yaml", [], {}, dtype)


def ours_llama(dtype, n_kv, tied):
    return ours(ROOT / "graphs" / "llama.yaml", [f"d_ff={D_FF}"],
                {"vars.n_kv_head": n_kv, "nodes.head.tie": "tok" if tied else None}, dtype)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    assert all(g is not None for g in out.values()), [n for n, g in out.items() if g is None]
    return out


def diff(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """Max abs difference in fp64; in fp32, relative to the reference's largest magnitude."""
    d = (a.double() - b.double()).abs().max().item()
    return d if dtype == torch.float64 else d / b.double().abs().max().item()


def check_parity(hf, model, to_ours, dtype) -> dict[str, float]:
    """Load HF weights through `to_ours`, run both on the same tokens, compare everything."""
    mine = set(model.state_dict())
    # every state-dict entry is a parameter (no stray persistent buffers), tied ones included
    assert mine == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    model.load_state_dict(to_ours(hf.state_dict(), expected=mine), strict=True)
    model.eval()

    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    targets = torch.cat([idx[:, 1:], torch.full((B, 1), -1)], dim=1)  # HF shifts labels inside
    ref = hf(input_ids=idx)
    # HF's own loss always upcasts to fp32; take it at the logits' precision, as ours does
    ref_loss = torch.nn.functional.cross_entropy(ref.logits.reshape(-1, V), targets.reshape(-1),
                                                 ignore_index=-1)
    logits, loss = logits_and_loss(model, idx, targets)
    ref_loss.backward()
    loss.backward()

    out = {"logits": diff(logits, ref.logits, dtype), "loss": abs(loss.item() - ref_loss.item())}
    assert logits.dtype == ref.logits.dtype == dtype
    assert out["logits"] <= TOL[dtype], out
    assert out["loss"] <= (1e-12 if dtype == torch.float64 else 1e-6) * ref_loss.item(), out

    theirs, g_ours = to_ours(grads(hf), expected=mine), grads(model)
    for name, g in g_ours.items():
        out[f"grad/{name}"] = diff(g, theirs[name], dtype)
    worst = max((v, k) for k, v in out.items() if k.startswith("grad/"))
    assert worst[0] <= TOL[dtype], worst
    return out


DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_matches_hf(dtype):
    def to_ours(state, expected):
        return gpt2_from_hf(state, L, tied=True, expected=expected)

    check_parity(hf_gpt2(dtype), ours_gpt2(dtype), to_ours, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("n_kv", [H, 2], ids=["mha", "gqa"])
def test_llama_matches_hf(n_kv, tied, dtype):
    # HF's eager Llama attention takes the softmax in fp32 even for fp64 inputs, which caps
    # agreement near 2e-6; its SDPA path stays in fp64 (eager is checked in fp32 and below).
    attn = "sdpa" if dtype == torch.float64 else "eager"

    def to_ours(state, expected):
        return llama_from_hf(state, L, H, n_kv, tied, expected=expected)

    check_parity(hf_llama(dtype, n_kv, tied, attn), ours_llama(dtype, n_kv, tied), to_ours, dtype)


def test_llama_eager_fp64_within_fp32_softmax_error():
    """HF's eager path in fp64 agrees to fp32 precision (measured: ~2e-6 abs, ~4e-7 rel)."""
    hf, model = hf_llama(torch.float64, 2, False, "eager"), ours_llama(torch.float64, 2, False)
    model.load_state_dict(llama_from_hf(hf.state_dict(), L, H, 2, False))
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert diff(model(idx)[0], hf(input_ids=idx).logits, torch.float32) <= TOL[torch.float32]


def test_llama_parity_would_catch_interleaved_rope():
    """The check is sensitive: q/k rows in Meta's interleaved order (our RoPE is half-split)
    must break agreement by far more than the tolerance."""
    hf, model = hf_llama(torch.float64, 2, False, "sdpa"), ours_llama(torch.float64, 2, False)
    state = llama_from_hf(hf.state_dict(), L, H, 2, False)
    dh = D // H
    half = torch.arange(dh // 2)
    to_interleaved = torch.stack([half, half + dh // 2], 1).flatten()  # rows 0, 8, 1, 9, ...
    for i in range(L):
        w = state[f"layers.{i}.attn.qkv.weight"]
        heads = w[: (H + 2) * dh].view(H + 2, dh, D)  # q heads then k heads; v stays put
        state[f"layers.{i}.attn.qkv.weight"] = torch.cat(
            [heads[:, to_interleaved].reshape(-1, D), w[(H + 2) * dh:]])
    model.load_state_dict(state)
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert diff(model(idx)[0], hf(input_ids=idx).logits, torch.float64) > 1e-3


def test_gpt2_map_reads_either_layout():
    """The Conv1D ([in, out]) layout is read from shapes, not assumed: a checkpoint stored in
    nn.Linear layout maps to the same weights."""
    hf = hf_gpt2(torch.float32).state_dict()
    flipped = {k: v.t() if v.ndim == 2 and ".h." in k else v for k, v in hf.items()}
    a, b = gpt2_from_hf(hf, L), gpt2_from_hf(flipped, L)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_maps_are_strict():
    """Leftover, missing and unexpected keys raise; only GPT-2's old mask buffers are skipped."""
    hf = hf_gpt2(torch.float32).state_dict()
    masks = {"transformer.h.0.attn.bias": torch.ones(1, 1, SEQ, SEQ),
             "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}
    assert gpt2_from_hf({**hf, **masks}, L).keys() == gpt2_from_hf(hf, L).keys()
    with pytest.raises(ValueError, match="unused source keys.*h.2.ln_1"):
        gpt2_from_hf({**hf, "transformer.h.2.ln_1.weight": torch.ones(D)}, L)
    with pytest.raises(ValueError, match="missing"):
        gpt2_from_hf({k: v for k, v in hf.items() if "ln_f.bias" not in k}, L)
    with pytest.raises(ValueError, match="not written.*layers.2"):
        llama_from_hf(hf_llama(torch.float32, H, True, "eager").state_dict(), L, H, H, True,
                      expected=set(ours_llama(torch.float32, H, True).state_dict())
                      | {"layers.2.attn_norm.weight"})
