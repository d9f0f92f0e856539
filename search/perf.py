"""Throughput accounting: device peaks and model FLOPs utilisation (MFU).

MFU = FLOPs per token x tokens per second / peak. FLOPs per token come from the cost model
(`graphs.cost.FLOPS_FORMULA`: 3 x forward FLOPs, attention counted in full = PaLM's
6N + 12*L*d*T for GPT-2). Peaks are dense bf16 datasheet figures; on our H100 a bf16 8192^3
matmul measured about 790 TFLOP/s (see docs/benchmarks.md), so MFU against that is ~1.25x.
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peaks (FLOP/s), datasheet
PEAKS = {
    "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756e12, "H200": 989.4e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12,
}
MEASURED_PEAKS = {"H100 80GB HBM3": 790e12, "H100 SXM": 790e12, "H200": 790e12}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_flops(device: torch.device, measured: bool = False) -> float | None:
    """Datasheet (or measured) bf16 peak of a CUDA device, None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = MEASURED_PEAKS if measured else PEAKS
    for key, value in table.items():
        if key.lower() in name.lower():
            return value
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_token * tokens_per_s / peak
