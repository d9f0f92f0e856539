"""Export formats hf and pt2 (graphs/export/hf.py, pt2.py): a tiny GPT-2 or Llama graph exported
as `hf` loads in stock transformers (`from_pretrained`, no custom code) with our logits; variants
stock HF cannot express are refused with the reason and written for trust_remote_code instead
(hf_custom.py); every graph exported as `pt2` reproduces its logits after `torch.export.load`
at several batch sizes and sequence lengths."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import graphs
from graphs.export import hf, pt2
from graphs.hf import gpt2_from_hf

transformers = pytest.importorskip("transformers")

V, D_FF = 257, 172
TOL = 1e-5  # fp32, relative to the largest logit


def ours(name: str, sets=(), params=None, text: str | None = None) -> graphs.GraphModel:
    """A tiny graph with random non-trivial weights (gains != 1, biases != 0), in eval mode."""
    sets = [f"vocab_size={V}", *sets]
    g = (graphs.loads(text, size="tiny", sets=sets) if text else
         graphs.load(ROOT / "graphs" / f"{name}.yaml", size="tiny", sets=sets))
    model = graphs.build(graphs.elaborate(g.resolve(params or {})), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def tokens(b: int, t: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def load_hf(model: graphs.GraphModel, out, cls):
    """Export `model` as hf into `out` and load it back with the stock class."""
    hf.write(model.plan, model.state_dict(), out, {"tokenizer": "bytes"})
    loaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


LLAMA = [f"d_ff={D_FF}"]  # not a multiple of 64: intermediate_size must come from the graph
CASES = {
    "gpt2-tied": ("gpt2", [], {}, True),
    "gpt2-untied-relu2": ("gpt2", ["nodes.head.tie=null"], {"nodes.h.body.mlp.act": "relu2"}, False),
    "llama-tied-mha": ("llama", LLAMA, {"vars.n_kv_head": 4, "nodes.head.tie": "tok"}, True),
    "llama-untied-mha": ("llama", LLAMA, {"vars.n_kv_head": 4, "nodes.head.tie": None}, False),
    "llama-tied-gqa": ("llama", LLAMA, {"vars.n_kv_head": 2, "nodes.head.tie": "tok"}, True),
    "llama-untied-gqa": ("llama", LLAMA, {"vars.n_kv_head": 2, "nodes.head.tie": None}, False),
}


@pytest.mark.parametrize("case", CASES)
def test_hf_export_loads_in_stock_transformers(case, tmp_path):
    name, sets, params, tied = CASES[case]
    model = ours(name, sets, params)
    cls = transformers.GPT2LMHeadModel if name == "gpt2" else transformers.LlamaForCausalLM
    loaded = load_hf(model, tmp_path, cls)
    # a tied export must load tied (fine-tuning keeps one table), an untied one must not
    emb, head = loaded.get_input_embeddings().weight, loaded.get_output_embeddings().weight
    assert (emb.data_ptr() == head.data_ptr()) == tied
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] == tied and config["vocab_size"] == V
    if name == "llama":
        assert config["num_key_value_heads"] == params["vars.n_kv_head"]
        assert config["intermediate_size"] == D_FF
    idx = tokens(2, model.plan.seq_len)
    with torch.no_grad():
        assert rel(loaded(input_ids=idx).logits, model(idx)[0]) <= TOL


def renamed_llama() -> str:
    """llama.yaml with other node ids, residual adds written the other way round and a
    dropout (the identity at inference) before the first residual add."""
    text = (ROOT / "graphs" / "llama.yaml").read_text()
    for old, new in (("attn_norm", "pre_attn"), ("mlp_norm", "pre_mlp"), ("layers", "stack"),
                     (r"norm", "final"), ("tok", "embed"), ("r1", "mid"), ("r2", "end")):
        text = re.sub(rf"\b{old}\b", new, text)
    text = text.replace("mid:       {type: add, in: [stream, attn]}",
                        "dr: {type: dropout, in: attn, p: 0.1}\n"
                        "      mid: {type: add, in: [dr, stream]}")
    assert "dr: {type: dropout" in text and "pre_attn" in text and "final:" in text
    return text


def test_hf_export_recognises_the_structure_not_the_names(tmp_path):
    model = ours("llama", params={"vars.n_kv_head": 2, "nodes.head.tie": None},
                 text=renamed_llama())
    assert "stack.0.pre_attn.weight" in model.state_dict()
    loaded = load_hf(model, tmp_path, transformers.LlamaForCausalLM)
    idx = tokens(2, 16)
    with torch.no_grad():
        assert rel(loaded(input_ids=idx).logits, model(idx)[0]) <= TOL


REFUSED = {
    "llama-with-biases": ("llama", ["nodes.layers.body.attn.bias=true"], "attention bias=True"),
    "gpt2-with-rope": ("gpt2", ["nodes.h.body.attn.rope=true"], "attention rope=True"),
    "gpt2-with-gqa": ("gpt2", ["nodes.h.body.attn.kv_heads=2"], "kv_heads=2"),
    "ngpt": ("ngpt", [], "no stock Hugging Face class.*ngpt_head where 'head' is lm_head"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_stock_hf_refuses_what_it_cannot_express(case):
    name, sets, reason = REFUSED[case]
    model = ours(name, sets)
    with pytest.raises(hf.Unsupported, match=reason):
        hf.hf_model(model.plan, model.state_dict())


@pytest.mark.parametrize("case", ["ngpt", "gpt2-with-rope"])
def test_hf_export_falls_back_to_remote_code(case, tmp_path, capsys):
    """What stock transformers refuses is written as the standalone model.py plus a modeling
    file for trust_remote_code=True, with the same logits (and a tied table still tied)."""
    name, sets, reason = REFUSED[case]
    model = ours(name, sets)
    hf.write(model.plan, model.state_dict(), tmp_path, {})
    assert re.search(reason, capsys.readouterr().err)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_playground.PlaygroundForCausalLM"
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tied = model.plan.name == "gpt2"
    assert (loaded.head.weight.data_ptr() == loaded.tok.weight.data_ptr()) == tied
    idx = tokens(2, model.plan.seq_len)
    with torch.no_grad():
        assert rel(loaded(input_ids=idx).logits, model(idx)[0]) <= TOL


def test_inverse_map_is_checked():
    """The derived inverse undoes graphs.hf's map exactly, and refuses a 'tied' table whose two
    copies differ (both would land in the same HF tensor)."""
    model = ours("gpt2")
    state = model.state_dict()
    config, hf_state = hf.hf_model(model.plan, state)
    assert config.n_layer == 2 and config.activation_function == "gelu_new"
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D layout
    back = gpt2_from_hf(hf_state, 2, tied=True)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    state["head.weight"] = state["head.weight"] + 1.0
    with pytest.raises(ValueError, match="disagrees"):
        hf.hf_model(model.plan, state)


WINDOWS = ["nodes.layers.body.attn.window=if(layer % 2 == 0, 16, seq_len)"]   # local/global


@pytest.mark.parametrize("name,sets", [("gpt2", ()), ("llama", ()), ("ngpt", ()),
                                       ("llama", WINDOWS)], ids=["gpt2", "llama", "ngpt", "llama-window"])
def test_pt2_reproduces_logits(name, sets, tmp_path):
    """At every length up to the context, local/global windows included (the export traces a
    symbolic length: a window compared with it would become a guard it cannot satisfy)."""
    model = ours(name, sets)
    (path,) = pt2.write(model.plan, model.state_dict(), tmp_path, {})
    loaded = torch.export.load(path).module()
    t = model.plan.seq_len
    for b, n in ((2, t), (3, t // 2), (1, 1)):
        idx = tokens(b, n)
        with torch.no_grad():
            got, want = loaded(idx), model(idx)[0]
        assert got.shape == (b, n, V) and rel(got, want) <= TOL, (b, n)
    with pytest.raises(Exception, match="<= 64"):  # the trained context is a hard limit
        loaded(tokens(1, t + 1))


FRESH = """
import sys, torch, transformers
out = sys.argv[1]
idx = torch.load(out + "/idx.pt")
auto = transformers.AutoModelForCausalLM
hf = auto.from_pretrained(out + "/hf")
remote = auto.from_pretrained(out + "/remote", trust_remote_code=True)
with torch.no_grad():
    torch.save({"hf": hf(input_ids=idx).logits, "remote": remote(input_ids=idx).logits,
                "pt2": torch.export.load(out + "/model.pt2").module()(idx)}, out + "/got.pt")
assert not {"graphs", "blocks"} & set(sys.modules), "project code was imported"
"""


def test_exports_load_in_a_fresh_process_without_project_code(tmp_path):
    """Stock hf and pt2 of a Llama graph, custom-code hf of an nGPT graph: each loads where
    the playground is never imported."""
    model, ngpt = ours("llama", params={"vars.n_kv_head": 2}), ours("ngpt")
    for sub in ("hf", "remote"):
        (tmp_path / sub).mkdir()
    hf.write(model.plan, model.state_dict(), tmp_path / "hf", {})
    hf.write(ngpt.plan, ngpt.state_dict(), tmp_path / "remote", {})
    pt2.write(model.plan, model.state_dict(), tmp_path, {})
    idx = tokens(2, 40)
    torch.save(idx, tmp_path / "idx.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(tmp_path)], cwd=tmp_path, check=True,
                   timeout=120)
    got = torch.load(tmp_path / "got.pt")
    with torch.no_grad():
        want, want_ngpt = model(idx)[0], ngpt(idx)[0]
    assert rel(got["hf"], want) <= TOL and rel(got["pt2"], want) <= TOL
    assert rel(got["remote"], want_ngpt) <= TOL
