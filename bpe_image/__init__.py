"""Lossless BPE over VQ image codes: 1D with prefix-aligned merges, invertible 2D grid
merges, and a flat baseline, on HF `tokenizers` or `sentencepiece`."""

from ._backends import BACKENDS
from ._inputs import load_codes
from ._text import MAX_CODEBOOK_SIZE
from .codec import MODES, BPECodec, open_codec
from .stats import BPEStats

__all__ = ["BACKENDS", "BPECodec", "BPEStats", "MAX_CODEBOOK_SIZE", "MODES", "load_codes", "open_codec"]
