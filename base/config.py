"""The YAML config loader: files (with `base:` chains) and dotted overrides into typed dataclasses.

The sections themselves live with the layers they configure: `flextok.schema` (data, tokenizers,
training), `priors.schema` (prior, prior_train) and `evaluation.schema` (eval, and `ExperimentConfig`,
the whole file). A section may declare `RENAMED` (old key -> new key inside the section) and `MOVED`
(old key -> its new full dotted key elsewhere): old keys in a YAML file fail with one line naming the new
key, and `from_dict(..., upgrade=True)` moves `RENAMED` keys, so checkpoints saved before a rename load.
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

__all__ = ["check", "from_dict", "load_config", "read_with_bases", "save_config", "upgrade_keys"]


def check(ok: bool, message: str, value: Any) -> None:
    """A section's value check; `message` starts with the key name and its closing quote (`steps' must ...`),
    so the error reads `'steps' must ...`, and `from_dict` puts the section's path in front of the key."""
    if not ok:
        raise ConfigError(f"'{message}, got {value!r}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, cls: type,
                own_sections_only: bool = False):
    """Load `path` (following `base:` chains), apply `section.key=value` overrides, validate into `cls`.

    `own_sections_only` ignores top-level keys `cls` does not know: a tool of an early layer reading an
    experiment file whose other sections belong to later layers."""
    raw: dict[str, Any] = read_with_bases(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    for item in overrides:
        _apply_override(raw, item)
    if own_sections_only:
        names = {f.name for f in dataclasses.fields(cls)}
        raw = {key: value for key, value in raw.items() if key in names}
    return from_dict(cls, raw, source)


def from_dict(cls: type, data: dict[str, Any], source: str = "<dict>", prefix: str = "", upgrade: bool = False):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrongly typed values.

    `upgrade` first moves keys a section has renamed (used for saved checkpoints, never for YAML files)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    if upgrade:
        data = upgrade_keys(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        _reject_old_key(cls, key, value, set(fields), source, prefix)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(fields))})")
        kwargs[key] = _coerce(hints[key], _over_field_default(fields[key], value), source, dotted, upgrade)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # raised by a section's value checks (`check`), which don't know the file
        raise ConfigError(f"{source}: '{prefix}{str(err).removeprefix(chr(39))}") from None


def _over_field_default(field: dataclasses.Field, value: Any) -> Any:
    """A partly given section starts from its field's default, not from its class's: `flextok.sampling:
    {steps: 4}` keeps FlexTok's own default guidance interval, `prior.sampling` a prior's 25 Euler steps."""
    if not isinstance(value, dict) or field.default_factory is dataclasses.MISSING:
        return value
    default = field.default_factory()
    return _deep_merge(dataclasses.asdict(default), value) if dataclasses.is_dataclass(default) else value


def upgrade_keys(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with `cls.RENAMED` keys moved to their new (possibly nested) places, and the
    `cls.LEGACY_DEFAULTS` of settings added since: a saved config without one behaved like that value."""
    out = dict(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old in out and _is_old_form(cls, old, out[old]):
            _put(out, new, out.pop(old))
    for dotted, value in getattr(cls, "LEGACY_DEFAULTS", {}).items():
        _put(out, dotted, value)
    return out


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `data[a][b]...` for `a.b...` unless it is already set (copying the sections on the way)."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node.setdefault(leaf, value)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced from its folder."""
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def _is_old_form(cls: type, key: str, value: Any) -> bool:
    """A renamed key is old unless it is still a field, holding the new (mapping) form: `quantizer: fsq`
    is the old spelling of `quantizer: {kind: fsq}`."""
    is_field = key in {f.name for f in dataclasses.fields(cls)}
    return not is_field or not isinstance(value, dict)


def _reject_old_key(cls: type, key: str, value: Any, names: set[str], source: str, prefix: str) -> None:
    renamed, moved = getattr(cls, "RENAMED", {}), getattr(cls, "MOVED", {})
    if key in renamed and _is_old_form(cls, key, value):
        raise ConfigError(f"{source}: '{prefix}{key}' was renamed: use '{prefix}{renamed[key]}'")
    if key in moved and key not in names:
        raise ConfigError(f"{source}: '{prefix}{key}' has moved: use '{moved[key]}'")


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


def _coerce(tp: Any, value: Any, source: str, key: str, upgrade: bool = False) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, key + ".", upgrade)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key, upgrade)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(inner, v, source, f"{key}[{i}]", upgrade) for i, v in enumerate(value)]
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
