"""Kernel backends for basic ops: Liger-Kernel's Triton kernels and their plain-PyTorch twins.

A block with an `impl` field calls `run(op, impl, *args)`:
- `torch`: the twin (blocks/twins.py; CPU, tests, the reference; what every graph used before).
- `liger`: the Liger kernel; an error where it cannot run (no CUDA, liger-kernel missing).
- `auto`: the twin where Liger cannot run; on CUDA, whichever of the two a micro-benchmark
  (forward + backward on random inputs of the same shapes) finds faster, decided once per op,
  device, dtype, shapes and context and cached. Eager calls compare Liger with the eager twin.
  A compiled model takes the twin for every op inside its regions, unbenchmarked. Only an op
  whose Liger kernel runs outside the regions (fused linear cross-entropy) is benchmarked there,
  against the *compiled* twin: before the first step of such a model (`decides_when_compiled`),
  `graphs.compile` runs it once eagerly with `decide_compiled`, which decides on the real
  shapes; the trace then reads the decision (nothing is benchmarked while tracing; a missing
  decision takes the twin). Inside a region a Liger kernel is an
  opaque call that breaks Inductor's fusions, and torch 2.11's Dynamo cannot analyse Liger's
  Triton kernels ("'float' object has no attribute 'to'"), so it treats their inputs as mutated.
  Measured on the H100 (docs/benchmarks.md, runs 6 and 7): Liger's RMSNorm chosen at batch 32
  made llama@auto 3.4% slower than the twin; with the norms and RoPE kept on the twin and SwiGLU
  and cross-entropy still benchmarked, llama@auto ran 7-8% slower at batch 16 and 32.

`liger_kernel` is imported lazily, only when a Liger path runs. Pitfalls handled here (see
architectures.md §6): RMSNorm runs with in_place=False (in-place writes dX into the dY buffer);
cross-entropy never overwrites logits that other ops may read (Liger stores the gradient in its
input: we pass inplace=False where the version has it, else a copy); fused linear cross-entropy
accumulates the weight gradient in fp32 (accum_dtype; bf16 accumulation diverges) and runs
outside compiled regions (it fails inside one on torch 2.11 + liger-kernel 0.8.5). Liger's
LayerNorm defaults (eps 1e-6, no bias) never apply: our blocks pass their own eps and bias.
mHC (hc_read / hc_write, mode mhc): our parameters are laid into Liger's fused phi / b / alphas
(`mhc_liger_args`) with pre_eps 0, sinkhorn_eps 0 and post_mult 2, which is our math exactly.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import time

import torch

from blocks.twins import TWINS

IMPLS = ("torch", "liger", "auto")
IMPL_DOC = ("kernel backend: torch (the plain twin), liger (Liger-Kernel's Triton kernel, CUDA "
            "only), auto (the faster of the two on CUDA by a cached micro-benchmark, else torch)")


# ----- the Liger side (imported only when called)

def _functional():
    from liger_kernel.transformers import functional
    return functional


def liger_rms_norm(x, weight, eps):
    w = weight if weight is not None else torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    return _functional().liger_rms_norm(x, w, eps, 0.0, "llama", False)   # in_place=False


def liger_layer_norm(x, weight, bias, eps):
    b = bias if bias is not None else torch.zeros_like(weight)
    return _functional().liger_layer_norm(x, weight, b, eps)


def liger_rope(q, k, cos, sin):
    # the kernels index rows of contiguous memory: our q/k are transposed views
    return _functional().liger_rope(q.contiguous(), k.contiguous(), cos[None], sin[None])


def liger_swiglu(gate, up):
    return _functional().liger_swiglu(gate.contiguous(), up.contiguous())


def liger_geglu(gate, up):
    return _functional().liger_geglu(gate.contiguous(), up.contiguous())


@functools.cache
def _ce_module(ignore_index):
    from liger_kernel.transformers import LigerCrossEntropyLoss
    kw = {"inplace": False} if "inplace" in inspect.signature(LigerCrossEntropyLoss).parameters else {}
    return LigerCrossEntropyLoss(ignore_index=ignore_index, **kw), bool(kw)


def liger_cross_entropy(logits, targets, ignore_index):
    loss, safe = _ce_module(ignore_index)
    # without inplace=False Liger writes the gradient into its input during forward
    return loss(logits if safe else logits.clone(), targets)


@functools.cache
def _flce_module(ignore_index):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, accum_dtype=torch.float32)


@torch.compiler.disable  # fails inside a compiled region (torch 2.11, liger-kernel 0.8.5)
def liger_linear_cross_entropy(x, weight, targets, ignore_index, chunk: int = 4096):
    return _flce_module(ignore_index)(weight, x, targets)   # Liger takes the weight first


def mhc_liger_args(n: int, pre=None, post=None, res=None):
    """Liger's (phi [n*d, n*n + 2n], b [n*n + 2n], alpha_pre, alpha_post, alpha_res) from our
    (proj, bias, scale) of the pre, post and residual gates. Liger computes all three from one
    phi, columns [pre | post | res], res row-major (row = output stream), as our proj / bias; a
    gate left out gets zero columns and a zero scale (the caller discards its output)."""
    like = next(g for g in (pre, post, res) if g is not None)[0]
    parts = []
    for gate, width in ((pre, n), (post, n), (res, n * n)):
        proj, bias, scale = gate or (like.new_zeros(like.shape[0], width), like.new_zeros(width),
                                     like.new_zeros(()))
        parts.append((proj, bias.flatten(), scale))
    return (torch.cat([p for p, _, _ in parts], 1), torch.cat([b for _, b, _ in parts]),
            *(a for _, _, a in parts))


def _mhc_options(eps, iters):
    # ours: no eps after the pre sigmoid or in Sinkhorn, post gate 2 sigmoid; fp32 streams allowed
    return dict(allow_fp32=True, tmax=iters, rms_eps=eps, pre_eps=0.0, sinkhorn_eps=0.0, post_mult=2.0)


def mhc_unsupported(n: int, dtype: torch.dtype = torch.float32) -> str | None:
    """Why Liger's mHC kernels cannot compute our mHC on n streams of this dtype (None: they can)."""
    if n & (n - 1):
        return (f"{n} streams: Liger's mHC kernels index the streams with tl.arange, which takes "
                "a power of two")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"streams of dtype {dtype}: Liger's mHC takes fp32, bf16 or fp16"
    return None


