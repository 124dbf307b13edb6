"""What every benchmark measures beside its contestants: the machine's fp32 matmul rate at that moment."""

import statistics
import time

import torch


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    """Median fp32 GFLOP/s of a size x size matmul: the machine's speed at the moment of the call."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)
