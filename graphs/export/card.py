"""The model card (README.md) of an exported folder: what the model is, where it came from, how
it scored, and how to use it."""
from __future__ import annotations

import yaml

from graphs.plan import Plan

METRICS = (("status", "status"), ("val_loss", "validation loss"), ("val_bpb", "validation bits per byte"),
           ("tokens", "training tokens"), ("step", "optimizer steps"), ("train_s", "training seconds"))


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.0f}"


def _metrics(result: dict | None) -> list[str]:
    if not result:
        return ["No training result was found (random or untracked weights)."]
    rows = ["| metric | value |", "|---|---|"]
    for key, label in METRICS:
        v = result.get(key)
        if v is not None:
            rows.append(f"| {label} | {v:.4f} |" if isinstance(v, float) else f"| {label} | {v} |")
    return rows


def _tokenizer(tokenizer: str) -> str:
    if tokenizer == "bytes":
        return "raw UTF-8 bytes (ids 0-255; 256 is end-of-text)."
    return ("GPT-2 BPE through tiktoken (`r50k_base`, the same ids as `gpt2`; 50257 ids, the rest "
            "of the vocabulary is padding). generate.py reads the ranks from `--tiktoken-file`, "
            "else `$LM_PLAYGROUND_HOME/tokenizers/gpt2.tiktoken` (default home "
            "`~/.cache/lm-playground`, filled by `python -m search.tokenizer install`), else "
            "tiktoken's cache (`$TIKTOKEN_CACHE_DIR`), downloading once when online.")


USAGE = """## Use

```python
import model

m = model.load(".")            # strict: every weight must match
logits, _ = m(idx)             # idx: LongTensor [batch, time]
```

```sh
python generate.py "Once upon a time" --tokens 50
```

`model.py` needs only PyTorch (and `safetensors` to read the weights); its class `{cls}` has the
same state_dict keys as the playground model, so weights move between the two unchanged.
"""


def _facts(plan: Plan, meta: dict, tokenizer: str) -> list[str]:
    ckpt = f", checkpoint `{meta['checkpoint']}`" if meta.get("checkpoint") else ""
    seed = f", random weights from seed {meta['init_seed']}" if meta.get("init_seed") is not None else ""
    size = f", size `{meta['size']}`" if meta.get("size") else ""
    lines = [f"- source: `{meta.get('source', '?')}`{ckpt}{seed}",
             f"- graph hash: `{plan.hash}`{size}", f"- tokenizer: {_tokenizer(tokenizer)}"]
    cost = meta.get("cost")
    if cost is not None:
        lines += [(f"- parameters: {cost.params:,} ({_si(cost.params)}), non-embedding "
                   f"{cost.params_non_embedding:,}"),
                  (f"- training FLOPs per token: {_si(cost.flops_per_token)}FLOP at context "
                   f"{cost.seq_len} (3 x the forward's matmul and attention FLOPs)")]
    return lines


def render(plan: Plan, meta: dict, tokenizer: str, cls: str) -> str:
    """README.md text for an export of `plan`; `meta` carries the cost, source and result."""
    graph = meta.get("graph") or {}
    graph_yaml = yaml.safe_dump(graph, sort_keys=False).rstrip()
    lines = [f"# {plan.name} (standalone export)", "", graph.get("description", "").strip(), "",
             *_facts(plan, meta, tokenizer), "", "## Metrics", "", *_metrics(meta.get("result")), "",
             USAGE.format(cls=cls), "## Graph (resolved)", "", "```yaml", graph_yaml, "```", ""]
    return "\n".join(lines)
