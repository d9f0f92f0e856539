"""BLT patchers (arXiv 2412.09871 §2): pure rules that say where patches start, and their blocks.

Every rule gives `starts`, a bool tensor [B, N + 1]: starts[:, t] says byte t begins a patch, for
t = 0..N (position N is the byte after the window, needed to align the decoder). From it:

- `map[t]`  = patch id of byte t (non-decreasing from 0), what the encoder pools by;
- `next[t]` = patch id of the *target* of the prediction at t (byte t + 1) when the rule decides
  a start at t + 1 from bytes <= t (fixed stride, entropy), else map[t] (space patching looks at
  byte t + 1 itself). The decoder reads patch next[t] - 1, which only holds bytes <= t: causal.

Entropy rules follow the paper: positions 0 and 1 always start (the first patch has length 1),
and byte t >= 2 starts a patch when H_t > theta (global), H_t - H_{t-1} > theta_r (approximate
monotonic) or both (combined); H_t is the entropy of the byte LM's prediction of byte t.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blocks.kinds import byte_ids, expect, expect_count, patch_map
from blocks.registry import Block, param, register

RULES = ("global", "monotonic", "combined")


def maps_from_starts(starts: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """starts [B, N + 1] -> (map, next), both [B, N] int64 (see the module docstring)."""
    ids = starts.long().cumsum(dim=1) - 1
    n = starts.shape[1] - 1
    return ids[:, :n], ids[:, 1:] if shift else ids[:, :n]


def fixed_starts(b: int, n: int, stride: int, device=None) -> torch.Tensor:
    """Byte t starts a patch when t % stride == 0 (patch of byte t = t // stride)."""
    pos = torch.arange(n + 1, device=device)
    return (pos % stride == 0).unsqueeze(0).expand(b, -1)


def is_word_byte(ids: torch.Tensor) -> torch.Tensor:
    """ASCII letters and digits and every non-ASCII UTF-8 byte (0x80..0xFF) stay inside a word:
    counting lead bytes too keeps a multi-byte character (é = C3 A9) in one patch."""
    letter = ((ids >= 65) & (ids <= 90)) | ((ids >= 97) & (ids <= 122))
    return letter | ((ids >= 48) & (ids <= 57)) | ((ids >= 0x80) & (ids <= 0xFF))


def space_starts(ids: torch.Tensor) -> torch.Tensor:
    """A patch starts at a word byte that follows a non-word byte (runs of non-word bytes stay
    with the word before them); bytes 0 and 1 always start. starts[:, N] is False (unknown)."""
    word = is_word_byte(ids)
    s = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.bool, device=ids.device)
    s[:, 1:-1] = word[:, 1:] & ~word[:, :-1]
    s[:, :2] = True
    return s


def entropy_starts(ent: torch.Tensor, threshold: float, rule: str = "global",
                   threshold_r: float = 0.0) -> torch.Tensor:
    """ent [B, N]: ent[:, t] is the entropy of the prediction at t, i.e. H of byte t + 1.

    Returns starts [B, N + 1]; byte t + 1 >= 2 starts when the rule holds for H_{t+1} = ent[t]
    (monotonic compares with H_t = ent[t - 1])."""
    b, n = ent.shape
    h = ent[:, 1:]                       # H_2 .. H_N
    dh = ent[:, 1:] - ent[:, :-1]        # H_{t} - H_{t-1} for t = 2 .. N
    if rule == "global":
        cut = h > threshold
    elif rule == "monotonic":
        cut = dh > threshold_r
    elif rule == "combined":
        cut = (h > threshold) & (dh > threshold_r)
    else:
        raise ValueError(f"unknown entropy rule {rule!r}; choose one of {', '.join(RULES)}")
    head = torch.ones(b, min(2, n + 1), dtype=torch.bool, device=ent.device)
    return torch.cat([head, cut], dim=1)


