"""The fused Triton kernels of static and dynamic hyper-connections (impl triton,
blocks/hyper_kernels.py) against the plain-PyTorch blocks: outputs and every gradient, block by
block and through a whole model. Without a GPU they run in Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest.py); the test install brings the triton package, so a
missing one fails here rather than skipping."""
from __future__ import annotations

import pytest
import torch

import blocks
import graphs
from blocks.kinds import hidden, streams
from blocks.registry import Context
from graphs.errors import GraphError

from conftest import logits_and_loss
from test_hyper import batch, hyper, perturb

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32 = dict(rtol=1e-4, atol=1e-5)


def first(out):
    """hc_read gives (h_in, the streams for its write): h_in; hc_write gives H'."""
    return out[0] if isinstance(out, tuple) else out


def pair(kind: str, mode: str, n: int, d: int):
    """The block of `kind` with impl triton and its torch twin, sharing perturbed parameters."""
    cls = blocks.get(kind)
    ins = [streams(n, d)] + ([hidden(d)] if kind == "hc_write" else [])
    made = []
    for impl in ("triton", "torch"):
        blk = cls(cls.Config(mode=mode, impl=impl), ins, Context("x", layer=1, n_layer=2)).to(DEV)
        blk.init_weights(None)
        made.append(blk)
    perturb(made[0], seed=3, std=0.5)
    made[1].load_state_dict(made[0].state_dict())
    return made


@pytest.mark.parametrize("kind", ["hc_read", "hc_write"])
@pytest.mark.parametrize("mode, n, d, dtype", [
    ("dynamic", 4, 40, torch.float32), ("dynamic", 3, 130, torch.float32),
    ("dynamic", 1, 16, torch.float32), ("static", 4, 40, torch.float32),
    ("static", 2, 130, torch.float32), ("dynamic", 4, 40, torch.bfloat16)])
def test_fused_connection_equals_the_torch_block_with_its_gradients(kind, mode, n, d, dtype):
    """10 tokens (not a multiple of a token block), d = 130 spans two chunks of 128, n = 3 pads
    the streams to 4: every mask of the kernels is crossed. bf16 streams and y: the kernels
    compute in fp32, as the twin does from them; the gradients of h and y come back in bf16."""
    fused, twin = pair(kind, mode, n, d)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, n, d, generator=g).to(DEV, dtype).requires_grad_()
    y = torch.randn(2, 5, d, generator=g).to(DEV, dtype).requires_grad_()
    tol = FP32 if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    args = (h, y) if kind == "hc_write" else (h,)
    # hc_read also gives the streams (for its write): a gradient into them is added to h's
    outs_f, outs_t = (m(*args) for m in (fused, twin))
    outs_f, outs_t = (o if isinstance(o, tuple) else (o,) for o in (outs_f, outs_t))
    for a, b in zip(outs_f, outs_t, strict=True):
        torch.testing.assert_close(a, b, **tol)
        assert a.dtype == b.dtype and a.shape == b.shape
    gouts = [torch.randn(o.shape, generator=g).to(DEV) for o in outs_t]
    wrt_f, wrt_t = [*args, *fused.parameters()], [*args, *twin.parameters()]
    names = [f"input {i}" for i in range(len(args))] + [n for n, _ in fused.named_parameters()]
    grads_f = torch.autograd.grad(outs_f, wrt_f, gouts)
    grads_t = torch.autograd.grad(outs_t, wrt_t, gouts)
    for name, a, b in zip(names, grads_f, grads_t):
        assert b.abs().sum() > 0, name   # every gradient is exercised
        assert a.dtype == b.dtype, name
        scale = max(1.0, b.abs().max().item())   # bf16: one rounding of the largest entry
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=name)


def test_the_custom_ops_pass_opcheck_with_padded_streams():
    """torch.library.opcheck: schema, autograd registration, and fake tensors (what
    torch.compile plans with) giving the real outputs' shapes and strides, at n = 3 (padded to 4
    inside: the parameter gradients are slices of padded buffers) and with the read's acc."""
    from blocks import hyper_kernels as hk
    g = torch.Generator().manual_seed(2)
    n, d, tokens = 3, 20, 7

    def rand(*shape, grad=True):
        return torch.randn(shape, generator=g).to(DEV).requires_grad_(grad)
    h, y, w, a0, b0 = rand(tokens, n, d), rand(tokens, d), rand(d, n + 1), rand(n, n), rand(n)
    sa, sb = rand(), rand()
    torch.library.opcheck(hk.hc_mix, (h, y, w, a0, b0, sa, sb, 1e-6))
    out, r, q = hk.hc_mix(h, y, w, a0, b0, sa, sb, 1e-6)
    plain = [t.detach() for t in (h, y, w, a0, b0, sa, sb)]
    only = ("test_schema", "test_faketensor")   # the backward op has no autograd of its own
    torch.library.opcheck(hk.hc_mix_backward, (rand(*out.shape, grad=False), *plain, r, q, None),
                          test_utils=only)
    read_out, r, q = hk.hc_mix(h, None, w[:, :1], a0[:, :1], None, sa, None, 1e-6)
    torch.library.opcheck(hk.hc_mix_backward, (rand(*read_out.shape, grad=False), plain[0], None,
                                               plain[2][:, :1].contiguous(),
                                               plain[3][:, :1].contiguous(), None, plain[5], None,
                                               r, q, rand(tokens, n, d, grad=False)),
                          test_utils=only)


