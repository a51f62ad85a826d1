"""What a tokenizer's output costs to store, counted honestly per family: ordered codes cost
log2(vocab) each; an unordered multiset (a token set) costs the log2 of the number of multisets; an
adaptive length also pays for saying which length it chose."""

from __future__ import annotations

import math

__all__ = ["length_code_bits", "multiset_bits"]


def multiset_bits(vocab_size: int, count: int) -> float:
    """log2 C(V + R - 1, R): the bits that single out one multiset of `count` tokens from `vocab_size` codes."""
    if vocab_size < 1 or count < 0:
        raise ValueError(f"need vocab_size >= 1 and count >= 0, got {vocab_size} and {count}")
    n, k = vocab_size + count - 1, count
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def length_code_bits(allowed_lengths: int) -> float:
    """A fixed-length code for which of `allowed_lengths` lengths an image uses."""
    return math.log2(allowed_lengths) if allowed_lengths > 1 else 0.0
