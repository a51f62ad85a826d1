"""FlexTok-style 1D tokenizers, and the tokenizer stage over both families (importing the package registers
the 1D tokenizer and the grid autoencoders for `base.hub.load_model`)."""

from __future__ import annotations

from base.hub import load_model
from grid import GridAutoencoder

from .model import FlexTok

__all__ = ["FlexTok", "load_tokenizer"]


def load_tokenizer(path, map_location: str = "cpu") -> FlexTok | GridAutoencoder:
    """Load any saved tokenizer (grid KL/quantized autoencoder or FlexTok) from a folder or hub id hf:owner/name."""
    return load_model(path, map_location, expect=(FlexTok, GridAutoencoder), what="a tokenizer")
