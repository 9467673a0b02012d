"""The grid of the paper (§4) as small typed values: partitions, the models evaluated, and the compositions.

A partition is a subset of the domains, named `a+b`; one adapter is trained per partition (up to `max_level`
domains) and seed. A `Model` is base + Σ wᵢ·adapter(partitionᵢ), judged on the test sets of its `subset`. Model
names (`sum[math+medicine]`) are made here, once, from the typed value; everything else looks models up by kind
and subset, never by parsing a name.

A composition is one registry line: a function from a subset of ≥ 2 domains (or, for `whole`, the full list) to the
models it adds. A `baseline` composition needs nothing else: results give each of its models a perplexity, macro
mean and paired %Δ against the merged-data adapter, and the report shows them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..delta.registry import METHODS, ROUTES, graded


def partition_name(domains) -> str:
    return "+".join(domains)


def subsets(domains: list[str], level: int, min_size: int = 1) -> list[tuple[str, ...]]:
    """Non-empty subsets of the domains up to `level` domains, in config order (singletons first)."""
    return [c for k in range(min_size, level + 1) for c in itertools.combinations(domains, k)]


@dataclass(frozen=True)
class Model:
    """base + Σ weight · adapter(partition) over `terms`, judged on the test sets of `subset`."""

    kind: str  # "base", "adapter", or a composition's kind ("sum", "mean", "level2_plus_one", "unlearn", ...)
    subset: tuple[str, ...]
    terms: tuple[tuple[str, float], ...]
    removed: str | None = None  # unlearning: the domain subtracted
    added: str | None = None  # level-2 block + fundamental: the fundamental added
    method: str | None = None  # merge method (delta.methods) applied to the terms; None: the exact sum
    params: tuple[tuple[str, float], ...] = ()  # its hyperparameters, sorted by name

    @property
    def name(self) -> str:
        part = partition_name(self.subset)
        if self.params:
            return f"{self.kind}({', '.join(f'{k}={v:g}' for k, v in self.params)})[{part}]"
        if self.kind == "base":
            return "base"
        if self.kind == "level2_plus_one":
            return f"level2+1[{self.terms[0][0]}|{self.added}]"
        if self.kind == "unlearn":
            w = -self.terms[1][1]
            return f"unlearn[{self.terms[0][0]}-{self.removed}]" if w == 1.0 else \
                f"unlearn[{self.terms[0][0]}-{w:g}*{self.removed}]"
        return f"{self.kind}[{part}]"

    @property
    def weight(self) -> float:
        """Unlearning: λ, the weight of the subtracted fundamental."""
        return -self.terms[1][1] if self.kind == "unlearn" else 1.0

    def as_dict(self) -> dict:
        """The results.json form: {"kind", "subset", "terms": [[partition, weight], ...]} (+ "removed")."""
        d = {"kind": self.kind, "subset": list(self.subset), "terms": [[p, w] for p, w in self.terms]}
        if self.method is not None:
            d = {**d, "method": self.method, "params": dict(self.params)}
        return {**d, "removed": self.removed} if self.removed is not None else d


BASE = Model("base", (), ())


def adapter(subset) -> Model:
    """The adapter trained on the merged data of `subset` (a fundamental block for one domain)."""
    return Model("adapter", tuple(subset), ((partition_name(subset), 1.0),))


@dataclass(frozen=True)
class Composition:
    """A way of combining trained adapters that the grid evaluates beside the merged-data adapter."""

    name: str  # the key in the config's `compositions`
    per_subset: Callable[[tuple[str, ...]], list[Model]] = lambda s: []  # models for a subset of >= 2 domains
    whole: Callable[[list[str], list[float]], list[Model]] = lambda domains, weights: []  # need every domain
    baseline: bool = False  # results give each model ppl, macro and %Δ vs merged under `baselines[name]`
    method: bool = False  # a merge method: per_subset(s, grid) gives one model per hyperparameter point


def default_grid(name: str) -> dict[str, list[float]] | None:
    """The hyperparameter points tried for a merge method, the best chosen on validation, as its parameters declare
    them (delta.registry; the config's `method_grid` replaces a method's); None where there are none to try (one
    point: the defaults)."""
    method = graded().get(name)
    return (method.grid or None) if method is not None else None


DEFAULT_COMPOSITIONS = ["sum", "mean", "best_single", "level2_plus_one", "unlearning"]


def grid_points(grid: dict[str, list[float]] | None) -> list[tuple[tuple[str, float], ...]]:
    """Every point of a hyperparameter grid, as sorted (name, value) tuples, in the grid's order."""
    names = sorted(grid or {})
    return [tuple(zip(names, values)) for values in itertools.product(*((grid or {})[n] for n in names))]


def _method(name: str, s: tuple[str, ...], grid: dict | None = None) -> list[Model]:
    """A merge method of delta.methods over the subset's blocks (weights 1), one model per grid point."""
    return [Model(name, s, tuple((d, 1.0) for d in s), method=name, params=p) for p in grid_points(grid)]


