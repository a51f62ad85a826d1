"""Small vectorized array helpers shared by the engines."""

from __future__ import annotations

import numpy as np


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of `arange(s, s + n)` for every (s, n), without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if ends.size else 0) + np.repeat(starts - (ends - lengths), lengths)


def split_by_counts(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Split `values` into consecutive chunks of the given sizes (one chunk per count)."""
    if not len(counts):
        return []
    return np.split(values, np.cumsum(counts)[:-1])


def _first_of_value(ordered: np.ndarray) -> np.ndarray:
    """Mask of the first element of each run of equal values in a sorted array."""
    first = np.ones(len(ordered), bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return first


def group(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct values, index of each value among them, count of each).

    Sort based: on numpy 2.x `np.unique` takes a hash path that is far slower than
    sorting for the million-element int arrays counted here.
    """
    order = np.argsort(values)
    ordered = values[order]
    first = _first_of_value(ordered)
    inverse = np.empty_like(order)
    inverse[order] = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    return ordered[starts], inverse, np.diff(np.append(starts, len(values)))
