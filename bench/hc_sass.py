"""`python -m bench.hc_sass [--streams 4] [--dim 768] [--all]`: what the H100 would run for our
fused hyper-connection kernels (blocks/hyper_triton.py), with no GPU: every kernel variant (read
and write, static and dynamic, forward and backward) compiled for sm_90 under the current launch
settings (hyper_kernels.TUNE), or with --all under each of bench/hc_kernels.py's; then ptxas's
registers, spills and shared memory and the SASS's instruction counts. Barriers (BAR) and
shared-memory traffic (LDS/STS) come from reductions and layout conversions across warps, shuffles
(SHFL) from reductions across the threads of a warp: in these memory-bound kernels they are what
keeps a program from streaming. A proxy, not a timing: bench/hc_kernels.py times them on a GPU.

Triton must compile outside its interpreter (TRITON_INTERPRET=0 is set here, before the import).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bench.hc_kernels import SETTINGS  # noqa: E402
from blocks import hyper_kernels as hk, hyper_triton as ht  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
COUNTED = ("BAR", "SHFL", "LDS", "STS", "LDG", "STG")


def variants(n: int, d: int):
    """(name, kernel, meta, warps) for read and write, dynamic and static, forward and backward,
    at the current TUNE."""
    for kind in ("hc_read", "hc_write"):
        for dyn in (True, False):
            h, a0 = torch.empty(16, n, d), torch.empty(n, 1 if kind == "hc_read" else n)
            w = torch.empty(d, 1 if kind == "hc_read" else n + 1) if dyn else None
            y = torch.empty(16, d) if kind == "hc_write" else None
            meta = hk._meta(h, y, w, a0)
            mode = "dynamic" if dyn else "static"
            yield f"{kind} {mode} fwd", ht.fwd_kernel, meta, hk.TUNE["warps_fwd"]
            yield (f"{kind} {mode} bwd", ht.bwd_kernel,
                   meta | {"TPP": hk.TPP, "ACC": kind == "hc_read"}, hk.TUNE["warps_bwd"])


def compile_sm90(fn, meta: dict, warps: int):
    """The kernel compiled for the H100 (ptxas included), as Triton's launcher would."""
    sig = {a: "constexpr" if a in meta else "i32" if a == "n_tok" else "fp32" if a == "eps"
           else "*bf16" if a in ("y_ptr", "dy_ptr") else "*fp32" for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def usage(cubin: bytes) -> dict:
    """Registers, spills (local memory), shared memory and SASS instruction counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|LOCAL|SHARED):(\d+)", res))
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)",
                                         sass, re.M))
    return {"regs": int(found["REG"]), "spill": int(found["LOCAL"]),
            "shared": int(found["SHARED"]), **{op: ops[op] for op in COUNTED},
            "sass": sum(ops.values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hc_sass")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--all", action="store_true", help="every setting (default: the current TUNE)")
    a = ap.parse_args(argv)
    settings = SETTINGS if a.all else [dict(hk.TUNE)]
    print(f"## fused hyper-connection kernels for sm_90, n = {a.streams}, d = {a.dim} "
          f"(Triton {triton.__version__})")
    print("| kernel | settings | BT x BD | registers | spill B | shared B | "
          + " | ".join(COUNTED) + " | SASS |")
    print("|---" * (7 + len(COUNTED)) + "|")
    saved = dict(hk.TUNE)
    try:
        for s in settings:
            hk.TUNE.update(s)
            for name, fn, meta, warps in variants(a.streams, a.dim):
                u = usage(compile_sm90(fn, meta, warps).asm["cubin"])
                print(f"| {name} | {tuple(s.values())} | {meta['BT']} x {meta['BD']} | {u['regs']} "
                      f"| {u['spill']} | {u['shared']} | "
                      + " | ".join(str(u[op]) for op in COUNTED) + f" | {u['sass']} |", flush=True)
    finally:
        hk.TUNE.clear()
        hk.TUNE.update(saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
