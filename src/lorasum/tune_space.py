"""The search space of `lorasum tune`: which training parameters may vary, their defaults, and the parsing and
validation of a space given as YAML (`--space FILE`) or inside the experiment config (`tune.space`)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LorasumError
from .fieldtypes import coerce_float
from .train import TrainConfig

# Parameters the search may vary, with their type. r, alpha, max_length and targets are fixed across partitions.
TUNABLE: dict[str, type] = {"dropout": float, "batch_size": int, "epochs": int, "lr": float,
                            "warmup_ratio": float, "weight_decay": float}
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


def _number(v: Any, kind: type) -> bool:
    return not isinstance(v, bool) and (isinstance(v, int) if kind is int else isinstance(v, (int, float)))


def _coerce(name: str, v: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string: accept it for float parameters."""
    return coerce_float(v) if TUNABLE[name] is float else v


def _check_value(name: str, v: Any, where: str) -> None:
    kind = TUNABLE[name]
    if not _number(v, kind) or (kind is float and not math.isfinite(v)):
        raise LorasumError(f"{where}: '{name}' values must be {'integers' if kind is int else 'numbers'}, got {v!r}")
    try:
        TrainConfig(**{name: v}).validate()
    except LorasumError as e:
        raise LorasumError(f"{where}: '{name}' value {v!r} is not allowed ({e})") from None


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
            raise LorasumError(f"{where}: unknown parameter '{name}'; {hint}tunable: {', '.join(TUNABLE)}")
        if not isinstance(spec, dict):
            raise LorasumError(f"{where}: '{name}' must be {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
        keys = set(spec)
        if keys == {"choices"}:
            ch = [_coerce(name, v) for v in spec["choices"]] if isinstance(spec["choices"], list) else None
            if not ch:
                raise LorasumError(f"{where}: '{name}' has an empty 'choices' list; give at least one value")
            for v in ch:
                _check_value(name, v, where)
            if len(set(ch)) != len(ch):
                raise LorasumError(f"{where}: '{name}' lists a choice more than once: {ch}")
            space[name] = Param(name, choices=tuple(ch))
            continue
        if not {"low", "high"} <= keys <= {"low", "high", "log"}:
            raise LorasumError(f"{where}: '{name}' needs 'low' and 'high' (optional 'log') or only 'choices'; "
                               f"got keys {sorted(keys)}")
        low, high, log = _coerce(name, spec["low"]), _coerce(name, spec["high"]), spec.get("log", False)
        _check_value(name, low, where)
        _check_value(name, high, where)
        if not isinstance(log, bool):
            raise LorasumError(f"{where}: '{name}.log' must be true or false, got {log!r}")
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
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LorasumError(f"cannot read --space {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LorasumError(f"--space {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_space(data, f"--space {path}")


def space_yaml(space: Space) -> str:
    import yaml

    return yaml.safe_dump(space_dict(space), sort_keys=False, default_flow_style=None)
