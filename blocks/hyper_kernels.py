"""Fused Triton kernels of static and dynamic hyper-connections: `impl: triton` on hc_read and
hc_write (frac 1, at most
hyper.MAX_FUSED_STREAMS streams: the kernels unroll over them). Imported only where that impl is asked for (it needs the triton package).

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
once per direction (not yet measured on a GPU). Everything is computed in
fp32, the projections too (the twin rounds them to bf16 under autocast).

The backward writes per-program partial sums of the parameter gradients (summed here), not
atomics, so gradients are deterministic. Loop bounds over d are compile-time constants, which
Triton's CPU interpreter needs (the tests run the kernels there with TRITON_INTERPRET=1).
"""
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh in fp32: 2 sigmoid(2x) - 1 loses relative precision near 0 (7e-3 at |x| = 1e-5, where
    the dynamic weights start), so a Taylor polynomial there (its error < 1e-10 below 0.05)."""
    x2 = x * x
    return tl.where(tl.abs(x) < 0.05, x * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0))),
                    2.0 * tl.sigmoid(2.0 * x) - 1.0)


@triton.jit
def _pick(x, idx, i, axis: tl.constexpr):
    """x's slice i along `axis` (idx: that axis's index, broadcastable to x)."""
    return tl.sum(tl.where(idx == i, x, 0.0), axis=axis)


@triton.jit
def _coefficients(q, r, a0_ptr, b0_ptr, sa, sb, u, o, k,
                  N: tl.constexpr, OUT: tl.constexpr, DYN: tl.constexpr, HAS_Y: tl.constexpr):
    """A [BT, NP, OP], beta [BT, OP] and tanh(z) [BT, NP, KP] from the projections q and 1/rms r."""
    o3, k3 = o[None, None, :], k[None, None, :]
    a0 = tl.load(a0_ptr + u[:, None] * OUT + o[None, :], mask=(u[:, None] < N) & (o[None, :] < OUT),
                 other=0.0).to(tl.float32)
    th = _tanh(q * r[:, :, None])
    a = a0[None, :, :] + tl.zeros_like(r)[:, :, None]
    beta = 0.0 * tl.sum(a, axis=1)
    if DYN:
        for i in tl.static_range(OUT):
            a += tl.where(o3 == i, sa * _pick(th, k3, i, 2)[:, :, None], 0.0)
    if HAS_Y:   # OUT = n: beta of output stream o comes from stream o's own column OUT
        beta += tl.load(b0_ptr + o, mask=o < OUT, other=0.0).to(tl.float32)[None, :]
        if DYN:
            beta += sb * _pick(th, k3, OUT, 2)
    return a, beta, th


@triton.jit
def _row(ptr, t64, tm, dd, d0, i, ROWS: tl.constexpr, D: tl.constexpr):
    """Row i of each token's (ROWS, D) slab, columns d0 + dd: [BT, BD] in fp32."""
    return tl.load(ptr + (t64[:, None] * ROWS + i) * D + d0 + dd[None, :],
                   mask=tm[:, None] & (d0 + dd[None, :] < D), other=0.0).to(tl.float32)


@triton.jit
def _grad_tile(g_ptr, t64, tm, o, dd, d0, OUT: tl.constexpr, D: tl.constexpr):
    """The output gradient's chunk [BT, OP, BD]."""
    o3, d3 = o[None, :, None], dd[None, None, :]
    return tl.load(g_ptr + (t64[:, None, None] * OUT + o3) * D + d0 + d3,
                   mask=tm[:, None, None] & (o3 < OUT) & (d0 + d3 < D), other=0.0).to(tl.float32)


