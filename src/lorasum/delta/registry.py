"""The merge methods' registry: one row per method, naming its function and declaring its parameters.

A parameter is declared once (`Param`: name, type, default, bounds, help, the experiment's default grid points) and
listed in the rows of the methods that take it, as mergekit declares a `ConfigParameterDef` beside each merge method.
Validation (`method_params`), the command-line flags and their help (`cli.algebra.add_method_args`) and the grid's
default points (`study.grid.default_grid`) all read these rows. The module imports no torch, so that the command
line builds its flags from it and `lorasum --help` stays fast; each row names its function, which lives in
`delta.methods` (lorasum's own) or `lm.peft_merge` (PEFT's own, run on a loaded model).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LorasumError, show


@dataclass(frozen=True)
class Param:
    """A method's hyperparameter: a number of type `kind` in the interval [low, high] (an end excluded where `_open`),
    `default` when not given; `help` and `metavar` describe its flag, `grid` the points an experiment tries by
    default (none: the default only); `what` and `hint` word the range error: "must be {what} in [..], got x; {hint}".
    """

    name: str
    kind: type  # float or int: what its flag's text is read as
    default: float | int
    low: float | int
    high: float | int
    low_open: bool = False
    high_open: bool = False
    help: str = ""
    metavar: str = ""
    grid: tuple = ()
    what: str = ""
    hint: str = ""

    @property
    def interval(self) -> str:
        """`(0, 1]`, `[0, 2**63)`: the bounds as the messages write them."""
        return f"{'(' if self.low_open else '['}{_bound(self.low)}, {_bound(self.high)}{')' if self.high_open else ']'}"

    def parse(self, text):
        """A flag's text as `kind`, or None if not given; anything else is an error naming the parameter."""
        if text is None or isinstance(text, self.kind):
            return text
        try:
            return self.kind(str(text).strip())
        except ValueError:
            what = "a whole number" if self.kind is int else "a number"
            raise LorasumError(f"must be {what}, got '{text}'", key=self.name) from None

    def check(self, value) -> None:
        """Refuse a value of the wrong type or outside the interval, naming the parameter, its bounds and the hint."""
        if not (self._typed(value) and self._within(value)):
            what = f"{self.what} " if self.what else ""
            hint = f"; {self.hint}" if self.hint else ""
            raise LorasumError(f"must be {what}in {self.interval}, got {show(value)}{hint}", key=self.name)

    def _typed(self, x) -> bool:
        if isinstance(x, bool):
            return False
        if self.kind is int:
            return isinstance(x, int)
        return isinstance(x, (int, float)) and math.isfinite(x)

    def _within(self, x) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below


def _bound(x) -> str:
    """A bound as written in messages: `1`, `-1000`, and a large power of two as `2**63`."""
    if isinstance(x, int) and x > 2**32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}"


@dataclass(frozen=True)
class Method:
    """A registry row: its function's name (in delta.methods, or lm.peft_merge for PEFT's rows), whether it takes
    dense ΔW, its parameters, and a rule relating several of them (called with every checked value). A method that
    takes `seed` draws random masks (it is run per layer under a seed derived from `seed` and the layer)."""

    fn: str
    dense: bool = False
    params: tuple[Param, ...] = ()
    check: Callable[[dict], None] | None = None

    @property
    def random(self) -> bool:
        return any(p.name == "seed" for p in self.params)

    @property
    def grid(self) -> dict[str, list]:
        """The experiment's default points: {parameter: [values]} for the parameters that declare some."""
        return {p.name: list(p.grid) for p in self.params if p.grid}


MAX_LAM = 1000.0  # task_arithmetic's λ: beyond this the scaled deltas swamp the base model (or overflow)
DENSITY = Param("density", float, 0.2, 0, 1, low_open=True, metavar="D", grid=(0.1, 0.2, 0.5),
                help="kept fraction of each delta, in (0, 1]",
                hint="e.g. --density 0.2 keeps 20% of each ΔW")
GAMMA = Param("gamma", float, 0.01, 0, 1, high_open=True, metavar="G", grid=(0.01,),
              help="fraction of largest entries dropped", hint="e.g. --gamma 0.01 drops the top 1%")
LAM = Param("lam", float, 1.0, -MAX_LAM, MAX_LAM, metavar="λ", grid=(0.5, 1.0), help="scale of the summed deltas",
            what="a finite number", hint="task arithmetic's λ is usually 0.3 to 1.5")
SEED = Param("seed", int, 0, 0, 2**63, high_open=True, metavar="S", help="seed of the drop masks",
             what="a whole number")


def _kept_after_dropped(params: dict) -> None:
    """Breadcrumbs drops the top γ share and keeps the next `density` share: together at most everything."""
    g, d = params["gamma"], params["density"]
    if d + g > 1:
        raise LorasumError(f"{g:g} plus density {d:g} exceeds 1 (dropped top share + kept share); lower one of them",
                           key="gamma")


