"""Type checks of config mappings against a dataclass's annotations, with errors that name the key.

YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string, so numeric strings are accepted where a number is declared.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import LorasumError


def coerce_float(v: Any) -> Any:
    """A numeric string (`"1e-3"`) -> float; anything else is returned unchanged."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _describe(tp: Any) -> str:
    """A declared type in words: `int | None` -> 'an integer or null'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is list:
        inner = _describe(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, f"a mapping of {getattr(tp, '__name__', tp)} keys")


class _Mismatch(Exception):
    pass


def _convert(tp: Any, v: Any) -> Any:
    """`v` as declared type `tp` (numeric strings become numbers); raises _Mismatch if it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _convert(a, v)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is list:
        if not isinstance(v, list):
            raise _Mismatch
        return [_convert(args[0], x) for x in v]
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _Mismatch
    if tp in (int, float):
        if isinstance(v, bool):
            raise _Mismatch
        x = coerce_float(v) if isinstance(v, str) else v
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            raise _Mismatch
        if tp is int:
            if isinstance(x, float) and not x.is_integer():  # `1e3` (YAML string) or 1000.0 mean 1000
                raise _Mismatch
            return int(x)
        return float(x) if isinstance(v, str) else x
    if tp is str:
        if isinstance(v, str):
            return v
        raise _Mismatch
    if tp is dict:
        if isinstance(v, dict):
            return v
        raise _Mismatch
    return v  # a nested dataclass: checked by its own check_fields call


def check_fields(cls: type, d: dict, where: str, prefix: str = "", skip: tuple[str, ...] = ()) -> dict:
    """`d` (keys already known to be fields of dataclass `cls`) with each value checked against its annotation.

    Numeric strings become numbers; a wrong type raises `WHERE: 'PREFIX.key' must be <type>, got <value>`.
    Fields named in `skip` are returned as they are (they have their own validation).
    """
    hints = typing.get_type_hints(cls)
    out = dict(d)
    for f in dataclasses.fields(cls):
        if f.name not in d or f.name in skip or dataclasses.is_dataclass(hints[f.name]):
            continue
        try:
            out[f.name] = _convert(hints[f.name], d[f.name])
        except _Mismatch:
            raise LorasumError(f"{where}: '{prefix}{f.name}' must be {_describe(hints[f.name])}, "
                               f"got {d[f.name]!r}") from None
    return out