@triton.jit
def _hc_fwd(h_ptr, y_ptr, w_ptr, a0_ptr, b0_ptr, sa_ptr, sb_ptr, out_ptr, r_ptr, q_ptr, n_tok, eps,
            D: tl.constexpr, N: tl.constexpr, OUT: tl.constexpr, K: tl.constexpr,
            NP: tl.constexpr, OP: tl.constexpr, KP: tl.constexpr,
            DYN: tl.constexpr, HAS_Y: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    u, o, k, dd = tl.arange(0, NP), tl.arange(0, OP), tl.arange(0, KP), tl.arange(0, BD)
    tm = t < n_tok
    t64 = t.to(tl.int64)
    u3, k3, d3 = u[None, :, None], k[None, None, :], dd[None, None, :]
    tu = tm[:, None] & (u[None, :] < N)
    q = tl.zeros((BT, NP, KP), tl.float32)
    r = tl.zeros((BT, NP), tl.float32)
    sa, sb = 0.0, 0.0
    if DYN:   # pass 1: each stream's sum of squares and its projections onto w's K columns
        ss = tl.zeros((BT, NP), tl.float32)
        for d0 in range(0, D, BD):
            x = tl.load(h_ptr + (t64[:, None, None] * N + u3) * D + d0 + d3,
                        mask=tu[:, :, None] & (d0 + d3 < D), other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=2)
            for i in tl.static_range(K):
                wi = tl.load(w_ptr + (d0 + dd) * K + i, mask=d0 + dd < D, other=0.0).to(tl.float32)
                q += tl.where(k3 == i, tl.sum(x * wi[None, None, :], axis=2)[:, :, None], 0.0)
        r = tl.where(tu, tl.rsqrt(ss / D + eps), 0.0)
        tl.store(r_ptr + t64[:, None] * N + u[None, :], r, mask=tu)
        tl.store(q_ptr + (t64[:, None, None] * N + u3) * K + k3, q, mask=tu[:, :, None] & (k3 < K))
        sa = tl.load(sa_ptr).to(tl.float32)
        if HAS_Y:
            sb = tl.load(sb_ptr).to(tl.float32)
    a, beta, th = _coefficients(q, r, a0_ptr, b0_ptr, sa, sb, u, o, k, N, OUT, DYN, HAS_Y)
    om = (o[None, :, None] < OUT) & tm[:, None, None]
    for d0 in range(0, D, BD):   # pass 2: the mix (the block's streams should still be in L2)
        acc = tl.zeros((BT, OP, BD), tl.float32)
        for i in tl.static_range(N):
            acc += _pick(a, u3, i, 1)[:, :, None] * _row(h_ptr, t64, tm, dd, d0, i, N, D)[:, None, :]
        if HAS_Y:
            acc += beta[:, :, None] * _row(y_ptr, t64, tm, dd, d0, 0, 1, D)[:, None, :]
        tl.store(out_ptr + (t64[:, None, None] * OUT + o[None, :, None]) * D + d0 + d3, acc,
                 mask=om & (d0 + d3 < D))


@triton.jit
def _bwd_dots(g_ptr, h_ptr, y_ptr, dy_ptr, beta, t64, tm, u, o, dd, BT: tl.constexpr,
              D: tl.constexpr, N: tl.constexpr, OUT: tl.constexpr, NP: tl.constexpr,
              OP: tl.constexpr, HAS_Y: tl.constexpr, BD: tl.constexpr):
    """Pass 1: dA[t, u, o] = <g[t, o], h[t, u]> and dbeta[t, o] = <g[t, o], y[t]>; writes
    dy = beta^T g on the way."""
    u3 = u[None, :, None]
    da = tl.zeros((BT, NP, OP), tl.float32)
    dbeta = tl.zeros((BT, OP), tl.float32)
    for d0 in range(0, D, BD):
        g = _grad_tile(g_ptr, t64, tm, o, dd, d0, OUT, D)
        for i in tl.static_range(N):
            x = _row(h_ptr, t64, tm, dd, d0, i, N, D)
            da += tl.where(u3 == i, tl.sum(x[:, None, :] * g, axis=2)[:, None, :], 0.0)
        if HAS_Y:
            yv = _row(y_ptr, t64, tm, dd, d0, 0, 1, D)
            dbeta += tl.sum(g * yv[:, None, :], axis=2)
            tl.store(dy_ptr + t64[:, None] * D + d0 + dd[None, :],
                     tl.sum(beta[:, :, None] * g, axis=1).to(dy_ptr.dtype.element_ty),
                     mask=tm[:, None] & (d0 + dd[None, :] < D))
    return da, dbeta


@triton.jit
def _through_tanh(da, dbeta, th, q, r, sa, sb, o, k, OUT: tl.constexpr, HAS_Y: tl.constexpr,
                  D: tl.constexpr):
    """From the coefficients' gradients through tanh, the projection and the norm: dq (the
    projections' gradient, already divided by rms), c (dh's share along h: d(1/rms)/dh is
    -h / (D rms^3)), and the scales' gradients of this block (per stream)."""
    o3, k3 = o[None, None, :], k[None, None, :]
    dth = tl.zeros_like(th)
    for i in tl.static_range(OUT):
        dth += tl.where(k3 == i, _pick(da, o3, i, 2)[:, :, None], 0.0)
    dsa = tl.sum(tl.sum(dth * th, axis=2), axis=0)
    dsb = 0.0 * dsa
    dth = dth * sa
    if HAS_Y:   # OUT = n, so dbeta's index o is the stream index u
        dsb += tl.sum(dbeta * _pick(th, k3, OUT, 2), axis=0)
        dth += tl.where(k3 == OUT, sb * dbeta[:, :, None], 0.0)
    dz = dth * (1.0 - th * th)
    c = -tl.sum(dz * q, axis=2) * r * r * r / D
    return dz * r[:, :, None], c, dsa, dsb


@triton.jit
def _bwd_dh(g_ptr, h_ptr, w_ptr, acc_ptr, dh_ptr, dw_row, a, dq, c, t64, tm, u, o, k, dd,
            D: tl.constexpr, N: tl.constexpr, OUT: tl.constexpr, K: tl.constexpr,
            KP: tl.constexpr, DYN: tl.constexpr, ACC: tl.constexpr, BD: tl.constexpr):
    """Pass 2: dh[t, u] = sum_o A[t, u, o] g[t, o] + dq[t, u] w^T + c[t, u] h[t, u] (+ acc, the
    gradient H has from elsewhere), and the weights' gradient h^T dq added to this program's own
    row dw_row (no other program writes it)."""
    u3 = u[None, :, None]
    for d0 in range(0, D, BD):
        dm = d0 + dd < D
        g = _grad_tile(g_ptr, t64, tm, o, dd, d0, OUT, D)
        wt = tl.zeros((KP, BD), tl.float32)
        dwc = tl.zeros((KP, BD), tl.float32)
        if DYN:
            wt = tl.load(w_ptr + (d0 + dd[None, :]) * K + k[:, None],
                         mask=(k[:, None] < K) & dm[None, :], other=0.0).to(tl.float32)
        for i in tl.static_range(N):
            dx = tl.sum(_pick(a, u3, i, 1)[:, :, None] * g, axis=1)
            if ACC:
                dx += _row(acc_ptr, t64, tm, dd, d0, i, N, D)
            if DYN:
                x = _row(h_ptr, t64, tm, dd, d0, i, N, D)
                dqi = _pick(dq, u3, i, 1)
                dx += tl.sum(dqi[:, :, None] * wt[None, :, :], axis=1)
                dx += _pick(c, u[None, :], i, 1)[:, None] * x
                dwc += tl.sum(dqi[:, :, None] * x[:, None, :], axis=0)
            tl.store(dh_ptr + (t64[:, None] * N + i) * D + d0 + dd[None, :],
                     dx.to(dh_ptr.dtype.element_ty), mask=tm[:, None] & dm[None, :])
        if DYN:
            wp = dw_row + k[:, None] * D + d0 + dd[None, :]
            tl.store(wp, tl.load(wp, mask=dm[None, :], other=0.0) + dwc, mask=dm[None, :])


@triton.jit
def _hc_bwd(g_ptr, h_ptr, y_ptr, w_ptr, a0_ptr, b0_ptr, sa_ptr, sb_ptr, r_ptr, q_ptr, acc_ptr,
            dh_ptr, dy_ptr, dw_ptr, da0_ptr, db0_ptr, ds_ptr, n_tok,
            D: tl.constexpr, N: tl.constexpr, OUT: tl.constexpr, K: tl.constexpr,
            NP: tl.constexpr, OP: tl.constexpr, KP: tl.constexpr,
            DYN: tl.constexpr, HAS_Y: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
            BD: tl.constexpr, TPP: tl.constexpr):
    """TPP blocks of BT tokens per program; the parameter gradients go to this program's row
    of the partial buffers (dw: [programs, KP, D], zeroed by the caller)."""
    pid = tl.program_id(0)
    u, o, k, dd = tl.arange(0, NP), tl.arange(0, OP), tl.arange(0, KP), tl.arange(0, BD)
    u3, k3 = u[None, :, None], k[None, None, :]
    sa, sb = 0.0, 0.0
    if DYN:
        sa = tl.load(sa_ptr).to(tl.float32)
        if HAS_Y:
            sb = tl.load(sb_ptr).to(tl.float32)
    da0 = tl.zeros((NP, OP), tl.float32)
    db0 = tl.zeros((OP,), tl.float32)
    dsa = tl.zeros((NP,), tl.float32)
    dsb = tl.zeros((NP,), tl.float32)
    for j in range(TPP):   # a loop, not unrolled: TPP sets how many partial sums there are
        t = (pid * TPP + j) * BT + tl.arange(0, BT)
        tm = t < n_tok
        t64 = t.to(tl.int64)
        tu = tm[:, None] & (u[None, :] < N)
        q = tl.zeros((BT, NP, KP), tl.float32)
        r = tl.zeros((BT, NP), tl.float32)
        if DYN:
            r = tl.load(r_ptr + t64[:, None] * N + u[None, :], mask=tu, other=0.0)
            q = tl.load(q_ptr + (t64[:, None, None] * N + u3) * K + k3,
                        mask=tu[:, :, None] & (k3 < K), other=0.0)
        a, beta, th = _coefficients(q, r, a0_ptr, b0_ptr, sa, sb, u, o, k, N, OUT, DYN, HAS_Y)
        da, dbeta = _bwd_dots(g_ptr, h_ptr, y_ptr, dy_ptr, beta, t64, tm, u, o, dd, BT, D, N, OUT,
                              NP, OP, HAS_Y, BD)
        da0 += tl.sum(da, axis=0)
        db0 += tl.sum(dbeta, axis=0)
        dq = tl.zeros((BT, NP, KP), tl.float32)
        c = tl.zeros((BT, NP), tl.float32)
        if DYN:
            dq, c, dsa_j, dsb_j = _through_tanh(da, dbeta, th, q, r, sa, sb, o, k, OUT, HAS_Y, D)
            dsa += dsa_j
            dsb += dsb_j
        _bwd_dh(g_ptr, h_ptr, w_ptr, acc_ptr, dh_ptr, dw_ptr + pid * KP * D, a, dq, c, t64, tm,
                u, o, k, dd, D, N, OUT, K, KP, DYN, ACC, BD)
    tl.store(da0_ptr + (pid * NP + u[:, None]) * OP + o[None, :], da0)
    tl.store(db0_ptr + pid * OP + o, db0)
    tl.store(ds_ptr + pid * 2 + tl.arange(0, 2),
             tl.where(tl.arange(0, 2) == 0, tl.sum(dsa), tl.sum(dsb)))


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
    n_tok, n = h.shape[0], h.shape[1]
    out = h.new_empty((n_tok, a0.shape[1], h.shape[2]), dtype=torch.float32)
    r = h.new_empty((n_tok, n) if w is not None else (0, n), dtype=torch.float32)
    q = h.new_empty((n_tok, n, w.shape[1]) if w is not None else (0, n, 1), dtype=torch.float32)
    grid = (triton.cdiv(n_tok, meta["BT"]),)
    if n_tok:
        _hc_fwd[grid](h, _or_dummy(y, h), _or_dummy(w, h), a0, _or_dummy(b0, h), _or_dummy(sa, h),
                      _or_dummy(sb, h), out, r, q, n_tok, eps, num_warps=TUNE["warps_fwd"], **meta)
    return out, r, q


@hc_mix.register_fake
def _(h, y, w, a0, b0, sa, sb, eps):
    n_tok, n = h.shape[0], h.shape[1]
    return (h.new_empty((n_tok, a0.shape[1], h.shape[2]), dtype=torch.float32),
            h.new_empty((n_tok, n) if w is not None else (0, n), dtype=torch.float32),
            h.new_empty((n_tok, n, w.shape[1]) if w is not None else (0, n, 1), dtype=torch.float32))


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
        _hc_bwd[(progs,)](g, h, _or_dummy(y, h), _or_dummy(w, h), a0, _or_dummy(b0, h),
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
    keep = lambda t, grad: grad if t is not None else None  # noqa: E731
    return (dh, keep(y, dy), keep(w, dw), da0, keep(b0, db0),
            keep(sa, ds[0].to(sa.dtype) if sa is not None else None),
            keep(sb, ds[1].to(sb.dtype) if sb is not None else None), None)


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
