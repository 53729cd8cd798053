"""Step configs are frozen dataclasses; this turns YAML mappings into them and back, checking types.

Steps validate values in `__post_init__` (raising ValueError that names the
field, the value and what was expected); this module checks what the type hints
already say -- unknown fields, wrong types -- so each step only checks meaning.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad config value; `field` names it so a recipe error can point at its line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint)).replace("NoneType", "null")


def config_from_dict(cls: type, data: dict | None) -> Any:
    """Build config `cls` from a mapping; ValueError names the bad field and what it expects."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(key, f"unknown field '{key}'; expected one of {', '.join(sorted(fields))}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(key, f"{key}: got {value!r}, expected {_describe(hints[key])}")
    coerced = {k: (tuple(v) if isinstance(v, list) else float(v) if hints[k] is float else v) for k, v in data.items()}
    return cls(**coerced)


def config_to_dict(cfg: Any) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in dataclasses.fields(cfg)}


def expect(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise the ValueError every config check raises: field, value, what was expected."""
    if not ok:
        raise ConfigError(field, f"{field}: got {value!r}, expected {expected}")
