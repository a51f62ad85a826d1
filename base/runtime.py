"""What every training loop shares: the device choice, the LR schedule, and the stop on a NaN loss; and the
machine's matmul speed, printed beside every measured speed."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .errors import NonFiniteLoss, UserError

__all__ = ["check_finite", "matmul_gflops", "pick_device", "warmup_cosine"]


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` is the GPU when there is one; asking for `cuda` without one is a user error (naming `key`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}: cuda requested but no GPU is available")
    return torch.device(name)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor per step: linear warmup, then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def check_finite(what: str, value: float, step: int, checkpoint: object) -> None:
    """Stop the run when `value` (the loss, the gradient norm) is NaN or inf; its last checkpoint stays."""
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{what} became {value} at step {step}; stopped, last good checkpoint kept at {checkpoint}")


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
