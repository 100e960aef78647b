"""Turn YAML / command-line values into the types a config field declares.

YAML 1.1 reads `2e-4` as a string and a command line gives only strings, so every
value goes through `coerce`, which either returns a value of the declared type or
raises a `ConfigError` naming the key, the value and what is accepted.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

from lathe.errors import ConfigError, did_you_mean

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


class _Mismatch(Exception):
    """Internal: the value does not fit this type (another union member may)."""


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError for `key`."""
    try:
        return _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(
            f"{key}={value!r} is not valid: expected {describe(tp)}"
            + _choice_hint(value, tp)
        ) from None


def describe(tp: Any) -> str:
    """A short human description of a type, e.g. 'one of lora, full, freeze'."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        has_enum = any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args)
        parts = [describe(a) for a in args if a is not type(None) and not (has_enum and a is str)]
        text = " or ".join(dict.fromkeys(parts))
        return text + " (or null)" if type(None) in typing.get_args(tp) else text
    if origin is list:
        return "a list or comma-separated string"
    if origin is dict or tp is dict:
        return "a mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _choice_hint(value: Any, tp: Any) -> str:
    choices: list[str] = []
    for member in _members(tp):
        if typing.get_origin(member) is typing.Literal:
            choices += [str(a) for a in typing.get_args(member)]
        elif isinstance(member, type) and issubclass(member, enum.Enum):
            choices += [str(m.value) for m in member]
    return did_you_mean(str(value), choices) if choices else ""


def _members(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _coerce(value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        # An explicit null goes to None first; strings try the most specific types first.
        if type(None) in members and (value is None or _is_null_string(value)):
            return None
        ordered = sorted(members, key=_specificity)
        if any(isinstance(m, type) and issubclass(m, enum.Enum) for m in members):
            # `SomeEnum | str` in transformers means "the enum, or its value as a string".
            ordered = [m for m in ordered if m is not str]
        for member in ordered:
            if member is type(None):
                continue
            try:
                return _coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value is False and "no" in allowed and False not in allowed:
            return "no"  # YAML 1.1 reads an unquoted `no` (eval_strategy=no) as false
        for a in allowed:
            if value == a or (isinstance(value, str) and str(a) == value.strip()):
                return a
        raise _Mismatch
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Mismatch
        return [_coerce(v, item_tp) for v in items]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if value is False and "no" in {m.value for m in tp}:
            value = "no"  # YAML 1.1's false for an unquoted `no` (save_strategy=no)
        try:
            return tp(value)
        except ValueError:
            raise _Mismatch from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise _Mismatch from None
                if f.is_integer():
                    return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    # An unknown class (e.g. a transformers enum we do not model): accept as given.
    return value


def _is_null_string(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in {"none", "null", "~"}


def _specificity(tp: Any) -> int:
    """Order union members so that '3' becomes 3, 'true' becomes True, not '3'/'true'."""
    order = {bool: 0, int: 1, float: 2}
    if tp in order:
        return order[tp]
    if typing.get_origin(tp) is typing.Literal:
        return 3
    if tp is str:
        return 9
    return 5
