"""The plain-PyTorch twins of the kernel backends in blocks/liger.py: one function per op, with the
same signature as its Liger counterpart, keyed by op name in TWINS. They are what impl `torch`
runs, what `auto` runs where Liger cannot (CPU, tests, inside compiled regions) and the
reference the Liger kernels are tested against. Fused linear cross-entropy has a twin of its own
making (`_ChunkedLinearCE`, Liger's chunked scheme in plain PyTorch that Inductor compiles)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks import hyper_ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Llama's RMSNorm: normalise in fp32, cast back to x's dtype, then multiply by the gain."""
    x32 = x.float()
    y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def torch_rope(q, k, cos, sin):
    """Half-split RoPE of q [B, H, T, D] and k [B, H_kv, T, D]; cos/sin are [T, D]. The same
    code as impl torch (blocks.attention.apply_rope), so `auto` choosing the twin inside a
    compiled region traces the very graph of `torch`."""
    from blocks.attention import apply_rope
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def torch_swiglu(gate, up):
    return F.silu(gate) * up


def torch_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up   # Liger's GEGLU is tanh-GELU only


def torch_cross_entropy(logits, targets, ignore_index):
    lg = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(lg, targets, ignore_index=ignore_index)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would multiply x in: autocast's where it is on, else x's own."""
    if (x.dtype == torch.float64 or x.device.type not in ("cuda", "cpu")
            or not torch.is_autocast_enabled(x.device.type)):
        return x.dtype
    return torch.get_autocast_dtype(x.device.type)


class _ChunkedLinearCE(torch.autograd.Function):
    """Mean CE of x @ weight.T with the gradients computed in the forward, `chunk` rows at a time
    (the scheme of Liger's fused kernel, in plain PyTorch that Inductor compiles): each chunk's
    logits live only while its loss and its logit gradient (softmax - one-hot) are computed,
    then feed grad_x (rows of the chunk) and grad_w (accumulated in fp32). Backward only scales
    the saved gradients, so neither pass holds the [N, V] logits nor recomputes them."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk, grads):
        cd = _compute_dtype(x)
        acc = torch.float64 if cd == torch.float64 else torch.float32
        xs, w = x.to(cd), weight.to(cd)
        need_x, need_w = (grads and r for r in ctx.needs_input_grad[:2])
        gx = torch.empty_like(xs) if need_x else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=x.device)
        valid = targets != ignore_index
        cols = torch.arange(weight.shape[0], device=x.device)
        for i in range(0, x.shape[0], chunk):
            xc, vc = xs[i:i + chunk], valid[i:i + chunk]
            tc = targets[i:i + chunk].clamp(min=0)
            lg = (xc @ w.T).to(acc)
            lse = torch.logsumexp(lg, dim=-1)
            total = total + torch.where(vc, lse - lg.gather(1, tc[:, None])[:, 0], 0.0).sum()
            if gx is None and gw is None:
                continue
            if torch.compiler.is_compiling():
                # softmax minus the one-hot of the target, as one pointwise expression (Inductor
                # writes it once, in the compute dtype; no fp32 [chunk, V] copy is kept)
                g = torch.exp(lg - lse[:, None]) - (cols[None, :] == tc[:, None]).to(acc)
                g = (g * vc[:, None]).to(cd)
            else:   # eagerly that is five passes over [chunk, V]; one softmax and an in-place pick
                g = torch.softmax(lg, dim=-1)
                g[torch.arange(len(tc), device=x.device), tc] -= 1.0
                g = g.mul_(vc[:, None]).to(cd)
            if gx is not None:
                gx[i:i + chunk] = g @ w
            if gw is not None:
                gw += (g.T @ xc).to(acc)
        n = valid.sum().clamp(min=1)
        ctx.save_for_backward(gx, gw, n)
        ctx.dtypes = (x.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, go):
        gx, gw, n = ctx.saved_tensors
        s = go / n
        return (None if gx is None else (gx * s).to(ctx.dtypes[0]),
                None if gw is None else (gw * s).to(ctx.dtypes[1]), None, None, None, None)


def torch_linear_cross_entropy(x, weight, targets, ignore_index, chunk: int = 4096):
    """Mean CE of x @ weight.T over rows, `chunk` rows at a time, never holding the [N, V]
    logits (see _ChunkedLinearCE); without gradients, the loss alone chunk by chunk."""
    # the cost model counts a forward on the meta device: the loss alone, as any head + loss
    grads = (torch.is_grad_enabled() and x.device.type != "meta"
             and (x.requires_grad or weight.requires_grad))
    return _ChunkedLinearCE.apply(x, weight, targets, ignore_index, chunk, grads)


TWINS = {"rms_norm": rms_norm, "layer_norm": torch_layer_norm, "rope": torch_rope,
         "swiglu": torch_swiglu, "geglu": torch_geglu, "cross_entropy": torch_cross_entropy,
         "linear_cross_entropy": torch_linear_cross_entropy,
         "mhc_read": hyper_ops.mhc_read, "mhc_write": hyper_ops.mhc_write}
