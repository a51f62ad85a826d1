"""Thread-parallel map over contiguous chunks of a batch.

The grid engine is a sequence of large numpy kernels, which release the GIL, so
chunks of a batch encode or decode side by side on every core.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")

MIN_CHUNK = 256
"""Smaller chunks cost more in per-call Python overhead than threads win back."""


def map_chunks(fn: Callable[[int, int], list[T]], n: int) -> list[T]:
    """Concatenated `fn(start, stop)` over chunks of `range(n)`, in order.

    An exception from the earliest failing chunk is raised, so errors still name the
    first bad item of the whole batch.
    """
    workers = os.cpu_count() or 1
    n_chunks = min(2 * workers, n // MIN_CHUNK)
    if n_chunks <= 1:
        return fn(0, n)
    bounds = np.linspace(0, n, n_chunks + 1).astype(int).tolist()
    with ThreadPoolExecutor(workers) as pool:
        return list(itertools.chain.from_iterable(pool.map(fn, bounds[:-1], bounds[1:])))