def _weight_search(s: tuple[str, ...], grid: dict | None = None) -> list[Model]:
    """The exact sum at weights searched on the subset's validation split (tune.weights)."""
    return [Model("weight_search", s, tuple((d, 1.0) for d in s), method="sum")]


def _sum(s: tuple[str, ...]) -> list[Model]:
    """The paper's naive summation: Σ ΔW of the subset's fundamental blocks."""
    return [Model("sum", s, tuple((d, 1.0) for d in s))]


def _mean(s: tuple[str, ...]) -> list[Model]:
    """The mean of the blocks (weights 1/k): does summation harm only by scale?"""
    return [Model("mean", s, tuple((d, 1.0 / len(s)) for d in s))]


def _level2_plus_one(s: tuple[str, ...]) -> list[Model]:
    """Paper Table 4: a level-2 block (trained on two domains' merged data) plus the remaining fundamental."""
    if len(s) != 3:
        return []
    return [Model("level2_plus_one", s, ((partition_name([x for x in s if x != d]), 1.0), (d, 1.0)), added=d)
            for d in s]


def _unlearning(domains: list[str], weights: list[float]) -> list[Model]:
    """Unlearning by subtraction: the all-domain block minus λ · one fundamental, for each swept λ (λ = 1 first:
    the paper's plain subtraction)."""
    full = partition_name(domains)
    lams = [1.0] + sorted(w for w in weights if w != 1.0)
    return [Model("unlearn", tuple(x for x in domains if x != d), ((full, 1.0), (d, -lam)), removed=d)
            for d in domains for lam in lams]


COMPOSITIONS: dict[str, Composition] = {c.name: c for c in (
    Composition("sum", per_subset=_sum),
    Composition("mean", per_subset=_mean, baseline=True),
    Composition("best_single"),  # no models of its own: chosen among the fundamentals on validation
    Composition("level2_plus_one", per_subset=_level2_plus_one),
    Composition("unlearning", whole=_unlearning),
    Composition("prompt_router"),  # no models of its own: each example served by a fundamental chosen from its prompt
    Composition("repair"),  # its adapters are trained (units.repair): the sum continued on merged data
    Composition("forecast"),  # no models: what predicts a pair's summing cost before its sum is evaluated
    *(Composition(m, per_subset=partial(_method, m), method=True) for m in METHODS if m not in ("sum", "mean")),
    Composition("weight_search", per_subset=_weight_search, method=True),
    *(Composition(r, per_subset=partial(_method, r), method=True) for r in ROUTES),
)}
METHOD_COMPOSITIONS = [n for n, c in COMPOSITIONS.items() if c.method]


@dataclass
class Catalog:
    """Every model a run evaluates, by name, in the grid's order; looked up by kind and subset."""

    models: dict[str, Model] = field(default_factory=dict)

    def add(self, m: Model) -> None:
        self.models[m.name] = m

    def find(self, kind: str, subset, added: str | None = None, removed: str | None = None,
             weight: float = 1.0) -> Model | None:
        want = (kind, tuple(subset), added, removed, weight)
        return next((m for m in self.models.values() if (m.kind, m.subset, m.added, m.removed, m.weight) == want),
                    None)

    def of(self, kind: str) -> list[Model]:
        return [m for m in self.models.values() if m.kind == kind]


def eval_domains(m: Model, domains: list[str], scope: str, best_single: bool, unlearning: bool) -> list[str]:
    """The domains whose test sets a model is evaluated on: all of them, or with scope "own" its subset's. Still
    everywhere with "own": the base model; a fundamental when the best single block of every pair is chosen; the
    unlearning models and the blocks trained without one domain, which are judged on the removed domain too."""
    everywhere = (scope == "all" or m.kind in ("base", "unlearn")
                  or (best_single and m.kind == "adapter" and len(m.subset) == 1)
                  or (unlearning and m.kind == "adapter" and len(m.subset) == len(domains) - 1))
    return list(domains) if everywhere else [d for d in domains if d in m.subset]


def model_catalog(domains: list[str], level: int, compositions: list[str],
                  unlearn_weights: list[float] = (1.0,), method_grid: dict | None = None) -> Catalog:
    """Base, an adapter per partition, then per subset of >= 2 domains each asked-for composition's models, then
    those that need every domain (only when the grid trains the all-domain block)."""
    cat = Catalog()
    cat.add(BASE)
    for s in subsets(domains, level):
        cat.add(adapter(s))
    for s in subsets(domains, level, 2):
        for name, comp in COMPOSITIONS.items():
            if name in compositions:
                grid = (method_grid or {}).get(name, default_grid(name))
                for m in comp.per_subset(s, grid) if comp.method else comp.per_subset(s):
                    cat.add(m)
    if level == len(domains):
        for name, comp in COMPOSITIONS.items():
            if name in compositions:
                for m in comp.whole(list(domains), list(unlearn_weights)):
                    cat.add(m)
    return cat
