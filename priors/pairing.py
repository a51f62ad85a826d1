"""A prior and the tokenizer whose tokens it models: the check every consumer makes.

A prior records the fingerprint of the tokenizer it was trained on (`base.fingerprint.fingerprint_model`:
its config, less its sampling defaults, and its weights), so tokens of one tokenizer never feed a prior
trained for another.
"""

from __future__ import annotations

from base.errors import TokenizerMismatch

__all__ = ["check_tokenizer"]


def check_tokenizer(prior, tokenizer_fingerprint: str, tokenizer_name: str) -> None:
    """Refuse a tokenizer other than the one the prior was trained on (a prior without a record passes)."""
    if prior.tokenizer_hash and prior.tokenizer_hash != tokenizer_fingerprint:
        raise TokenizerMismatch(
            f"this prior was trained on tokens of tokenizer {prior.tokenizer_hash[:12]}, but {tokenizer_name} is "
            f"tokenizer {tokenizer_fingerprint[:12]}"
        )
