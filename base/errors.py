"""The project's user-facing errors: each is printed as one line by the entry scripts (exit code 2)."""

from __future__ import annotations

__all__ = ["ConfigError", "NonFiniteLoss", "TokenizerMismatch", "UserError"]


class UserError(Exception):
    """An input problem (missing file, unusable data, bad checkpoint) reported as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A config problem a user must fix: names the file and key."""


class TokenizerMismatch(UserError):
    """Tokens (or a prior) made with one tokenizer were paired with another."""


class NonFiniteLoss(UserError):
    """The loss or gradients turned NaN/inf; the last good checkpoint is left untouched."""
