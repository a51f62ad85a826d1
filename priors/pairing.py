"""A prior and the tokenizer whose tokens it models: the check every consumer makes, and `rekey` for a
prior whose recorded tokenizer fingerprint predates the current fingerprint format (CLI: `priors.rekey`).

Fingerprints hash a model's config (less its sampling defaults) as well as its weights, so a tokenizer
saved before its config gained the nested `quantizer` section fingerprints differently once loaded, and
priors trained on its tokens no longer match it. When the tokenizer given is the one that prior was trained
with, `rekey` records its current fingerprint in the prior's config.json (the weights are untouched).
"""

from __future__ import annotations

import json
from pathlib import Path

from base.errors import TokenizerMismatch
from base.files import atomic_write_text
from base.fingerprint import fingerprint_model
from base.hub import CONFIG_NAME, read_model_meta
from flextok import load_tokenizer

__all__ = ["check_tokenizer", "rekey"]


def check_tokenizer(prior, tokenizer_fingerprint: str, tokenizer_name: str) -> None:
    """Refuse a tokenizer other than the one the prior was trained on (a prior without a record passes)."""
    if prior.tokenizer_hash and prior.tokenizer_hash != tokenizer_fingerprint:
        raise TokenizerMismatch(
            f"this prior was trained on tokens of tokenizer {prior.tokenizer_hash[:12]}, but {tokenizer_name} is "
            f"tokenizer {tokenizer_fingerprint[:12]} (a prior saved before the current fingerprint format: see "
            "`python -m priors.rekey --help`)"
        )


def rekey(prior_dir: str | Path, tokenizer_dir: str | Path) -> tuple[str, str]:
    """Record `tokenizer_dir`'s current fingerprint in the prior saved at `prior_dir`; returns (old, new)."""
    directory, meta = read_model_meta(prior_dir)
    if "tokenizer_hash" not in meta:
        raise TokenizerMismatch(f"{prior_dir}: holds a '{meta['model_type']}' model, not a prior")
    old, new = meta["tokenizer_hash"], fingerprint_model(load_tokenizer(tokenizer_dir))
    atomic_write_text(directory / CONFIG_NAME, json.dumps({**meta, "tokenizer_hash": new}, indent=2))
    return old, new
