"""The shared base under every family: config loading and shared config sections, the Hub format and model
cards, data sources, distributed helpers, atomic files, fingerprints, errors, runtime, metrics, image grids,
and the model-agnostic arithmetic of `--plan`. It imports no family."""

from __future__ import annotations

from .errors import ConfigError, NonFiniteLoss, TokenizerMismatch, UserError
from .hub import load_model

__all__ = ["ConfigError", "NonFiniteLoss", "TokenizerMismatch", "UserError", "load_model"]
