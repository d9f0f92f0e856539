"""The tensor math of hyper-connections, shared by the blocks in blocks/hyper.py.

Layout: a residual of n streams, each split into m fractions, is a tensor (..., U, w) of
U = n*m pieces of width w = d/m; piece u is stream u // m, fraction u % m. A connection matrix
A (..., U_in, U_out) maps pieces to pieces: out[t] = sum_u A[u, t] * x[u] (`mix`).
"""
from __future__ import annotations

import torch


def mix(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out[..., t, :] = sum_u a[..., u, t] * x[..., u, :].

    A broadcast multiply-and-sum, not a matmul: under bf16 autocast a matmul would round the
    fp32 residual streams to bf16 on every sublayer, and with n <= 8 the product is
    bandwidth-bound anyway (torch.compile fuses it into one kernel)."""
    dtype = torch.promote_types(a.dtype, x.dtype)  # fp32 coefficients keep a bf16 y's update fp32
    a, x = a.to(dtype), x.to(dtype)
    if a.shape[-2] == 1:  # one input piece (B of plain HC): an outer product, nothing to sum
        return a.squeeze(-2).unsqueeze(-1) * x
    if a.dim() == 2:
        # static coefficients (no batch dims): U pointwise terms, which Inductor fuses into one
        # kernel; the broadcast-and-sum form took 3.2x as long for forward + backward and made
        # the SHC model's step 2.2x slower (H200, docs/benchmarks.md); with per-token (dynamic)
        # coefficients the sum is the faster form
        out = a[0, :, None] * x[..., 0:1, :]
        for u in range(1, a.shape[0]):
            out = out + a[u, :, None] * x[..., u:u + 1, :]
        return out
    return (a.unsqueeze(-1) * x.unsqueeze(-2)).sum(dim=-3)


def rms_normed(x: torch.Tensor, eps: float, dims: int = 1) -> torch.Tensor:
    """x / rms(x) over the last `dims` dimensions, without a gain, in at least fp32.

    The dynamic connections read this normed copy; the mixing itself uses the raw x."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if dims > 1:
        x = x.flatten(-dims)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Sinkhorn-Knopp on exp(logits) over the last two dims: `iters` rounds of row then column
    normalisation, giving a (nearly) doubly stochastic matrix; computed in at least fp32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(dtype)
    # the first row normalisation is blind to a constant per row: subtracting each row's max
    # keeps exp finite and every row's sum >= 1 (a per-matrix max let a row whose logits lay ~90
    # below the matrix's max underflow to zeros, and 0 / 0 made the whole stream mix NaN)
    p = torch.exp(z - z.amax(dim=-1, keepdim=True).detach())
    for _ in range(iters):
        p = p / p.sum(dim=-1, keepdim=True)
        p = p / p.sum(dim=-2, keepdim=True)
    return p


def mhc_pre(h, proj, bias, scale, eps: float) -> torch.Tensor:
    """mHC's pre gate H_pre (..., n) = sigmoid(scale * x~ proj + bias), x~ = RMSNorm(vec H)."""
    x = rms_normed(h, eps, dims=2)
    return torch.sigmoid(scale * (x.to(proj.dtype) @ proj) + bias)


def mhc_post(h, proj, bias, scale, eps: float) -> torch.Tensor:
    """mHC's post gate H_post (..., n) = 2 sigmoid(scale * x~ proj + bias)."""
    x = rms_normed(h, eps, dims=2).to(proj.dtype)
    return 2 * torch.sigmoid(scale * (x @ proj) + bias)


def mhc_res(h, proj, bias, scale, eps: float, iters: int) -> torch.Tensor:
    """mHC's H_res (..., n, n) = Sinkhorn(scale * mat(x~ proj) + bias); x'_i = sum_j H_res[i, j] x_j."""
    n = h.shape[-2]
    x = rms_normed(h, eps, dims=2).to(proj.dtype)
    return sinkhorn(scale * (x @ proj).unflatten(-1, (n, n)) + bias, iters)


def mhc_read(h, proj, bias, scale, eps: float) -> torch.Tensor:
    """mHC's width connection (..., n, d) -> (..., d): h_in = sum_i H_pre[i] H_i."""
    return mix(mhc_pre(h, proj, bias, scale, eps).unsqueeze(-1), h).flatten(-2)


def mhc_write(h, y, res_proj, res_bias, res_scale, post_proj, post_bias, post_scale, eps: float,
              iters: int) -> torch.Tensor:
    """mHC's depth and width connection: H' = H_res H + H_post^T y, (..., n, d)."""
    # post before res: this order fixes autograd's summation order of h's gradient (bitwise
    # what the block computed before Liger's op was added)
    post = mhc_post(h, post_proj, post_bias, post_scale, eps)
    res = mhc_res(h, res_proj, res_bias, res_scale, eps, iters)
    return mix(res.transpose(-1, -2), h) + mix(post.unsqueeze(-2), split(y, 1))


def split(x: torch.Tensor, m: int) -> torch.Tensor:
    """(..., d) -> (..., m, d/m): the fractions of a hidden state."""
    return x.unflatten(-1, (m, x.shape[-1] // m))


def expand(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(..., d) -> (..., n*m, d/m): n copies of x, each split into m fractions."""
    if m == 1:
        return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    pieces = split(x, m)
    return pieces.unsqueeze(-3).expand(*pieces.shape[:-2], n, m, pieces.shape[-1]).flatten(-3, -2)


def collapse(h: torch.Tensor, m: int) -> torch.Tensor:
    """(..., n*m, w) -> (..., m*w): the sum of the n streams, fractions joined back."""
    streams = h.unflatten(-2, (h.shape[-2] // m, m))
    return streams.sum(dim=-3).flatten(-2)
