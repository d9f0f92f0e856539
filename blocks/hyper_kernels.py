"""Fused Triton kernels of static and dynamic hyper-connections: `impl: triton` on hc_read and
hc_write (frac 1, at most hyper.MAX_FUSED_STREAMS streams: the kernels unroll over them), as
PyTorch custom ops with their autograd. Imported only where that impl is asked for (it needs the
triton package); the kernels themselves are in blocks/hyper_triton.py.

One op computes both connection kinds of blocks/hyper.py over streams h (N, n, d):
    out[t, o] = sum_u A[t, u, o] h[t, u]  (+ beta[t, o] y[t] for hc_write)
    A[t, u, o] = a0[u, o] + s_a tanh(z[t, u, o]),  beta[t, o] = b0[o] + s_b tanh(z[t, o, OUT])
    z[t, u, :] = rms(h[t, u])^-1 * (h[t, u] @ w)   (dynamic only; static: A = a0, beta = b0)
hc_read is OUT = 1 (a0 = A_m, w = W_m); hc_write is OUT = n (a0 = A_r, b0 = B, w = [W_r | W_beta]).

Why: compiled PyTorch makes about five passes over the fp32 streams per sublayer (the
coefficients' norm and thin projections, the mix, and in the backward the reductions that form
the coefficients' gradients), which made DHC at n = 4 take 2.08x the Pre-Norm step (H100,
docs/benchmarks.md run 8). Here each direction is one kernel: per block of tokens, a pass over d
forms the per-token reductions and a second pass over the same few tokens writes the mix; the
design counts on that second read hitting the L2 cache, so that the streams cross HBM about
once per direction (not yet measured on a GPU). Everything is computed in fp32, the
projections too (the twin rounds them to bf16 under autocast).

The backward writes per-program partial sums of the parameter gradients (summed here), not
atomics, so gradients are deterministic.
"""
from typing import Optional

import torch
import triton

from blocks.hyper_triton import bwd_kernel, fwd_kernel


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


# Launch settings: elements of a (tokens x streams x d) tile, warps per program. Not measured
# yet on a GPU; bench/hc_kernels.py sweeps them.
TUNE = {"tile": 1024, "chunk": 128, "warps_fwd": 4, "warps_bwd": 4}


