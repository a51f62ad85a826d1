"""Identities of saved artifacts: a model's fingerprint (its type, config and weights, not its path) and a
folder's (a BPE codec). Caches are keyed by them, so tokens, numbers and priors never outlive the weights
that produced them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from .errors import UserError
from .hub import CARD_NAME

__all__ = ["fingerprint_files", "fingerprint_model"]


def fingerprint_model(model: torch.nn.Module) -> str:
    """SHA-256 of a Hub-format model's type, config and every state tensor (what `save_pretrained` writes).

    It is the same for a model in memory and the same model reloaded from disk, wherever it is stored.
    Hashing gigabytes of weights takes seconds, and callers check the same tokenizer for every generated
    batch, so the digest is cached on the model until a tensor is replaced or modified in place (each
    tensor's storage and version counter are compared, which costs no hashing).
    """
    state = model.state_dict()
    try:
        key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    except RuntimeError:  # inference-mode tensors have no version counter: no caching
        key = None
    cached = model.__dict__.get("_fingerprint_cache")
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    meta = {"model_type": getattr(model, "model_type", type(model).__name__)}
    if dataclasses.is_dataclass(getattr(model, "config", None)):
        # the weights' identity: a model's default sampling settings are not part of it (they change no
        # weight, and caches whose contents depend on them key on them themselves)
        meta["config"] = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "sampling"}
    if hasattr(model, "extra_config"):
        meta.update(model.extra_config())
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes of any dtype (bf16 too)
    if key is not None:
        model.__dict__["_fingerprint_cache"] = (key, digest.hexdigest())
    return digest.hexdigest()


def fingerprint_files(directory: str | Path) -> str:
    """SHA-256 over a folder's file names and bytes (a saved BPE codec), leaving out its model card
    (`README.md`: prose, and the path it was saved to)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"folder not found: {directory}")
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory) != Path(CARD_NAME)):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


