"""Validation of every mapping lorasum reads: experiment configs, training parameters (`--params`), the tuning
section and search space, job specs. One mechanism for all of them.

A config is a dataclass: its annotations are the schema, its trailing comments document each field once, and an
optional `check()` method holds the rules on values (ranges, choices), raising errors keyed by field.
`parse(cls, mapping, where)` refuses unknown keys (suggesting the closest known one), converts each value to its
annotated type and recurses into nested dataclasses; errors are one line that names the key, e.g.
`run.yaml: 'train.lr' must be a number, got 'fast'`.

YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string, so numeric strings are accepted where a number is declared,
except with `strict` (JSON sources: job specs, `--params` files, where a string is never a number).
A whole number given for a `float` field is kept as it was written (so `alpha: 64` hashes as it always did).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from typing import Any, TypeVar

from .errors import LorasumError, show

T = TypeVar("T")
_FLOAT_MAX = sys.float_info.max


class Mismatch(Exception):
    """A value is not of the declared type (raised by `convert`; `parse` turns it into a LorasumError)."""


def describe(tp: Any) -> str:
    """A declared type in words: `int | None` -> 'an integer or null'."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is list:
        inner = describe(args[0]).removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, f"a {getattr(tp, '__name__', tp)}")


def number(v: Any) -> Any:
    """A numeric string (`"1e-3"`) -> float; anything else is returned unchanged."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def convert(tp: Any, v: Any, where: str | None = "config", prefix: str = "", strict: bool = False) -> Any:
    """`v` as declared type `tp`; raises Mismatch if it is not one (nested dataclasses are parsed in full)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return convert(a, v, where, prefix, strict)
                except Mismatch:
                    pass
        raise Mismatch
    if origin is list:
        if not isinstance(v, list):
            raise Mismatch
        return [convert(args[0], x, where, prefix, strict) for x in v]
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise Mismatch
        return parse(tp, v, where, prefix, strict)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise Mismatch
    if tp in (int, float):
        if isinstance(v, bool):
            raise Mismatch
        x = v if strict else number(v)
        if not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
            raise Mismatch
        if isinstance(x, int) and abs(x) > _FLOAT_MAX:  # 10**400 is an int but no float (nor any sane value)
            raise Mismatch
        if tp is int:
            if isinstance(x, float) and not x.is_integer():  # `1e3` (YAML string) or 1000.0 mean 1000
                raise Mismatch
            return int(x)
        return float(x) if isinstance(v, str) else x
    if tp in (str, dict):
        if isinstance(v, tp):
            return v
        raise Mismatch
    return v


def check_count(value: int, key: str, high: int) -> int:
    """The one rule for a count (rank, batch size, epochs, trials, workers): a whole number in [1, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise LorasumError(f"must be at least 1 and at most {high}, got {show(value)}", key=key)
    return value


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_keys(d: dict, known, where: str | None, prefix: str = "") -> None:
    """Every key of `d` is known; else `WHERE: unknown config key 'PREFIX.key'; did you mean 'PREFIX.close'?`."""
    known = list(known)
    for key in d:
        if key not in known:
            name = key if isinstance(key, str) and len(key) <= 80 else show(key)
            close = difflib.get_close_matches(name, [str(k) for k in known], n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(map(str, known))}"
            raise LorasumError(_at(where, f"unknown config key '{prefix}{name}'{hint}"))


def parse(cls: type[T], d: Any, where: str | None = "config", prefix: str = "", strict: bool = False) -> T:
    """A validated `cls` from mapping `d` (missing keys take their defaults), then its own `check()` if it has one
    (whose keyed errors come back as `WHERE: 'PREFIX.key' message`)."""
    if not isinstance(d, dict):
        raise LorasumError(_at(where, f"{f'{prefix.rstrip(chr(46))!r} ' if prefix else ''}expected a mapping of "
                                      f"{cls.__name__} keys, got {show(d)}"))
    types_ = field_types(cls)
    check_keys(d, types_, where, prefix)
    values = {}
    for name, v in d.items():
        if v is None and dataclasses.is_dataclass(types_[name]):
            continue  # an empty nested section (`train:` in YAML) means its defaults
        try:
            values[name] = convert(types_[name], v, where, f"{prefix}{name}.", strict)
        except Mismatch:
            raise LorasumError(_at(where, f"'{prefix}{name}' must be {describe(types_[name])}, got {show(v, 80)}")) from None
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LorasumError(_at(where, f"'{prefix}{missing[0]}' is required"))
    obj = cls(**values)
    if hasattr(obj, "check"):
        try:
            obj.check()
        except LorasumError as e:
            raise LorasumError(_at(where, f"'{prefix}{e.key}' {e.message}" if e.key else str(e))) from None
    return obj


def _at(where: str | None, message: str) -> str:
    """`WHERE: message`, or the bare message for a nested section whose caller adds the place."""
    return f"{where}: {message}" if where else message


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (dotted names), for 'made with a different config'."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
