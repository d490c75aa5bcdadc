"""The machine's dense GEMM rate, measured in the same run, to put every case on a roofline."""

from __future__ import annotations

import torch

from .latency import measure_latency

GEMM_SIZE = 2048


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, size: int = GEMM_SIZE) -> float:
    """FLOP/s of a (size × size) @ (size × size) matmul on random operands (2·size³ FLOPs a call)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    latency = measure_latency(lambda: a @ b, device, min_samples=5, max_time_s=3.0)
    return 2 * size**3 / latency.median_s
