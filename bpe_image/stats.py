"""Compression statistics of a codec on a set of sequences."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["BPEStats"]


@dataclass(frozen=True)
class BPEStats:
    """How much a codec shortens a dataset.

    `compression_ratio` is codes per token (higher is shorter). `vocab_used` counts
    distinct ids that occur; `vocab_usage` is that over the vocabulary size.
    `mean_codes_per_merged_token` averages over occurrences of merged tokens (ids >= K)
    in the encoded data, NaN when none occurs.
    """

    num_sequences: int
    num_codes: int
    num_tokens: int
    compression_ratio: float
    mean_tokens_per_sequence: float
    vocab_used: int
    vocab_usage: float
    mean_codes_per_merged_token: float

    @classmethod
    def measure(cls, token_lists: list[np.ndarray], token_sizes: np.ndarray, codebook_size: int) -> BPEStats:
        """Statistics of already encoded sequences, given codes per token id."""
        ids = np.concatenate(token_lists) if token_lists else np.zeros(0, np.int64)
        sizes = token_sizes[ids]
        merged = sizes[ids >= codebook_size]
        num_codes, num_tokens = int(sizes.sum()), len(ids)
        used = int(np.count_nonzero(np.bincount(ids, minlength=len(token_sizes))))
        return cls(
            num_sequences=len(token_lists),
            num_codes=num_codes,
            num_tokens=num_tokens,
            compression_ratio=num_codes / num_tokens if num_tokens else float("nan"),
            mean_tokens_per_sequence=num_tokens / len(token_lists) if token_lists else float("nan"),
            vocab_used=used,
            vocab_usage=used / len(token_sizes),
            mean_codes_per_merged_token=float(merged.mean()) if merged.size else float("nan"),
        )

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict, e.g. for JSON logs."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return "\n".join(
            f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}"
            for name, value in self.as_dict().items()
        )
