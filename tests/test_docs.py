"""Generated docs and schema are current; the format's sketches for later block families hold."""
from __future__ import annotations

import pytest
import torch

import graphs
from graphs import docs
from graphs.elaborate import elaborate

from conftest import SKETCHES


def test_generated_docs_and_schema_are_current():
    stale = [p for p, text in docs.outputs().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"stale generated files {stale}: run `python -m graphs.docs`"


def test_catalogue_lists_every_block_and_parameter():
    import blocks
    from blocks.registry import config_fields
    text = docs.blocks_md()
    for name, cls in blocks.REGISTRY.items():
        assert f"### `{name}`" in text
        for f in config_fields(cls.Config):
            assert f"| `{f.name}` |" in text


@pytest.mark.parametrize("path", SKETCHES, ids=lambda p: p.stem)
def test_sketch_passes_the_structural_check(path):
    for size in ("tiny", None):
        g = graphs.load(path, size=size)
        for d in g.space():
            for v in (d.choices if d.kind == "choice" else (d.low, d.high)):
                elaborate(g.resolve({d.name: v}))


def test_sketch_kinds_cover_streams_bytes_and_patches():
    seen = set()
    for path in SKETCHES:
        plan = elaborate(graphs.load(path, size="tiny").resolve())
        for _, _, s in plan.steps():
            seen |= {(k.name, k.seq) for k in s.out_kinds}
    assert {("streams", "token"), ("patch_map", "byte"), ("hidden", "patch"),
            ("hidden", "byte")} <= seen


def test_byte_sketch_is_causal():
    """Perturbing byte t leaves every logit before t unchanged (patch map, pooling and the
    shift by one patch leak nothing from the future)."""
    path = next(p for p in SKETCHES if p.stem == "blt")
    model = graphs.build(elaborate(graphs.load(path, size="tiny").resolve()), seed=0).eval()
    x = torch.randint(0, 256, (1, 64))
    base, _ = model(x)
    for t in (1, 5, 17, 40, 63):
        y = x.clone()
        y[0, t] = (y[0, t] + 7) % 256
        out, _ = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.equal(out[:, t:], base[:, t:])


def test_hyper_sketch_with_one_stream_equals_pre_norm():
    """n = 1 with unit connections is the Pre-Norm Transformer++ with the same weights."""
    path = next(p for p in SKETCHES if p.stem == "hyper")
    hc = graphs.build(elaborate(graphs.load(path, size="tiny").resolve({"vars.n_streams": 1})), seed=0)
    pre = graphs.build(elaborate(graphs.load(graphs.__path__[0] + "/llama.yaml", size="tiny",
                                             sets=["nodes.layers.body.attn.kv_heads=null"]).resolve()),
                       seed=0)
    rename = {"a_norm": "attn_norm", "m_norm": "mlp_norm", "layers": "layers"}
    mapped = {}
    for k, v in hc.state_dict().items():
        parts = k.split(".")
        if parts[-2] in ("a_in", "m_in", "a_out", "m_out"):
            continue
        mapped[".".join(rename.get(p, p) for p in parts)] = v
    missing, unexpected = pre.load_state_dict(mapped, strict=False)
    assert not unexpected and not missing
    x = torch.randint(0, 50257, (2, 64))
    torch.testing.assert_close(hc(x)[0], pre(x)[0])


def test_diagram_folds_each_repeat_group_once_with_its_count():
    from graphs.diagram import to_dot
    plan = elaborate(graphs.load(graphs.__path__[0] + "/gpt2.yaml").resolve())
    dot = to_dot(plan, highlight={"attn"})
    assert 'label="h: repeat x12"' in dot
    assert dot.count("\\nattention") == 1          # the body is drawn once, not 12 times
    assert '"h/attn"' in dot and 'fillcolor' in dot
    assert '"tok" -> "x" [label="hidden d=768"]' in dot