def liger_mhc_read(h, proj, bias, scale, eps):
    f = _functional()
    x = h.to(torch.promote_types(h.dtype, proj.dtype))   # the twin's output dtype
    args = mhc_liger_args(h.shape[-2], pre=(proj, bias, scale))
    # H_res is discarded here: one Sinkhorn step (tmax 1) saves the iterations and their history
    pre, _, _ = f.liger_mhc_coeffs(x, *args, **_mhc_options(eps, 1))
    return f.liger_mhc_pre(x, pre)


def liger_mhc_write(h, y, res_proj, res_bias, res_scale, post_proj, post_bias, post_scale, eps, iters):
    f = _functional()
    # the twin's H_res is fp32, so its output is fp32 for any stream dtype; Liger returns x's dtype
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    args = mhc_liger_args(h.shape[-2], post=(post_proj, post_bias, post_scale),
                          res=(res_proj, res_bias, res_scale))
    _, post, res = f.liger_mhc_coeffs(x, *args, **_mhc_options(eps, iters))
    return f.liger_mhc_post_res(x, y, post, res)


LIGER = {"rms_norm": liger_rms_norm, "layer_norm": liger_layer_norm, "rope": liger_rope,
         "swiglu": liger_swiglu, "geglu": liger_geglu, "cross_entropy": liger_cross_entropy,
         "linear_cross_entropy": liger_linear_cross_entropy,
         "mhc_read": liger_mhc_read, "mhc_write": liger_mhc_write}


# ----- selection

# looked up once (find_spec does not import it): a constant torch.compile can trace past
LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None


def liger_installed() -> bool:
    return LIGER_INSTALLED


def can_run(device: torch.device) -> bool:
    return device.type == "cuda" and LIGER_INSTALLED


# ops whose Liger kernel runs outside compiled regions: for a compiled model, auto benchmarks
# only these (any other op takes the twin there; see the module docstring)
RUN_OUTSIDE_REGIONS = frozenset({"linear_cross_entropy"})

_AUTO: dict[tuple, str] = {}   # (op, device, dtype, shapes, statics, context) -> "torch" | "liger"


