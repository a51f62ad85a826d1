"""Small vectorized array helpers shared by the engines."""

from __future__ import annotations

import numpy as np


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if ends.size else 0) + np.repeat(starts - (ends - lengths), lengths)


def split_by_counts(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Split ``values`` into consecutive chunks of the given sizes (one chunk per count)."""
    if not len(counts):
        return []
    return np.split(values, np.cumsum(counts)[:-1])