METHODS: dict[str, Method] = {
    "sum": Method("sum_"),
    "mean": Method("mean"),
    "task_arithmetic": Method("task_arithmetic", params=(LAM,)),
    "ties": Method("ties", dense=True, params=(DENSITY,)),
    "dare_linear": Method("dare_linear", dense=True, params=(DENSITY, SEED)),
    "dare_ties": Method("dare_ties", dense=True, params=(DENSITY, SEED)),
    "magnitude_prune": Method("magnitude_prune", dense=True, params=(DENSITY,)),
    "breadcrumbs": Method("breadcrumbs", dense=True, params=(DENSITY, GAMMA), check=_kept_after_dropped),
}

# PEFT's own add_weighted_adapter combinations, as comparison rows: run on a loaded model (lm.peft_merge).
PEFT_METHODS: dict[str, Method] = {
    "peft_linear": Method("peft_linear"),
    "peft_ties": Method("peft_ties", params=(DENSITY,)),
}


TOP_K = Param("top_k", int, 1, 1, 64, metavar="K", grid=(1, 2), help="adapters mixed per token by the router",
              what="a whole number")
ROUTER_TEMPERATURE = Param("router_temperature", float, 1.0, 0, 1000, low_open=True, metavar="T", grid=(0.1, 1.0),
                           help="softmax temperature of the router's scores", what="a number",
                           hint="lower routes more sharply to the best-aligned adapter")

# Routes keep the adapters separate and mix them per token (lm.routing): evaluated like merge methods, never saved.
ROUTES: dict[str, Method] = {
    "arrow": Method("arrow", params=(TOP_K, ROUTER_TEMPERATURE)),
}


# Routes that choose per request, for `eval` and `generate` (lm.prompt_routing); an experiment's `prompt_router`
# composition computes the same choice from its own jobs.
REQUEST_ROUTES: dict[str, Method] = {
    "prompt": Method("prompt"),
}


def all_routes() -> dict[str, Method]:
    """Every route `--route` accepts."""
    return {**ROUTES, **REQUEST_ROUTES}


def all_methods() -> dict[str, Method]:
    """Every method a command accepts: lorasum's own, then PEFT's."""
    return {**METHODS, **PEFT_METHODS}


def graded() -> dict[str, Method]:
    """What an experiment grades per subset on validation: lorasum's merge methods and the routes."""
    return {**METHODS, **ROUTES}


def is_route(method: str) -> bool:
    """Whether the name is a route (adapters kept separate, lm.routing), not a merge."""
    return method in all_routes()


def needs_model(method: str) -> bool:
    """Whether the method combines on a loaded model (PEFT's own): the one test for a PEFT method."""
    return method in PEFT_METHODS


def check_method(name: str, known: dict = METHODS) -> str:
    """A known method name; otherwise an error suggesting the closest."""
    if name in known:
        return name
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise LorasumError(f"'{name}' is not a merge method; {hint}choose one of {', '.join(known)}", key="method")


def method_params(name: str, given: dict, registry: dict[str, Method] = METHODS) -> dict:
    """The method's hyperparameters: their declared defaults updated by `given` (names → values, None meaning not
    given), each checked against its declaration, then the method's own rule. A hyperparameter the method does not
    take is an error naming it."""
    method = registry[check_method(name, registry)]
    takes = {p.name for p in method.params}
    given = {k: v for k, v in given.items() if v is not None}
    for key in given:
        if key not in takes:
            has = ", ".join(f"--{k}" for k in sorted(takes)) or "no hyperparameters"
            raise LorasumError(f"is not a hyperparameter of method '{name}' (it takes {has}); leave it out",
                               key=key)
    params = {**{p.name: p.default for p in method.params}, **given}
    for p in method.params:
        p.check(params[p.name])
    if method.check is not None:
        method.check(params)
    return params


def method_label(method: str, params: dict) -> str:
    """`ties(density=0.2)`; empty for the plain sum."""
    if method == "sum":
        return ""
    return f"{method}({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else method


# The weight-space predictors of delta.predictors.WEIGHT_PREDICTORS, by name, without torch (the command line's
# `--predictor` choices); tests/test_predictors.py checks the two agree. Similarity predictors rank a pair by |value|
# (the smaller, the less the two deltas share); ratio predictors by |log value| (the nearer 1, the more balanced).
PREDICTOR_NAMES: tuple[str, ...] = ("rms", "max_abs_cosine", "cross_energy", "norm_ratio", "symmetric_norm_ratio",
                                    "a_subspace", "b_subspace")
RATIO_PREDICTORS: frozenset[str] = frozenset({"norm_ratio", "symmetric_norm_ratio"})