def _key(op, args):
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    statics = tuple(a for a in args if not isinstance(a, torch.Tensor) and a is not None)
    return (op, str(tensors[0].device), tensors[0].dtype, tuple(tuple(t.shape) for t in tensors), statics)


def _fresh(args):
    """Random stand-ins for args (same shapes and dtypes; ids stay ids), with grads where needed."""
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif a.is_floating_point():
            out.append(torch.randn_like(a).requires_grad_(a.requires_grad))
        else:
            out.append(a.clone())
    return out


def _time(fn, args, reps: int = 5) -> float:
    """Best wall time of fn's forward + backward over `reps` calls after one warm-up call."""
    cuda = any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = float("inf")
    for _ in range(reps + 1):   # the first call warms up (Triton compiles there)
        xs = _fresh(args)
        sync()
        t0 = time.perf_counter()
        out = fn(*xs)
        out = out if isinstance(out, tuple) else (out,)
        grads = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        if grads:
            torch.autograd.backward([o.float().sum() for o in out], inputs=grads)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def _compiled_twin(op: str):
    return torch.compile(TWINS[op], dynamic=False)


@torch.enable_grad()  # a first call under no_grad (evaluation) still times the backward
def benchmark(op: str, args, compiled: bool = False) -> str:
    """'liger' or 'torch', whichever runs op's forward + backward faster on these shapes; with
    `compiled`, against the twin compiled by torch.compile (its first call, the compile, is the
    warm-up that `_time` does not count)."""
    twin = _compiled_twin(op) if compiled else TWINS[op]
    # saving tensors again (over decide_compiled's drop); compiling again (it runs force_eager)
    with torch.autograd.graph.saved_tensors_hooks(_same, _same), torch.compiler.set_stance("default"):
        return "liger" if _time(LIGER[op], args) < _time(twin, args) else "torch"


def _same(t):
    return t


def _drop(t):
    return None


_DECIDING = False   # True while decide_compiled runs: decisions are for the compiled model


def decide_compiled(model, *args, **kwargs) -> None:
    """Run `model` once eagerly so that every `auto` op decides, for the compiled model, between
    Liger and the compiled twin on the shapes of this call (graphs.compile calls it before a
    compiled model's first step, with that step's inputs, under its autocast)."""
    global _DECIDING
    _DECIDING = True
    try:
        # with gradients, so that each op's inputs require grad as in training (the benchmark
        # times the backward it will need), but saving no activations: there is no backward
        with torch.compiler.set_stance("force_eager"), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(_drop, _drop):
            model(*args, **kwargs)
    finally:
        _DECIDING = False


def decides_when_compiled(model) -> bool:
    """Whether a built model, compiled, has an auto choice to make here: a node with impl auto
    whose Liger kernel runs outside the regions (the others take the twin without a benchmark,
    so the eager decision pass of `decide_compiled` would only cost time)."""
    params = list(model.parameters())
    if not params or not can_run(params[0].device):
        return False
    return any(getattr(m, "type_name", None) in RUN_OUTSIDE_REGIONS
               and getattr(getattr(m, "cfg", None), "impl", None) == "auto" for m in model.modules())


def choose(op: str, impl: str, args) -> str:
    if impl == "torch":
        return "torch"
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type == "meta":  # shapes only (cost analysis): the twin has the same shapes and FLOPs
        return "torch"
    if impl == "liger":
        if not can_run(device):
            raise RuntimeError(f"impl liger for {op} needs CUDA and liger-kernel "
                               f"(device {device}, liger-kernel installed: {liger_installed()})")
        return "liger"
    if not can_run(device):
        return "torch"
    tracing = torch.compiler.is_compiling()
    if (tracing or _DECIDING) and op not in RUN_OUTSIDE_REGIONS:
        return "torch"
    key = (*_key(op, args), "compiled" if tracing or _DECIDING else "eager")
    if key not in _AUTO:
        if tracing:
            return "torch"   # never benchmark while tracing (see decide_compiled)
        _AUTO[key] = benchmark(op, args, compiled=_DECIDING)
    return _AUTO[key]


def run(op: str, impl: str, *args):
    """op(*args) by the backend `impl` selects (see the module docstring)."""
    fn = LIGER[op] if choose(op, impl, args) == "liger" else TWINS[op]
    return fn(*args)
