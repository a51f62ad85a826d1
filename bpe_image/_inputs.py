"""Input conversion and validation shared by every codec entry point.

Errors name the offending position, because a bad code deep in a dataset is otherwise
impossible to find.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor or nested sequence of ints


def to_int_array(x: ArrayLike, what: str) -> np.ndarray:
    """Convert numpy / torch / list input to an int64 array, rejecting non-integer data."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def is_torch(x: ArrayLike) -> bool:
    """True when results should be handed back as torch tensors."""
    return isinstance(x, torch.Tensor)


def as_output(arr: np.ndarray, torch_out: bool) -> np.ndarray | torch.Tensor:
    """Return `arr` in the caller's array type (torch in -> torch.long out)."""
    return torch.from_numpy(arr) if torch_out else arr


def split_batch(batch: ArrayLike, item_ndim: int, what: str) -> tuple[list[np.ndarray], bool]:
    """Turn a stacked array or a sequence of items into a list of int64 arrays.

    Returns the list and whether the input was torch, so outputs can mirror it.
    """
    if isinstance(batch, (np.ndarray, torch.Tensor)):
        arr = to_int_array(batch, what)
        if arr.ndim != item_ndim + 1:
            raise ValueError(f"{what} must be {item_ndim + 1}-dimensional when stacked, got shape {tuple(arr.shape)}")
        return list(arr), is_torch(batch)
    if not isinstance(batch, Sequence):
        raise ValueError(f"{what} must be an array, a tensor or a sequence of them")
    items = [to_int_array(item, f"{what}[{i}]") for i, item in enumerate(batch)]
    for i, item in enumerate(items):
        if item.ndim != item_ndim:
            raise ValueError(f"{what}[{i}] must be {item_ndim}-dimensional, got shape {tuple(item.shape)}")
    return items, any(is_torch(item) for item in batch)


def _describe(arr_shape: tuple[int, ...], flat_index: int, labels: Sequence[str]) -> str:
    """Format a flat index as 'row 2, col 5' style text for an array of the given shape."""
    index = np.unravel_index(flat_index, arr_shape)
    return ", ".join(f"{label} {int(i)}" for label, i in zip(labels, index))


def concat_checked(
    items: list[np.ndarray], upper: int, labels: Sequence[str], noun: str, item_name: str | None
) -> np.ndarray:
    """Concatenate a batch into one flat array, checking every value is in [0, upper).

    One vectorized check over the whole batch; on failure the message names the item
    (`item_name` i, left out when None: a lone item the caller passed unbatched) and
    the position inside it.
    """
    flat = np.concatenate([item.reshape(-1) for item in items]) if items else np.zeros(0, np.int64)
    bad = np.flatnonzero((flat < 0) | (flat >= upper))
    if bad.size:
        ends = np.cumsum([item.size for item in items])
        n = int(np.searchsorted(ends, bad[0], side="right"))
        local = int(bad[0] - (ends[n] - items[n].size))
        where = _describe(items[n].shape, local, labels)
        if item_name is not None:
            where = f"{item_name} {n}, {where}"
        raise ValueError(f"{noun} {int(flat[bad[0]])} at {where} is outside [0, {upper})")
    return flat
