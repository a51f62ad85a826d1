"""Machine figures every benchmark prints beside its own: matmul GFLOP/s and peak RSS."""

from __future__ import annotations

import resource
import sys
import time

import torch


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 n^3 matmul throughput in this process (the machines are noisy)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def throughput(fn, items: int, repeats: int = 3, warmup: int = 1) -> float:
    """Best items/s over `repeats` calls of `fn` (after `warmup` untimed calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best
