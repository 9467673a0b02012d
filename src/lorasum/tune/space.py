"""The search space of `lorasum tune`: which training parameters may vary, their defaults, and the parsing and
validation of a space given as YAML (`--space FILE`) or inside the experiment config (`tune.space`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import yaml

from .. import schema
from ..errors import LorasumError, show
from ..lm.train import TrainConfig
from ..yamlfile import read_yaml

# Training parameters the search may vary (their types are TrainConfig's). r, alpha, max_length and targets stay
# fixed across partitions (paper §3).
TUNABLE: dict[str, type] = {name: tp for name, tp in schema.field_types(TrainConfig).items()
                            if name in ("dropout", "batch_size", "epochs", "lr", "warmup_ratio", "weight_decay")}
# The default search space (the paper tunes dropout, batch size and epochs; we add the learning rate).
DEFAULT_SPACE: dict[str, dict] = {
    "dropout": {"low": 0.0, "high": 0.2},
    "batch_size": {"choices": [4, 8, 16]},
    "epochs": {"low": 1, "high": 3},
    "lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True},
}


@dataclass(frozen=True)
class Param:
    """One searched parameter: a range `low..high` (log-uniform with `log`) or a set of `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def to_dict(self) -> dict:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, **({"log": True} if self.log else {})}

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if TUNABLE[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


Space = dict[str, Param]


def _value(name: str, v: Any, where: str) -> Any:
    """One value of parameter `name`, converted to its TrainConfig type and allowed by TrainConfig's rules."""
    try:
        x = schema.convert(TUNABLE[name], v)
    except schema.Mismatch:
        raise LorasumError(f"{where}: '{name}' values must be "
                           f"{'integers' if TUNABLE[name] is int else 'numbers'}, got {show(v)}") from None
    try:
        TrainConfig.from_dict({name: x}, where=None)
    except LorasumError as e:
        raise LorasumError(f"{where}: '{name}' value {show(v)} is not allowed ({e})") from None
    return x


def parse_space(d: Any, where: str = "space") -> Space:
    """Validate a space mapping {param: {low, high[, log]} | {choices: [...]}}; errors name the parameter."""
    if not isinstance(d, dict) or not d:
        raise LorasumError(f"{where}: expected a non-empty mapping of parameters, e.g. "
                           "{dropout: {low: 0.0, high: 0.2}, batch_size: {choices: [4, 8, 16]}}")
    space: Space = {}
    for name, spec in d.items():
        if name not in TUNABLE:
            close = difflib.get_close_matches(str(name), TUNABLE, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise LorasumError(f"{where}: unknown parameter {show(name)}; {hint}tunable: {', '.join(TUNABLE)}")
        if not isinstance(spec, dict):
            raise LorasumError(f"{where}: '{name}' must be {{low: .., high: ..}} or {{choices: [..]}}, got {show(spec)}")
        keys = set(spec)
        if keys == {"choices"}:
            ch = [_value(name, v, where) for v in spec["choices"]] if isinstance(spec["choices"], list) else None
            if not ch:
                raise LorasumError(f"{where}: '{name}' has an empty 'choices' list; give at least one value")
            if len(set(ch)) != len(ch):
                raise LorasumError(f"{where}: '{name}' lists a choice more than once: {show(ch)}")
            space[name] = Param(name, choices=tuple(ch))
            continue
        if not {"low", "high"} <= keys <= {"low", "high", "log"}:
            raise LorasumError(f"{where}: '{name}' needs 'low' and 'high' (optional 'log') or only 'choices'; "
                               f"got keys {sorted(keys)}")
        low, high, log = _value(name, spec["low"], where), _value(name, spec["high"], where), spec.get("log", False)
        if not isinstance(log, bool):
            raise LorasumError(f"{where}: '{name}.log' must be true or false, got {show(log)}")
        if low == high:
            raise LorasumError(f"{where}: '{name}' has an empty range (low = high = {low}); widen it, or drop "
                               f"'{name}' from the space to keep it fixed")
        if low > high:
            raise LorasumError(f"{where}: '{name}' has an inverted range (low {low} > high {high}); swap them")
        if log and low <= 0:
            raise LorasumError(f"{where}: '{name}' is log-scaled, so 'low' must be > 0, got {low}")
        space[name] = Param(name, low, high, log)
    return space


def default_space() -> Space:
    return parse_space(DEFAULT_SPACE, "default space")


def space_dict(space: Space) -> dict:
    return {name: p.to_dict() for name, p in space.items()}


def load_space(path: str) -> Space:
    """A YAML (or JSON) file holding the whole search space; parameters it omits keep their training value."""
    data = read_yaml(path, "--space", "write the space as a mapping {param: {low, high[, log]} | {choices}}")
    return parse_space(data, f"--space {path}")


def space_yaml(space: Space) -> str:
    return yaml.safe_dump(space_dict(space), sort_keys=False, default_flow_style=None)
