"""Optional pretrained weights, read only from local files: nothing is ever downloaded at run time."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["resolve_local_weights"]


def resolve_local_weights(
    path: str | os.PathLike[str] | None,
    env_var: str | None,
    missing_message: Callable[[str], str],
    *,
    what: str | None = None,
) -> Path:
    """The local weights file: `path` if given, else the one named by `$env_var`, with `~` expanded.

    When neither is set, or the chosen path is not a file, raises
    `FileNotFoundError(missing_message(detail))`, where `detail` says which went wrong
    (`"<env_var> is not set"` or `"no <what> file at <path>"`), so each caller can explain how to
    obtain its own weights. `env_var` is `None` for a path the caller always supplies.
    """
    if path is None:
        path = os.environ.get(env_var) if env_var else None
        if not path:
            raise FileNotFoundError(missing_message(f"{env_var} is not set" if env_var else "no path given"))
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        kind = f"{what} file" if what else "file"
        raise FileNotFoundError(missing_message(f"no {kind} at {resolved}"))
    return resolved
