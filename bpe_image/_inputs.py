"""Input conversion and validation shared by every codec entry point.

Errors name the offending position, because a bad code deep in a dataset is otherwise
impossible to find.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from base.errors import UserError

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


def load_codes(path: Path, mode: str) -> list[np.ndarray] | np.ndarray:
    """Training codes from a file: an integer `.npy` [N, L] (1d/flat) or [N, h, w] (2d), or an `.npz` holding
    `codes` and, for variable-length 1D sequences, `lengths` (sequence i is `codes[i, :lengths[i]]`).
    UserError naming the file when it is unusable."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: not a readable .npy/.npz file ({err})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if "codes" not in loaded.files:
                raise UserError(f"{path}: .npz has no 'codes' array (found {loaded.files})")
            codes = loaded["codes"]
            lengths = loaded["lengths"] if "lengths" in loaded.files else None
    else:
        codes, lengths = loaded, None
    want = 3 if mode == "2d" else 2
    if codes.ndim != want or codes.dtype.kind not in "iu":
        raise UserError(f"{path}: mode {mode} needs an integer array with {want} dims, got {codes.dtype} {codes.shape}")
    if lengths is None:
        return codes
    if mode == "2d" or lengths.shape != (len(codes),) or (lengths < 0).any() or (lengths > codes.shape[1]).any():
        raise UserError(f"{path}: 'lengths' must be [N] values in [0, {codes.shape[1]}] and only for 1d/flat")
    return [row[:n] for row, n in zip(codes, lengths.tolist())]
