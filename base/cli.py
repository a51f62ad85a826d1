"""Command-line plumbing shared by the entry scripts: `--config FILE`, dotted overrides, clean exits."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from .errors import UserError

__all__ = ["config_parser", "exits_cleanly"]


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML experiment config (may use `base: other.yaml`)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override config values, e.g. train.steps=100"
    )
    return parser


def exits_cleanly(main: Callable[..., int | None]) -> Callable[..., int]:
    """Turn user-facing errors into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except (UserError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