@pytest.mark.parametrize("kind", ["hc_read", "hc_write"])
def test_an_empty_batch_gives_empty_outputs_and_gradients(kind):
    fused, twin = pair(kind, "dynamic", 4, 8)
    h = torch.randn(0, 3, 4, 8, device=DEV, requires_grad=True)
    args = (h, torch.randn(0, 3, 8, device=DEV, requires_grad=True)) if kind == "hc_write" else (h,)
    out = first(fused(*args))
    assert out.shape == first(twin(*args)).shape
    out.sum().backward()
    assert h.grad.shape == h.shape
    assert all(p.grad is not None and not p.grad.any() for p in fused.parameters())


def twins(mode: str, impls=("triton", "torch")):
    """graphs/hyper.yaml at n = 4 with each hc_impl of `impls`, sharing perturbed weights."""
    models = [hyper(mode, n=4, sets=[f"hc_impl={impl}"]).to(DEV) for impl in impls]
    perturb(models[0], seed=5, std=0.3)
    models[1].load_state_dict(models[0].state_dict())
    return models


def assert_same_grads(m, ref):
    own = dict(ref.named_parameters())
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, own[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_model_with_fused_connections_equals_the_torch_model(mode):
    """graphs/hyper.yaml with --set hc_impl=triton: the same loss, logits and gradients of every
    parameter as with the torch connections, from perturbed (non-initial) connections."""
    models = twins(mode)
    idx, tgt = (t.to(DEV) for t in batch(2))
    (la, loss_a), (lb, loss_b) = (logits_and_loss(m, idx, tgt) for m in models)
    torch.testing.assert_close(la, lb, **FP32)
    torch.testing.assert_close(loss_a, loss_b, **FP32)
    loss_a.backward()
    loss_b.backward()
    assert_same_grads(*models)


@pytest.mark.parametrize("sets, says", [
    (["hc=mhc", "hc_impl=triton"], "impl triton: our fused kernels cover static and dynamic only"),
    (["hc=dynamic", "frac=2", "hc_impl=triton"], "impl triton takes frac 1"),
    (["hc=static", "n_streams=4", "hc_impl=liger"], "Liger has a fused op for mode mhc only")])
def test_impls_that_cannot_run_the_mode_are_refused_at_the_node(sets, says):
    from test_hyper import HYPER, SETS
    with pytest.raises(GraphError, match=says) as e:
        graphs.elaborate(graphs.load(HYPER, size="tiny", sets=[*SETS, *sets]).resolve())
    assert "a_read" in str(e.value) or "a_write" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal; on a GPU the kernels run")
def test_impl_triton_on_the_cpu_outside_the_interpreter_names_the_node(monkeypatch):
    fused, _ = pair("hc_read", "dynamic", 4, 8)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="hc_read 'x': impl triton needs a CUDA device, not cpu"):
        fused(torch.randn(1, 2, 4, 8))


