"""Validation of every mapping lorasum reads: experiment configs, training parameters (`--params`), the tuning
section and search space, job specs. One mechanism for all of them.

A config is a dataclass: its annotations are the schema, its trailing comments document each field once. A field
declares its rules with its type: choices as `Literal["all", "answer"]`, bounds as `Annotated[int, Range(1, 4096)]`,
the rule in other words with `Wording(...)`, any other rule of that one field with `Rule(fn)`. An optional `check()`
method holds the rules that relate several fields, raising errors keyed by field.
`parse(cls, mapping, where)` refuses unknown keys (suggesting the closest known one), converts each value to its
annotated type, recurses into nested dataclasses, then applies the declared rules and `check()`; errors are one line
that names the key, e.g. `run.yaml: 'train.lr' must be a number, got 'fast'`.

YAML 1.1 (PyYAML) reads `1e-3` (no dot) as a string, so numeric strings are accepted where a number is declared,
except with `strict` (JSON sources: job specs, `--params` files, where a string is never a number).
A whole number given for a `float` field is kept as it was written (so `alpha: 64` hashes as it always did).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from .errors import LorasumError, show

T = TypeVar("T")
_FLOAT_MAX = sys.float_info.max


class Mismatch(Exception):
    """A value is not of the declared type (raised by `convert`; `parse` turns it into a LorasumError). Its optional
    argument says what was expected where the type's own words would not (a section's YAML shorthands)."""


@dataclass(frozen=True)
class Range:
    """Bounds of a number, declared on its field (`Annotated[int, Range(1, 4096)]`); open ends exclude the bound.
    A value outside them, or not finite, is refused with the field's key."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        above = self.low is None or (v > self.low if self.low_open else v >= self.low)
        return above and (self.high is None or (v < self.high if self.high_open else v <= self.high))

    def words(self) -> str:
        """'at least 1 and at most 4096', 'at least 1', '> 0' or 'in [0, 1)'."""
        low, high = _num(self.low), _num(self.high)
        if self.high is None:
            return f"> {low}" if self.low_open else f"at least {low}"
        if self.low is not None and not (self.low_open or self.high_open):
            return f"at least {low} and at most {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Wording:
    """A field's rule in words (what follows 'must be'), where the default words of its Range or choices do not
    fit, e.g. `Annotated[int | None, Range(1, 1024), Wording("at least 1 and at most 1024 (or null for all)")]`."""

    text: str


@dataclass(frozen=True)
class Rule:
    """Any other rule of one field (distinct items, known names): `fn(value)` raises a LorasumError whose message
    the schema keys with the field. Rules that relate several fields belong in the dataclass's `check()`."""

    fn: Callable[[Any], None]


def _num(x: float | None) -> str:
    return str(x) if isinstance(x, int) or x is None else f"{x:g}"


def number_text(v: Any) -> str:
    """A refused value as its message quotes it: a number as written, a huge integer by its first digits and
    length rather than thousands of digits, anything else by `show`."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or isinstance(v, int) and v.bit_length() > 14_000:
        return show(v)  # (str() refuses integers past 4300 digits)
    text = str(v)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def describe(tp: Any) -> str:
    """A declared type in words: `int | None` -> 'an integer or null'."""
    if typing.get_origin(tp) is Annotated:
        return describe(typing.get_args(tp)[0])
    if typing.get_origin(tp) is Literal:
        return describe(type(typing.get_args(tp)[0]))
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
    if origin is Annotated:
        return convert(args[0], v, where, prefix, strict)
    if origin is Literal:
        return convert(type(args[0]), v, where, prefix, strict)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        misses = []
        for a in args:
            if a is not type(None):
                try:
                    return convert(a, v, where, prefix, strict)
                except Mismatch as e:
                    misses.append(e)
        raise next((e for e in misses if e.args), Mismatch())
    if origin is list:
        if not isinstance(v, list):
            raise Mismatch
        return [convert(args[0], x, where, prefix, strict) for x in v]
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict) and hasattr(tp, "shorthand"):
            v = tp.shorthand(v)  # e.g. `tune: shared` for `tune: {mode: shared}`; None means the section is off
            if v is None:
                return None
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


def refusal(tp: Any, v: Any, wording: str | None = None) -> str | None:
    """Why `v`, already of declared type `tp`, breaks a rule declared in `tp` (choices, Range, Rule), as the message
    after the key ('must be at least 1 and at most 4096, got 0'); None if it breaks none. A rule on a list applies
    before the rules on its items."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if v is None:
        return None
    if origin is Annotated:
        meta = args[1:]
        wording = next((m.text for m in meta if isinstance(m, Wording)), wording)
        for m in meta:
            if isinstance(m, Range) and not m.holds(v):
                return f"must be {wording or m.words()}, got {number_text(v)}"
            if isinstance(m, Rule):
                try:
                    m.fn(v)
                except LorasumError as e:
                    return e.message
        return refusal(args[0], v, wording)
    if origin is Literal:
        return None if v in args else _choice_refusal(args, v, wording)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return refusal(arms[0], v, wording) if len(arms) == 1 else None
    if origin is list:
        return next((r for r in (refusal(args[0], x, wording) for x in v) if r), None)
    return None


