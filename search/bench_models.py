"""Which models `search.bench` times: a spec `NAME[+SET...][@VARIANT]` names graphs/NAME.yaml with
`--set`s and a variant (an `impl` on every node, or another loss form), built as a graph model;
gpt2 and llama also have hand-written twins in bench/reference.py."""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PAIRS = {"gpt2": "GPT2", "llama": "Llama"}   # graphs with a hand-written twin (bench/reference.py)
IMPL_TYPES = {"attention", "cross_entropy", "geglu", "layernorm", "linear_cross_entropy", "rmsnorm",
              "swiglu", "hc_read", "hc_write"}   # the blocks with an `impl` field (blocks/liger.py)
MHC_ONLY = {"hc_read", "hc_write"}   # Liger has an op for their mode mhc only (the others refuse liger)


def base_name(spec: str) -> str:
    return spec.split("@")[0].split("+")[0]


def variant_sets(spec: str, size: str | None) -> list[str]:
    """`--set`s of a model spec `NAME[+SET...][@VARIANT]`: each SET as in `search.train --set`
    (`hyper+hc=mhc`); VARIANT `liger`/`auto`/`torch` puts that impl on every node with an `impl`
    field, `flce` (Liger) or `chunked` (the compiled chunked twin) makes the loss the fused linear
    cross-entropy block tied to the head, `ce` makes it the head's logits and cross-entropy."""
    import graphs
    name, _, variant = spec.partition("@")
    name, *sets = name.split("+")
    if not variant:
        return sets
    g = graphs.load(ROOT / "graphs" / f"{name}.yaml", size, sets).resolve()
    nodes = g.data["nodes"]
    loss = nodes["loss"]
    fused = loss["type"] == "linear_cross_entropy"
    head_id = loss["tie"] if fused else loss["in"][0]
    if variant in ("flce", "chunked"):   # the fused loss shares the head's weight (tied or not)
        return sets + [f"nodes.loss={{type: linear_cross_entropy, in: [{nodes[head_id]['in']}, targets], "
                       f"vocab: vocab_size, tie: {head_id}, impl: {'liger' if variant == 'flce' else 'torch'}}}"]
    if variant == "ce":
        return sets + [f"nodes.loss={{type: cross_entropy, in: [{head_id}, targets]}}"]
    if variant not in ("liger", "auto", "torch"):
        raise SystemExit(f"model {spec!r}: variant @{variant} is not one of liger, auto, torch, flce, "
                         f"chunked, ce")
    out = []

    def takes_impl(node: dict) -> bool:
        if node.get("type") not in MHC_ONLY:
            return node.get("type") in IMPL_TYPES
        mode = node.get("mode", "static")
        return g.data["vars"].get(mode, mode) == "mhc"   # `mode: hc` names a variable

    def walk(group: dict, prefix: str) -> None:
        for key, node in group.items():
            if "body" in node:
                walk(node["body"], f"{prefix}{key}.body.")
            elif takes_impl(node):
                out.append(f"nodes.{prefix}{key}.impl={variant}")
    walk(nodes, "")
    return sets + out


def graph_model(name: str, size: str | None, device, sets=()):
    import graphs
    sets = [*variant_sets(name, size), *sets]
    plan = graphs.elaborate(graphs.load(ROOT / "graphs" / f"{base_name(name)}.yaml", size, sets).resolve())
    return plan, graphs.build(plan, device=device, seed=0)


def reference_model(name: str, plan, device):
    from bench import reference
    v = plan.vars
    d_ff = v.get("d_ff", 4 * v["d_model"])
    cfg = reference.Config(vocab_size=v["vocab_size"], seq_len=v["seq_len"], n_layer=v["n_layer"],
                           n_head=v["n_head"], n_kv_head=v.get("n_kv_head", v["n_head"]),
                           d_model=v["d_model"], d_ff=d_ff, rope_theta=float(v.get("rope_theta", 1e4)))
    with torch.device(device):
        return getattr(reference, PAIRS[name])(cfg)
