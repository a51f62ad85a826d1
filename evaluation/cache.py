"""The evaluation's result cache: JSON records and uint8 image previews, each stored under a hash of
the inputs that produced it (checkpoint fingerprints, held-out pixels, modes, sampler settings)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from base.data import tensor_to_uint8
from base.files import atomic_write, atomic_write_text

__all__ = ["CACHE_VERSION", "ResultCache", "tensor_digest"]

CACHE_VERSION = 5  # 5: rate records of adaptive rows carry their length counts


class ResultCache:
    """Records and previews in one folder; a record is computed only when its inputs were never seen."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, inputs: dict[str, Any], suffix: str) -> Path:
        text = json.dumps({"version": CACHE_VERSION, **inputs}, sort_keys=True, default=_jsonable)
        return self.directory / f"{inputs['metric']}-{hashlib.sha256(text.encode()).hexdigest()[:32]}{suffix}"

    def record(self, inputs: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
        """The stored record for `inputs`, else `compute()`'s, stored; and whether it was computed now."""
        path = self._path(inputs, ".json")
        if path.is_file():
            return json.loads(path.read_text())["value"], False
        value = compute()
        atomic_write_text(path, json.dumps({"inputs": inputs, "value": value}, indent=1, default=_jsonable))
        return value, True

    def images(self, inputs: dict[str, Any], compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Like `record` for images [N, 3, H, W] in [-1, 1], kept as uint8 (what a PNG shows anyway)."""
        path = self._path(inputs, ".npy")
        fresh = not path.is_file()
        if fresh:
            pixels = tensor_to_uint8(compute())
            atomic_write(path, lambda tmp: _save_npy(tmp, pixels))
        pixels = torch.from_numpy(np.load(path))
        return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0), fresh


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot key a cache record on {type(value).__name__}")


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # np.save(path) would append '.npy' to the temporary name
        np.save(handle, array)


def tensor_digest(images: torch.Tensor) -> str:
    """Hash of a tensor's shape and values: the held-out set's identity, whatever source produced it."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