def _choice_refusal(allowed: tuple, v: Any, wording: str | None) -> str:
    """'must be 'all' or 'answer', got 'answr'; did you mean 'answer'?' (two choices are quoted, more are listed)."""
    words = wording or (" or ".join(map(show, allowed)) if len(allowed) == 2 else f"one of {', '.join(allowed)}")
    close = difflib.get_close_matches(v, allowed, n=1) if isinstance(v, str) else []
    return f"must be {words}, got {show(v)}" + (f"; did you mean '{close[0]}'?" if close else "")


def require(tp: Any, value: Any, key: str) -> Any:
    """`value` given in code or as a command-line flag (not parsed from a mapping) checked against declared type
    `tp`, e.g. `require(Seed, args.seed, "seed")`: returns it, or raises a LorasumError keyed by `key`."""
    base = _base(tp)
    numbers = int if base is int else (int, float)
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, numbers)):
        raise LorasumError(f"must be {_words(tp)}, got {number_text(value)}", key=key)
    message = refusal(tp, value)
    if message:
        raise LorasumError(message, key=key)
    return value


def _base(tp: Any) -> Any:
    """The type under Annotated and `| None`."""
    while typing.get_origin(tp) in (Annotated, typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _words(tp: Any) -> str:
    """The rule of a declared number type in words: its Wording, else its Range's."""
    meta = typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ()
    text = next((m.text for m in meta if isinstance(m, Wording)), None)
    return text or next((m.words() for m in meta if isinstance(m, Range)), describe(tp))


def check_count(value: int, key: str, high: int) -> int:
    """The one rule for a count (rank, batch size, epochs, trials, workers) given in code or as a flag: a whole
    number in [1, high], worded as a field declared `Annotated[int, Range(1, high)]`."""
    return require(Annotated[int, Range(1, high)], value, key)


def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass, without its declared rules (`Annotated` stripped)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.cache
def declared_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass, with its declared rules (resolved once per class)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(obj: Any) -> None:
    """The rules declared on each field of dataclass `obj` (in field order), as a LorasumError keyed by the field.
    Nested dataclasses are not entered: `parse` checks each when it builds it."""
    for name, tp in declared_types(type(obj)).items():
        message = refusal(tp, getattr(obj, name))
        if message:
            raise LorasumError(message, key=name)


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
    """A validated `cls` from mapping `d` (missing keys take their defaults): the rules declared on its fields, then
    its own `check()` if it has one (keyed errors come back as `WHERE: 'PREFIX.key' message`)."""
    if not isinstance(d, dict):
        raise LorasumError(_at(where, f"{f'{prefix.rstrip(chr(46))!r} ' if prefix else ''}expected a mapping of "
                                      f"{cls.__name__} keys, got {show(d)}"))
    types_ = declared_types(cls)
    check_keys(d, types_, where, prefix)
    values = {}
    for name, v in d.items():
        if v is None and dataclasses.is_dataclass(types_[name]):
            continue  # an empty nested section (`train:` in YAML) means its defaults
        try:
            values[name] = convert(types_[name], v, where, f"{prefix}{name}.", strict)
        except Mismatch as e:
            expected = e.args[0] if e.args else describe(types_[name])
            raise LorasumError(_at(where, f"'{prefix}{name}' must be {expected}, got {show(v, 80)}")) from None
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise LorasumError(_at(where, f"'{prefix}{missing[0]}' is required"))
    obj = cls(**values)
    try:
        check_fields(obj)
        if hasattr(obj, "check"):
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
