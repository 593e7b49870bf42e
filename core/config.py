"""Typed, strict configuration: frozen dataclasses, merged as defaults < YAML file < ``--set`` < flags.

Every stage's configuration is a frozen dataclass (nested dataclasses allowed). :func:`build_config`
merges the layers and checks them against the dataclass: an unknown key or a value of the wrong type
is a :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.registry import OneOf

T = TypeVar("T")


def build_config(
    cls: type[T],
    *,
    file: PathLike | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    defaults: T | None = None,
) -> T:
    """Build a ``cls`` instance from its defaults, a YAML file, ``key=value`` overrides and flags.

    Args:
        cls: a (frozen) dataclass type.
        file: optional YAML file holding a mapping with some of ``cls``'s keys.
        overrides: ``"a.b=value"`` strings; values are parsed as YAML scalars or lists.
        flags: dotted key -> value from explicit command-line flags; ``None`` values are ignored.
        defaults: the values the layers start from (``cls()`` when None).

    Raises:
        ConfigError: an unknown key, a value of the wrong type, or an unreadable file.
    """
    values: dict[str, Any] = to_dict(defaults if defaults is not None else cls())
    if file is not None:
        _merge(values, _read_yaml(Path(file)), cls, source=str(file))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
        _merge(values, _nest(key.strip(), parsed), cls, source="--set")
    for key, value in (flags or {}).items():
        if value is not None:
            _merge(values, _nest(key, value), cls, source="flag")
    return from_dict(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-friendly dict of a config dataclass (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def from_dict(cls: type[T], values: Mapping[str, Any], *, prefix: str = "") -> T:
    """Build ``cls`` from a nested mapping, converting and checking each field's type."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        key = prefix + sorted(unknown)[0]
        raise ConfigError(f"unknown configuration key {key!r}", hint=f"known keys: {_known(cls, prefix)}")
    kwargs = {}
    for name in names & set(values):
        kwargs[name] = _coerce(values[name], hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid configuration{' in ' + prefix.rstrip('.') if prefix else ''}: {exc}") from exc


def _known(cls: type, prefix: str) -> str:
    return ", ".join(prefix + f.name for f in dataclasses.fields(cls))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        coerced = _coerce(value, args[0], key)
        for meta in hint.__metadata__:
            if isinstance(meta, OneOf) and coerced not in meta.choices:
                choices = ", ".join(repr(c) for c in meta.choices)
                raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        return coerced
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{key} cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        if args:
            return {_coerce(k, args[0], f"{key}.{k}"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{key} must be a path, got {value!r}")
    if hint is Any:
        return value
    raise TypeError(f"unsupported configuration type {hint!r} for {key}")


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], update: Mapping[str, Any], cls: type, *, source: str, prefix: str = "") -> None:
    """Merge ``update`` into ``base`` in place; nested dataclass fields merge key by key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in update.items():
        if key not in fields:
            raise ConfigError(
                f"unknown configuration key {prefix + str(key)!r} (from {source})",
                hint=f"known keys: {_known(cls, prefix)}",
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            _merge(base[key], value, hint, source=source, prefix=f"{prefix}{key}.")  # type: ignore[arg-type]
        else:
            base[key] = value


def _read_yaml(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"configuration file {path} must hold a mapping of keys to values")
    return data
