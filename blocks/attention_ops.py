"""Attention kernels shared by the attention blocks: one `attend` over three interchangeable paths.

- `sdpa`: `scaled_dot_product_attention`, with `is_causal` or a dense mask/bias (window, ALiBi).
- `flex`: FlexAttention, a `score_mod` (softcap, ALiBi) and a block mask (causal, window) that
  is built once per (length, window, device), outside compiled regions, and reused by every
  layer. Compiled on CUDA; eager
  elsewhere (eager Flex materialises the scores: correct, and fine for tests, but slow).
- `eager`: the explicit masked twin, the reference every other path is tested against.

`auto` takes SDPA unless a softcap asks for a score_mod (SDPA cannot do it); then Flex on CUDA
and the eager twin elsewhere. The order of operations is Gemma 2's: s = cap(q.k * scale) + bias,
then the mask, then softmax.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNELS = ("auto", "sdpa", "flex", "eager")


@dataclass(frozen=True)
class Scores:
    """What happens to q.k before softmax, besides the causal mask."""

    window: int | None = None     # attend to j iff 0 <= i - j < window (the query counts)
    softcap: float | None = None  # s <- c * tanh(s / c)
    alibi: bool = False           # s += -slope_h * (i - j)
    scale: float | None = None    # default 1 / sqrt(head_dim)

    @property
    def plain(self) -> bool:
        return self.window is None and self.softcap is None and not self.alibi


def alibi_slopes(n_head: int) -> torch.Tensor:
    """m_h = 2^(-8h/H) for h = 1..H; other H interleave the next power of two (the paper's rule)."""
    def pow2(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    n = 2 ** math.floor(math.log2(n_head))
    slopes = pow2(n) + pow2(2 * n)[0::2][: n_head - n]
    return torch.tensor(slopes, dtype=torch.float32)


def dense_mask(t: int, window: int | None, device=None) -> torch.Tensor:
    """[t, t] bool, True where query i may attend to key j (causal, within the window)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(t, device=device)[None, :]
    keep = j <= i
    return keep & (i - j < window) if window is not None else keep


def alibi_bias(slopes: torch.Tensor, t: int) -> torch.Tensor:
    """[H, t, t] fp32 bias slope_h * (j - i) (<= 0 on and below the diagonal)."""
    pos = torch.arange(t, device=slopes.device, dtype=torch.float32)
    return slopes[:, None, None] * (pos[None, :] - pos[:, None])[None]


def _repeat_kv(k: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF repeat_kv order: query head i reads kv head i // (n_head / n_kv)
    return k if k.shape[1] == n_head else k.repeat_interleave(n_head // k.shape[1], dim=1)


def eager(q, k, v, s: Scores, slopes=None, dropout: float = 0.0) -> torch.Tensor:
    """The explicit twin: scores in (at least) fp32, capped, biased, masked, softmaxed, dropped, times v."""
    h, t = q.shape[1], q.shape[2]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    scale = s.scale if s.scale is not None else q.shape[-1] ** -0.5
    att = q @ k.transpose(-2, -1)
    att = (att if att.dtype == torch.float64 else att.float()) * scale  # fp32 at least
    if s.softcap is not None:
        att = s.softcap * torch.tanh(att / s.softcap)
    if s.alibi:
        att = att + alibi_bias(slopes.to(q.device), t)
    att = att.masked_fill(~dense_mask(t, s.window, q.device), float("-inf"))
    att = F.dropout(att.softmax(-1), dropout, training=dropout > 0).to(v.dtype)
    return att @ v


def sdpa(q, k, v, s: Scores, slopes=None, dropout: float = 0.0) -> torch.Tensor:
    """SDPA with `is_causal` when nothing else applies, else with a dense mask or bias."""
    if s.softcap is not None:
        raise ValueError("SDPA cannot softcap attention logits; use kernel flex or eager")
    h, t = q.shape[1], q.shape[2]
    k, v = _repeat_kv(k, h), _repeat_kv(v, h)
    if not s.alibi and s.window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=s.scale)
    mask = dense_mask(t, s.window, q.device)
    if s.alibi:
        bias = alibi_bias(slopes.to(q.device), t).masked_fill(~mask, float("-inf"))
        mask = bias.to(q.dtype)[None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=s.scale)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


# (length, window, device) -> BlockMask, shared by every layer with that window. A plain dict,
# not functools.lru_cache: Dynamo traces through an lru_cache (with a warning) and so built the
# mask inside every compiled region, at every call (arange, vmap, argsort: ~70 graph nodes a
# layer), whereas an entry it finds in a dict is a constant whose tensors become graph inputs.
# `prepare_flex` fills it before a compiled call (graphs.compile does, from the model's input).
_BLOCK_MASKS: dict = {}
_BLOCK_MASKS_KEPT = 64


def block_mask(t: int, window: int | None, device: str):
    key = (t, window, device)
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, kj):
            keep = qi >= kj
            return keep & (qi - kj < window) if window is not None else keep
        mask = create_block_mask(mask_mod, None, None, t, t, device=device)
        if not torch.compiler.is_compiling():   # made inside a trace, it is that graph's own
            if len(_BLOCK_MASKS) >= _BLOCK_MASKS_KEPT:
                _BLOCK_MASKS.clear()
            _BLOCK_MASKS[key] = mask
    return mask


def effective(s: Scores, t: int) -> Scores:
    """s for a sequence of t: a window that covers every key is no window (plain causal, which
    SDPA runs without a mask: flash, not the dense-mask kernel; the global layers of
    local/global models have window = seq_len)."""
    # only for a length known while tracing: `graphs.export` traces a symbolic one, on which the
    # comparison would become a guard that its dynamic length cannot satisfy
    covers = s.window is not None and isinstance(t, int) and s.window >= t
    return Scores(None, s.softcap, s.alibi, s.scale) if covers else s


def prepare_flex(s: Scores, kernel: str, t: int, device: torch.device) -> None:
    """Make, outside any compiled region, the block mask that `attend` will look up for a
    sequence of t on `device` when it takes Flex."""
    s = effective(s, t)
    if choose(kernel, s, device) == "flex":
        block_mask(t, s.window, str(device))


def score_mod(s: Scores, slopes):
    """The Flex score_mod for softcap and ALiBi (None when neither applies)."""
    if s.softcap is None and not s.alibi:
        return None
    cap = s.softcap

    def mod(score, b, h, qi, kj):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score + slopes[h] * (kj - qi)
        return score
    return mod


def flex(q, k, v, s: Scores, slopes=None, dropout: float = 0.0) -> torch.Tensor:
    """FlexAttention (compiled on CUDA); no attention dropout."""
    if dropout:
        raise ValueError("the flex kernel has no attention dropout; use kernel eager")
    from torch.nn.attention.flex_attention import flex_attention
    # inside a compiled region Dynamo compiles Flex itself (tracing our torch.compile'd wrapper
    # is what it warned about); eagerly, the compiled wrapper on CUDA
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    mask = block_mask(q.shape[2], s.window, str(q.device))
    sl = slopes.to(q.device) if s.alibi else None
    gqa = k.shape[1] != q.shape[1]
    return fn(q, k, v, score_mod=score_mod(s, sl), block_mask=mask, scale=s.scale, enable_gqa=gqa)


def choose(kernel: str, s: Scores, device: torch.device) -> str:
    if kernel != "auto":
        return kernel
    if s.softcap is None:
        return "sdpa"
    return "flex" if device.type == "cuda" else "eager"


def attend(q, k, v, s: Scores, kernel: str = "auto", slopes=None, dropout: float = 0.0):
    """Causal attention of q [B, H, T, D] over k, v [B, H_kv, T, D] by the chosen kernel."""
    s = effective(s, q.shape[2])
    fn = {"sdpa": sdpa, "flex": flex, "eager": eager}[choose(kernel, s, q.device)]
    return fn(q, k, v, s, slopes, dropout)
