"""Adaptive image tokenization: grid KL/quantized autoencoders and FlexTok-style 1D tokenizers."""

from __future__ import annotations

from pathlib import Path

from .flextok_model import FlexTok
from .grid_autoencoder import GridAutoencoder
from .hub import load_model


def load_tokenizer(path: str | Path, map_location: str = "cpu"):
    """Load any saved tokenizer (grid KL/quantized autoencoder or FlexTok) from a folder or hub id."""
    return load_model(path, map_location)


__all__ = ["FlexTok", "GridAutoencoder", "load_tokenizer", "load_model"]
