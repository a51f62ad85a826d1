"""The YAML config loader: files (with `base:` chains) and dotted overrides into typed dataclasses.

The sections themselves live with the layers they configure: `base.schema` (data, sampling, the training
loop, distributed), `grid.schema` (quantizer, grid autoencoder, loss, equivariance, REPA), `flextok.schema`
(the 1D tokenizer, its training and shaping terms, `TokenizerRunConfig`), `priors.schema` (prior,
prior_train) and `evaluation.schema` (eval, and `ExperimentConfig`, the whole file). A section checks its own
values (`check`); errors name the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .files import atomic_write_text

__all__ = ["check", "config_changes", "from_dict", "load_config", "read_with_bases", "save_config"]


class _FieldError(ConfigError):
    """A section's value check failed. `detail` starts with the key name and its closing quote; `from_dict`
    puts the file and the section's path in front of it (a check does not know where its section is)."""

    def __init__(self, detail: str):
        super().__init__(f"'{detail}")
        self.detail = detail


def check(ok: bool, message: str, value: Any) -> None:
    """A section's value check; `message` starts with the key name and its closing quote (`steps' must ...`),
    so the error reads `'steps' must ...`, and `from_dict` puts the section's path in front of the key."""
    if not ok:
        raise _FieldError(f"{message}, got {value!r}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, cls: type,
                within: type | None = None):
    """Load `path` (following `base:` chains), apply `section.key=value` overrides, validate into `cls`.

    `within` is the schema of the whole experiment file when `cls` is one stage's part of it: top-level keys
    that `within` knows and `cls` does not are other stages' sections, left for them to check; a key that
    neither knows is still an error (a misspelled section)."""
    raw: dict[str, Any] = read_with_bases(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for item in overrides:
        _apply_override(raw, item)
    if within is not None:
        others = {f.name for f in dataclasses.fields(within)} - {f.name for f in dataclasses.fields(cls)}
        raw = {key: value for key, value in raw.items() if key not in others}
    return from_dict(cls, raw, source)


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], _over_field_default(fields[key], value), source, dotted)
    try:
        return cls(**kwargs)
    except _FieldError as err:
        raise ConfigError(f"{source}: '{prefix}{err.detail}") from None


def _over_field_default(field: dataclasses.Field, value: Any) -> Any:
    """A partly given section starts from its field's default, not from its class's: `flextok.sampling:
    {steps: 4}` keeps FlexTok's own default guidance interval, `prior.sampling` a prior's 25 Euler steps."""
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    return _deep_merge(dataclasses.asdict(default), value) if dataclasses.is_dataclass(default) else value


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced from its folder."""
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def config_changes(path: str | Path, cfg) -> list[str]:
    """`key: old -> new` for every setting (dotted key) in which `cfg` differs from the config saved at `path`
    (nothing where no file is there)."""
    path = Path(path)
    if not path.is_file():
        return []
    saved = yaml.safe_load(path.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))  # tuples as lists
    return _differences(saved, current, "")


def _differences(old: Any, new: Any, key: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for name in dict.fromkeys([*old, *new])
                for line in _differences(old.get(name), new.get(name), f"{key}.{name}" if key else name)]
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config file with its `base:` chain merged in (nothing validated)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = read_with_bases(path.parent / base, seen + (path.resolve(),))
    return _deep_merge(parent, raw)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override '{dotted}': cannot parse value '{text}'") from None


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(name, str) for name in value):
            raise ConfigError(f"{source}: '{key}' must be a mapping with string keys, got {value!r}")
        return {name: _coerce(inner, v, source, f"{key}.{name}") for name, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp} for '{key}'")