def entropies(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each position's next-byte distribution: logits [B, N, V] -> [B, N]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def patch_lengths(starts: torch.Tensor) -> list[list[int]]:
    """Lengths of the patches of bytes 0..N-1 per row (for tests, logs and threshold tuning)."""
    out = []
    for row in starts[:, :-1].tolist():
        begins = [i for i, s in enumerate(row) if s] + [len(row)]
        out.append([b - a for a, b in itertools.pairwise(begins)])
    return out


def load_entropy_model(folder: str, device) -> torch.nn.Module:
    """The frozen byte LM in `folder` (`graph.yaml` + `model.safetensors`), in eval mode."""
    from pathlib import Path

    from safetensors.torch import load_model

    import graphs  # graphs import blocks, so only at run time (a user-named file, not code)
    folder = Path(folder)
    plan = graphs.elaborate(graphs.loads((folder / "graph.yaml").read_text(), file=str(folder)))
    model = graphs.build(plan, device=device, seed=None)
    load_model(model, str(folder / "model.safetensors"))
    return model.eval().requires_grad_(False)


def patch_stats(model: torch.nn.Module) -> dict[str, float]:
    """{"val/patch_len": mean bytes per patch since the last call} for a model with a patcher
    ({} otherwise); resets the counts."""
    out = {}
    for name, buf in model.named_buffers():
        if name.endswith("patch_counts"):
            if buf[1] > 0:
                out["val/patch_len"] = float(buf[0] / buf[1])
            buf.zero_()
    return out


class Patcher(Block):
    """Common kinds of the patchers: byte ids in; the byte -> patch map and the decoder map out."""

    family = "bytes"
    inputs = ("bytes",)
    outputs = ("map", "next")

    @classmethod
    def infer(cls, cfg, ins):
        expect_count(ins, 1)
        expect(ins, 0, "bytes")
        return (patch_map(), patch_map())

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        # bytes and patches seen since the last `patch_stats` (logged as val/patch_len), and the
        # mean bytes per patch of the last batch
        self.register_buffer("patch_counts", torch.zeros(2, dtype=torch.float64), persistent=False)
        self.register_buffer("mean_patch_len", torch.zeros(()), persistent=False)

    def starts(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids):
        starts = self.starts(ids)
        with torch.no_grad():
            n_patches = starts[:, :-1].sum().double()
            self.patch_counts.add_(torch.stack([n_patches.new_tensor(ids.numel()), n_patches]))
            self.mean_patch_len.copy_(ids.numel() / n_patches.clamp(min=1))
        return maps_from_starts(starts, shift=self.shifts)


@register
class PatchFixed(Patcher):
    """Fixed-stride patching: byte i belongs to patch i // stride."""

    type_name = "patch_fixed"
    example = ({"stride": 3}, [byte_ids()])  # for the registry's smoke test
    shifts = True

    @dataclass(frozen=True)
    class Config:
        stride: int = param(doc="bytes per patch", min=1, max=1 << 16)

    def starts(self, ids):
        return fixed_starts(ids.shape[0], ids.shape[1], self.cfg.stride, ids.device)


@register
class PatchSpace(Patcher):
    """Space patching: a patch starts at each word after non-word bytes (letters, digits and all
    non-ASCII bytes are word bytes); the decoder reads the patch before the current byte's."""

    type_name = "patch_space"
    example = ({}, [byte_ids()])  # for the registry's smoke test
    shifts = False  # whether byte t + 1 starts depends on byte t + 1 itself

    @dataclass(frozen=True)
    class Config:
        pass

    def starts(self, ids):
        return space_starts(ids)


@register
class PatchEntropy(Patcher):
    """Entropy patching: a frozen byte LM (trained by `python -m search.entropy`) scores every
    byte; a patch starts where its entropy passes the global or approximate-monotonic threshold."""

    type_name = "patch_entropy"
    example = ({"threshold": 1.0}, [byte_ids()])  # for the registry's smoke test
    shifts = True  # H of byte t + 1 is known from bytes <= t

    @dataclass(frozen=True)
    class Config:
        threshold: float = param(1.3354, "theta: global threshold on H in nats", min=0.0, max=10.0)
        rule: str = param("global", "global: H > theta; monotonic: H_t - H_{t-1} > theta_r; "
                          "combined: both", choices=RULES)
        threshold_r: float = param(0.0, "theta_r of the monotonic rule (nats)", min=-10.0, max=10.0)
        model: str | None = param(None, "folder of the entropy model written by `python -m "
                                  "search.entropy train` (null: uniform entropies, one long patch)")

    def __init__(self, cfg, ins, ctx):
        super().__init__(cfg, ins, ctx)
        self._lm = None   # loaded on first use and kept out of parameters, state_dict and optimiser
        # the training batch's precomputed entropies [B, N], set by the loader from the cache of
        # `python -m search.entropy cache` (search/setup.py); None: the entropy model scores
        self.fed: torch.Tensor | None = None

    def entropy_model(self, device):
        if self._lm is None and self.cfg.model is not None and device.type != "meta":
            from pathlib import Path
            if not (Path(self.cfg.model) / "model.safetensors").exists():
                raise FileNotFoundError(f"{self.ctx.node}: no entropy model in {self.cfg.model!r}; "
                                        f"train one: python -m search.entropy train --out "
                                        f"{self.cfg.model}")
            self._lm = [load_entropy_model(self.cfg.model, device)]
        return self._lm[0] if self._lm else None

    @torch.compiler.disable  # a frozen side model: not part of the compiled training graph
    def entropies(self, ids: torch.Tensor) -> torch.Tensor:
        if self.fed is not None:
            if self.fed.shape != ids.shape:
                raise RuntimeError(f"{self.ctx.node}: cached entropies of shape "
                                   f"{tuple(self.fed.shape)} for a batch of {tuple(ids.shape)}")
            return self.fed.float()
        lm = self.entropy_model(ids.device)
        if lm is None:
            return torch.full(ids.shape, 5.5607, device=ids.device)  # ln 260
        # windows of the entropy model's context, each from a fresh context (as `search.entropy`
        # scores the cached entropies the threshold was tuned on)
        b, n = ids.shape
        w = min(lm.plan.seq_len, n)
        rows = F.pad(ids, (0, (-n) % w)).view(-1, w)
        with torch.no_grad():
            return entropies(lm(rows)[0]).view(b, -1)[:, :n]

    def starts(self, ids):
        return entropy_starts(self.entropies(ids), self.cfg.threshold, self.cfg.rule,
                              self.cfg.threshold_r)