def _meta(h, y, w, a0):
    n, d, out = h.shape[1], h.shape[2], a0.shape[1]
    k = w.shape[1] if w is not None else 0
    bd = min(TUNE["chunk"], _pow2(d))
    bt = max(1, min(16, TUNE["tile"] // (_pow2(n) * bd)))
    return dict(D=d, N=n, OUT=out, K=max(k, 1), NP=_pow2(n), OP=_pow2(out), KP=_pow2(max(k, 1)),
                DYN=w is not None, HAS_Y=y is not None, BT=bt, BD=bd)


def _or_dummy(t, like):
    return t if t is not None else like.new_zeros(1)


@torch.library.custom_op("lm_playground::hc_mix", mutates_args=())
def hc_mix(h: torch.Tensor, y: Optional[torch.Tensor], w: Optional[torch.Tensor], a0: torch.Tensor,
           b0: Optional[torch.Tensor], sa: Optional[torch.Tensor], sb: Optional[torch.Tensor],
           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [N, OUT, d] fp32, 1/rms [N, n], projections [N, n, K]) of contiguous h [N, n, d]."""
    meta = _meta(h, y, w, a0)
    out, r, q = _mix_outputs(h, w, a0)
    n_tok = h.shape[0]
    if n_tok:
        fwd_kernel[(triton.cdiv(n_tok, meta["BT"]),)](
            h, _or_dummy(y, h), _or_dummy(w, h), a0, _or_dummy(b0, h), _or_dummy(sa, h),
            _or_dummy(sb, h), out, r, q, n_tok, eps, num_warps=TUNE["warps_fwd"], **meta)
    return out, r, q


def _mix_outputs(h, w, a0):
    """hc_mix's empty outputs, for the op and its fake alike (static: no 1/rms, no projections)."""
    n_tok, n = h.shape[0], h.shape[1]
    return (h.new_empty((n_tok, a0.shape[1], h.shape[2]), dtype=torch.float32),
            h.new_empty((n_tok, n) if w is not None else (0, n), dtype=torch.float32),
            h.new_empty((n_tok, n, w.shape[1]) if w is not None else (0, n, 1), dtype=torch.float32))


@hc_mix.register_fake
def _(h, y, w, a0, b0, sa, sb, eps):
    return _mix_outputs(h, w, a0)


TPP = 16   # token blocks per backward program: fewer, larger partial sums of the weights' gradient


@torch.library.custom_op("lm_playground::hc_mix_backward", mutates_args=())
def hc_mix_backward(g: torch.Tensor, h: torch.Tensor, y: Optional[torch.Tensor], w: Optional[torch.Tensor],
                    a0: torch.Tensor, b0: Optional[torch.Tensor], sa: Optional[torch.Tensor],
                    sb: Optional[torch.Tensor], r: torch.Tensor, q: torch.Tensor,
                    acc: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """(dh, dy, dw, da0, db0, [ds_a, ds_b]); dy, dw, db0 are empty where y, w, b0 are None;
    acc (h's shape), where given, is added to dh."""
    meta = _meta(h, y, w, a0)
    n_tok = h.shape[0]
    tpp = max(1, min(TPP, triton.cdiv(n_tok, meta["BT"])))   # >= 1: an empty batch has 0 programs
    progs = triton.cdiv(n_tok, meta["BT"] * tpp)
    dh = torch.empty_like(h)
    dy = torch.empty_like(y) if y is not None else h.new_empty(0)
    f32 = dict(dtype=torch.float32, device=h.device)
    dw = torch.zeros((progs, meta["KP"], meta["D"]), **f32)
    da0 = torch.empty((progs, meta["NP"], meta["OP"]), **f32)
    db0 = torch.empty((progs, meta["OP"]), **f32)
    ds = torch.empty((progs, 2), **f32)
    if progs:
        bwd_kernel[(progs,)](g, h, _or_dummy(y, h), _or_dummy(w, h), a0, _or_dummy(b0, h),
                             _or_dummy(sa, h), _or_dummy(sb, h), r, q, _or_dummy(acc, h), dh,
                             dy if y is not None else h.new_empty(1), dw, da0, db0, ds, n_tok,
                             ACC=acc is not None, TPP=tpp, num_warps=TUNE["warps_bwd"], **meta)
    n, out = h.shape[1], a0.shape[1]
    dw = dw.sum(0)[: w.shape[1]].t().contiguous().to(w.dtype) if w is not None else h.new_empty(0)
    db0 = db0.sum(0)[:out].to(b0.dtype) if b0 is not None else h.new_empty(0)
    # contiguous: the padded buffers' slices have other strides than register_fake's empty_like
    return dh, dy, dw, da0.sum(0)[:n, :out].contiguous().to(a0.dtype), db0, ds.sum(0)


@hc_mix_backward.register_fake
def _(g, h, y, w, a0, b0, sa, sb, r, q, acc=None):
    return (torch.empty_like(h), torch.empty_like(y) if y is not None else h.new_empty(0),
            torch.empty_like(w) if w is not None else h.new_empty(0),
            torch.empty_like(a0), torch.empty_like(b0) if b0 is not None else h.new_empty(0),
            h.new_empty(2, dtype=torch.float32))


def _setup(ctx, inputs, output):
    h, y, w, a0, b0, sa, sb, _ = inputs
    ctx.save_for_backward(h, y, w, a0, b0, sa, sb, output[1], output[2])


def _backward(ctx, g, _gr, _gq):
    h, y, w, a0, b0, sa, sb, r, q = ctx.saved_tensors
    dh, dy, dw, da0, db0, ds = hc_mix_backward(g.contiguous(), h, y, w, a0, b0, sa, sb, r, q)
    return (dh, dy if y is not None else None, dw if w is not None else None, da0,
            db0 if b0 is not None else None, ds[0].to(sa.dtype) if sa is not None else None,
            ds[1].to(sb.dtype) if sb is not None else None, None)


hc_mix.register_autograd(_backward, setup_context=_setup)


def _flat(h: torch.Tensor) -> torch.Tensor:
    return h.reshape(-1, *h.shape[-2:]).contiguous()


class _Read(torch.autograd.Function):
    """hc_read as an autograd node of its own. Besides h_in it returns the streams themselves (a
    view), which the write of the same sublayer consumes: H's gradient from the write then
    arrives here and is added inside the backward kernel, instead of autograd adding H's two
    gradients in a pass of its own over the fp32 streams (two reads and a write)."""

    @staticmethod
    def forward(ctx, h, a_m, w_m, s_alpha, eps):
        hf = _flat(h)
        out, r, q = hc_mix(hf, None, w_m, a_m, None, s_alpha, None, eps)
        ctx.save_for_backward(hf, a_m, w_m, s_alpha, r, q)
        ctx.shape = h.shape
        ctx.set_materialize_grads(False)   # unused streams: None, not a tensor of zeros to add
        return out.view(*h.shape[:-2], h.shape[-1]), h.view_as(h)

    @staticmethod
    def backward(ctx, g, g_streams):
        hf, a_m, w_m, s_alpha, r, q = ctx.saved_tensors
        g = torch.zeros_like(hf[:, :1]) if g is None else g.reshape(hf.shape[0], 1, hf.shape[2])
        acc = None if g_streams is None else _flat(g_streams)
        dh, _, dw, da0, _, ds = hc_mix_backward(g.contiguous(), hf, None, w_m, a_m, None, s_alpha,
                                                None, r, q, acc)
        return (dh.view(ctx.shape), da0, dw if w_m is not None else None,
                ds[0].to(s_alpha.dtype) if s_alpha is not None else None, None)


def read(h, a_m, w_m=None, s_alpha=None, eps: float = 1e-6):
    """hc_read: (..., n, d) streams -> ((..., d) fp32 h_in, the streams as a view for the write
    of the same sublayer); static when w_m is None."""
    return _Read.apply(h, a_m.contiguous(), w_m.contiguous() if w_m is not None else None,
                       s_alpha if w_m is not None else None, eps)


def write(h, y, a_r, beta, w_r=None, w_beta=None, s_alpha=None, s_beta=None,
          eps: float = 1e-6) -> torch.Tensor:
    """hc_write: H' = A_r^T H + beta y of (..., n, d) streams and (..., d) y, fp32; static when
    w_r is None."""
    w = torch.cat([w_r, w_beta], 1) if w_r is not None else None
    out, _, _ = hc_mix(_flat(h), y.reshape(-1, y.shape[-1]).contiguous(), w, a_r.contiguous(),
                       beta.reshape(-1).contiguous(),
                       s_alpha if w is not None else None, s_beta if w is not None else None, eps)
    return out.view(h.shape)
