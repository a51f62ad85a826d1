"""Bootstrap confidence intervals: resample the evaluation images with replacement and read the spread
of the mean of a per-image metric."""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_interval", "paired_difference_interval"]


def bootstrap_interval(values: np.ndarray, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """The (low, high) percentile interval of the mean of `values` over `resamples` resamples."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"expected a non-empty 1D array of per-image values, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference_interval(before: np.ndarray, after: np.ndarray, resamples: int = 1000, level: float = 0.95,
                               seed: int = 0) -> tuple[float, float]:
    """The interval of mean(after - before) over the same images: each resample draws image indices once and
    applies them to both, i.e. bootstraps the per-image difference. Narrower than comparing two unpaired
    intervals when the images vary more than the difference does."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired values need the same images, got shapes {before.shape} and {after.shape}")
    return bootstrap_interval(after - before, resamples, level, seed)