def test_impl_triton_refuses_float64_rather_than_rounding_it():
    fused, _ = pair("hc_write", "dynamic", 2, 8)
    fused.double()
    with pytest.raises(RuntimeError, match="impl triton computes in fp32; use impl torch"):
        fused(torch.randn(1, 2, 2, 8, dtype=torch.float64, device=DEV),
              torch.randn(1, 2, 8, dtype=torch.float64, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_compiled_bf16_model_with_fused_connections_is_as_accurate_as_the_torch_model(mode):
    """Compiled (the ops are opaque custom ops) under bf16 autocast, with a bf16 y: the loss is
    the eager torch model's, and the connections' gradients are as close to the fp32 model's as
    the torch connections' own bf16 gradients are (x1.5), or within 2%: over all of them, and
    the median parameter's. Per parameter, or against the bf16 twin alone, it would be noise:
    small gradients that cancel are far off in bf16 on either side (CPU, bf16 autocast: one
    s_beta 4.8% against the twin's 2.3%, one s_alpha 0.24 against 2.3; over all: 0.7% / 4.4%)."""
    fused, eager = twins(mode)
    ref = twins(mode, ("torch", "torch"))[0]   # the same weights, kept in fp32 below
    idx, tgt = (t.to(DEV) for t in batch(2))
    with torch.autocast("cuda", torch.bfloat16):
        loss_f = torch.compile(fused)(idx, tgt)[1]
        loss_e = eager(idx, tgt)[1]
    torch.testing.assert_close(loss_f, loss_e, rtol=2e-2, atol=2e-2)
    for m, loss in ((fused, loss_f), (eager, loss_e), (ref, ref(idx, tgt)[1])):
        loss.backward()
    want = dict(ref.named_parameters())
    names = [n for n in want if "_read" in n or "_write" in n]

    def errors(m):
        got = dict(m.named_parameters())
        diff = [(got[n].grad - want[n].grad).norm() for n in names]
        every = (sum(x ** 2 for x in diff) / sum(want[n].grad.norm() ** 2 for n in names)).sqrt()
        one = torch.stack([x / want[n].grad.norm().clamp_min(1e-12) for x, n in zip(diff, names)])
        return every.item(), one.median().item()
    for err, err_twin in zip(errors(fused), errors(eager)):
        assert err <= max(1.5 * err_twin, 0.02), (err, err_twin)


COMPILE = r'''
from bench.hc_sass import compile_sm90, usage, variants
for name, fn, meta, warps in variants(4, 768):
    k = compile_sm90(fn, meta, warps)
    assert "cubin" in k.asm and ".visible .entry" in k.asm["ptx"]
    u = usage(k.asm["cubin"])
    assert u["regs"] > 0 and u["sass"] > 0, u
    print("compiled", name, u)
'''


def test_kernels_compile_for_the_h100_without_a_gpu(tmp_path):
    """The interpreter accepts code that Triton's compiler refuses (shapes, types, control flow):
    compile every kernel variant (read, write; static, dynamic; forward, backward) to an sm_90
    cubin, ptxas included, no GPU needed, at the 124M size's n = 4, d = 768, in a process
    outside the interpreter and with an empty kernel cache; `python -m bench.hc_sass` reports
    their registers and SASS, which this also runs (cuobjdump, nvdisasm)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parent.parent)   # this checkout's code, not an install's
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path),
           "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.count("compiled") == 8, run.stderr[-3000:]


def test_each_read_adds_its_writes_gradient_of_the_streams_in_its_backward_kernel(monkeypatch):
    """graphs/hyper.yaml feeds each write the streams through its read (`a_read.streams`), so with
    impl triton every read's backward receives H's gradient from the write and adds it in the
    kernel (acc), rather than autograd adding the two in a pass of its own; the writes get none."""
    from blocks import hyper_kernels as hk
    calls = []
    real = hk.hc_mix_backward

    def spy(g, h, y, *rest):
        calls.append(("write" if y is not None else "read", len(rest) > 7 and rest[7] is not None))
        return real(g, h, y, *rest)
    monkeypatch.setattr(hk, "hc_mix_backward", spy)
    m = hyper("dynamic", n=4, sets=["hc_impl=triton"]).to(DEV)
    idx, tgt = (t.to(DEV) for t in batch(2))
    m(idx, tgt)[1].backward()
    layers = 3   # test_hyper's SETS
    assert sorted(calls) == [("read", True)] * (2 * layers) + [("write", False)] * (2 * layers)


def test_compiled_model_with_fused_connections_traces_into_one_graph_and_matches_eager():
    """The read's autograd node returns a view of its input (the streams for the write): Dynamo
    and AOTAutograd trace it without a graph break, and the compiled gradients are eager's."""
    models = twins("dynamic", ("triton", "triton"))
    idx, tgt = (t.to(DEV) for t in batch(2))
    compiled = torch.compile(models[0], backend="aot_eager", fullgraph=True)
    loss_c, loss_e = compiled(idx, tgt)[1], models[1](idx, tgt)[1]
    torch.testing.assert_close(loss_c, loss_e, **FP32)
    loss_c.backward()
    loss_e.backward()
    assert_same_grads(*models)


@pytest.mark.parametrize("kind", ["hc_read", "hc_write"])
def test_scale_gradients_stay_exact_with_the_dynamic_weights_near_zero(kind):
    """Right after init W = 0, so tanh is taken of values near 0, where 2 sigmoid(2x) - 1 loses
    its relative precision (s_alpha's gradient was 3% off with W of std 1e-6)."""
    fused, twin = pair(kind, "dynamic", 4, 40)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in (fused, twin):
            for name, p in m.named_parameters():
                if name.startswith("w_"):
                    p.copy_(1e-6 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9)))
    h = torch.randn(2, 5, 4, 40, generator=g).to(DEV)
    args = (h, torch.randn(2, 5, 40, generator=g).to(DEV)) if kind == "hc_write" else (h,)
    for m in (fused, twin):
        out = m(*args)
        first(out).square().sum().backward()
    for name, p in twin.named_parameters():
        if name.startswith("s_"):
            torch.testing.assert_close(dict(fused.named_parameters())[name].grad, p.grad,
                                       rtol=1e-4, atol=1e-9, msg=name)
