"""Sample text from an exported model: `python generate.py "Once upon a time" --tokens 50`.

Runs next to model.py, config.json and model.safetensors; needs torch, safetensors and, for
GPT-2 token models, tiktoken. The GPT-2 ranks are read from --tiktoken-file PATH when given, else
from the lm-playground install ($LM_PLAYGROUND_HOME or ~/.cache/lm-playground, then
tokenizers/gpt2.tiktoken), else tiktoken's own "r50k_base" encoding (ids identical to "gpt2"),
which reads tiktoken's cache ($TIKTOKEN_CACHE_DIR) and downloads the file once when online.
"""
import argparse
import base64
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_pat_str) and end-of-text id.
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
EOT = 50256


def gpt2_encoding(rank_file: str | None):
    """tiktoken's GPT-2 encoding, offline when a rank file is at hand."""
    import tiktoken

    home = Path(os.environ.get("LM_PLAYGROUND_HOME") or Path.home() / ".cache" / "lm-playground")
    path = Path(rank_file) if rank_file else home / "tokenizers" / "gpt2.tiktoken"
    if not path.is_file():
        if rank_file:
            sys.exit(f"error: {rank_file}: no such file")
        return tiktoken.get_encoding("r50k_base")
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


class Bytes:
    """UTF-8 bytes as ids 0..255 (ids above 255 are special and dropped when decoding)."""

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@torch.no_grad()
def sample(model, ids: list[int], n: int, temperature: float, top_k: int, vocab: int) -> list[int]:
    """Append n sampled ids; the context is cropped to the model's seq_len."""
    x = torch.tensor([ids], dtype=torch.long)
    for _ in range(n):
        logits, _ = model(x[:, -model.cfg.seq_len:])
        logits = logits[0, -1, :vocab].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, vocab)).values[-1]
            logits[logits < kth] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return x[0].tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", nargs="?", default="\n")
    ap.add_argument("--tokens", type=int, default=100, help="how many ids to sample")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiktoken-file", help="a gpt2.tiktoken / r50k_base.tiktoken rank file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import model as exported  # the model.py next to this file

    torch.manual_seed(args.seed)
    info = json.loads((HERE / "config.json").read_text())
    tok = gpt2_encoding(args.tiktoken_file) if info["tokenizer"] == "gpt2" else Bytes()
    vocab = EOT + 1 if info["tokenizer"] == "gpt2" else 256   # never sample padding or specials
    ids = tok.encode_ordinary(args.prompt) or [EOT if info["tokenizer"] == "gpt2" else 10]
    out = sample(exported.load(HERE), ids, args.tokens, args.temperature, args.top_k, vocab)
    print(tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
