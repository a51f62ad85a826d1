"""Adaptive image tokenization, the shared base and the tokenizers: grid KL/quantized autoencoders and
FlexTok-style 1D tokenizers (importing the package registers both for `load_model`)."""

from __future__ import annotations

from .errors import ConfigError, NonFiniteLoss, TokenizerMismatch, UserError
from .flextok_model import FlexTok
from .grid_autoencoder import GridAutoencoder
from .hub import load_model

__all__ = [
    "ConfigError", "FlexTok", "GridAutoencoder", "NonFiniteLoss", "TokenizerMismatch", "UserError", "load_model",
    "load_tokenizer",
]


def load_tokenizer(path, map_location: str = "cpu") -> FlexTok | GridAutoencoder:
    """Load any saved tokenizer (grid KL/quantized autoencoder or FlexTok) from a folder or hub id hf:owner/name."""
    return load_model(path, map_location, expect=(FlexTok, GridAutoencoder), what="a tokenizer")
