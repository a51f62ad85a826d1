"""Machine figures every benchmark prints beside its own: matmul GFLOP/s and peak RSS."""

from __future__ import annotations

import resource
import sys
import time

from base.runtime import matmul_gflops

__all__ = ["matmul_gflops", "peak_rss_mib", "throughput"]


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
