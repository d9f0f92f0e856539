"""The Triton kernels behind blocks/hyper_kernels.py (its docstring says what they compute): per
block of tokens, a pass over d for the per-token reductions, then a second pass over the same
tokens for the mix (forward) or for dH and the weights' gradient (backward). Loop bounds over d
are compile-time constants, which Triton's CPU interpreter needs (the tests run the kernels there
with TRITON_INTERPRET=1)."""
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
def fwd_kernel(h_ptr, y_ptr, w_ptr, a0_ptr, b0_ptr, sa_ptr, sb_ptr, out_ptr, r_ptr, q_ptr, n_tok, eps,
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
def bwd_kernel(g_ptr, h_ptr, y_ptr, w_ptr, a0_ptr, b0_ptr, sa_ptr, sb_ptr, r_ptr, q_ptr, acc_ptr,
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
