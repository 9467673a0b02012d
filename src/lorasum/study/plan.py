"""One init mode's plan: every job spec of the grid under a typed key, and the model catalog.

The analysis units (study.units) declare their jobs through a Planner and read the artifacts back by the same
keys: a key names what a job is about (an eval: model, domain, seed, split), its spec says how to compute it, and
the spec's content hash (`with_key`) is where its artifact lives.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..delta.registry import ROUTES
from ..lm.train import TrainConfig
from .config import ExperimentConfig
from .grid import Catalog, Model, model_catalog
from .specs import SpecContext, Terms, data_sources, data_stats_spec, eval_spec, inplace_spec, method_fields, \
    predictors_spec, prompt_route_spec, repair_spec, throughput_spec, search_spec, similarity_spec, train_spec

SECOND = "second"  # a train job's sample: the disjoint second sample of a domain's records (the same-domain ceiling)


@dataclass(frozen=True)
class TrainKey:
    """The adapter of a partition (domains joined by '+') trained with one seed; `sample` SECOND: on the second
    sample of its records."""

    partition: str
    seed: int
    sample: str = ""


@dataclass(frozen=True)
class EvalKey:
    """A model of the catalog (by name) on one domain's split, with the adapters of one seed."""

    model: str
    domain: str
    seed: int
    split: str = "test"


@dataclass(frozen=True)
class SimKey:
    """A similarity between two sides of adapters of one seed: `what` names the comparison (pair, ceiling, seeds,
    weight, block_vs_rest, level2_plus_one, or a unit's own), `subset` the domains it is about, `domain` the one
    singled out (the block set against the rest, the fundamental added to a level-2 block)."""

    what: str
    subset: tuple[str, ...]
    seed: int
    domain: str | None = None


@dataclass(frozen=True)
class SearchKey:
    """The weight search of a weight_search model (by name) over the adapters of one seed."""

    model: str
    seed: int


@dataclass(frozen=True)
class CheckKey:
    """The in-place unlearning check that removes one domain's fundamental, for one seed."""

    removed: str
    seed: int


@dataclass
class Plan:
    """Every job of one init mode's grid by typed key, and the catalog of the models it evaluates."""

    init: str
    models: Catalog
    train: dict[TrainKey, dict] = field(default_factory=dict)
    evals: dict[EvalKey, dict] = field(default_factory=dict)
    sims: dict[SimKey, dict] = field(default_factory=dict)
    checks: dict[CheckKey, dict] = field(default_factory=dict)
    searches: dict[SearchKey, dict] = field(default_factory=dict)
    data_stats: dict | None = None
    prompt_route: dict | None = None
    throughput: dict | None = None
    predictors: dict[SimKey, dict] = field(default_factory=dict)

    def jobs(self) -> list[dict]:
        """The jobs in an order that respects what each reads: adapters before the jobs that use them, weight
        searches before the evals that read their weights."""
        once = [j for j in (self.data_stats, self.prompt_route) if j]
        last = [self.throughput] if self.throughput else []
        return [*once, *self.train.values(), *self.sims.values(),
                *self.checks.values(), *self.searches.values(), *self.evals.values(), *self.predictors.values(), *last]


class Planner:
    """Builds a Plan: each job added under its typed key from the spec function of its kind (study.specs).

    Adapters are named by their train keys, so a unit plans the train jobs it reads before the jobs reading them
    (the `models` unit plans every partition's); a weight search is planned with the first eval that reads it.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, mode: str,
                 train_for: dict[str, TrainConfig] | None = None):
        self.cfg = cfg
        self.ctx = SpecContext(cfg, str(run_dir), mode, data_sources(cfg), dict(train_for or {}))
        self.plan = Plan(mode, model_catalog(cfg.domains, cfg.level, cfg.compositions, cfg.unlearn_weights,
                                             cfg.method_grid))

    def train(self, partition: str, seed: int, skip: dict | None = None) -> TrainKey:
        """The adapter of a partition and seed; with `skip` ({split: records passed over}) the second sample."""
        key = TrainKey(partition, seed, SECOND if skip else "")
        self.plan.train[key] = train_spec(self.ctx, partition, seed, skip)
        return key

    def terms(self, items: Iterable[tuple[str, float]], seed: int, sample: str = "") -> Terms:
        """Weighted partitions as a spec's adapter terms, by the keys of their (already planned) train jobs."""
        return [{"train_key": self.plan.train[TrainKey(p, seed, sample)]["key"], "weight": w} for p, w in items]

    def search(self, m: Model, seed: int) -> dict:
        """The weight search of a weight_search model, planned once."""
        key = SearchKey(m.name, seed)
        if key not in self.plan.searches:
            self.plan.searches[key] = search_spec(self.ctx, m, self.terms(m.terms, seed))
        return self.plan.searches[key]

    def eval(self, m: Model, domain: str, seed: int, split: str = "test") -> EvalKey:
        """Model `m` (its terms, merged by its method) on one domain's split."""
        search = self.search(m, seed)["key"] if m.kind == "weight_search" else None
        key = EvalKey(m.name, domain, seed, split)
        fields = method_fields(m, search)
        if self.cfg.general and m.method in ROUTES:  # GenKnowSub: the general-domain adapters subtracted first
            fields["general"] = self.terms([(self.train(g, seed).partition, 1.0) for g in self.cfg.general], seed)
        self.plan.evals[key] = eval_spec(self.ctx, self.terms(m.terms, seed), domain, split, fields)
        return key

    def similarity(self, key: SimKey, a: Iterable[tuple[str, float]], b: Iterable[tuple[str, float]],
                   b_sample: str = "", b_seed: int | None = None) -> SimKey:
        """Cosines between the weighted sums `a` and `b` of the key's seed (`b` from the `b_sample` adapters, or
        from those of `b_seed`)."""
        b_terms = self.terms(b, key.seed if b_seed is None else b_seed, b_sample)
        self.plan.sims[key] = similarity_spec(self.ctx, self.terms(a, key.seed), b_terms)
        return key

    def inplace(self, removed: str, seed: int) -> CheckKey:
        """The in-place removal of `removed`'s fundamental from the sum of every fundamental."""
        keys = [self.plan.train[TrainKey(d, seed)]["key"] for d in self.cfg.domains]
        key = CheckKey(removed, seed)
        self.plan.checks[key] = inplace_spec(self.ctx, keys, self.plan.train[TrainKey(removed, seed)]["key"])
        return key

    def data_stats(self) -> None:
        self.plan.data_stats = data_stats_spec(self.ctx)

    def repair(self, s: tuple[str, ...], seed: int, fraction: float) -> TrainKey:
        """The exact sum of the subset's fundamentals trained on its merged data for `fraction` of the merged block's
        optimizer steps (an adapter like any other, under its own train key)."""
        part = "+".join(s)
        key = TrainKey(part, seed, f"repair@{fraction:g}")
        start = self.terms([(d, 1.0) for d in s], seed)
        self.plan.train[key] = repair_spec(self.ctx, part, seed, start, fraction)
        return key

    def eval_adapter(self, name: str, key: TrainKey, domain: str, seed: int, split: str = "test") -> EvalKey:
        """A trained adapter that is not in the catalog (a repair), at weight 1, under the model name `name`."""
        ek = EvalKey(name, domain, seed, split)
        self.plan.evals[ek] = eval_spec(self.ctx, [{"train_key": self.plan.train[key]["key"], "weight": 1.0}], domain,
                                        split, {})
        return ek

    def prompt_route(self) -> None:
        self.plan.prompt_route = prompt_route_spec(self.ctx)

    def predictors(self, pair: tuple[str, str], seed: int, inputs: int) -> SimKey:
        """The predictors of a pair's summing cost from its fundamentals of one seed (units.forecast)."""
        key = SimKey("predictors", pair, seed)
        self.plan.predictors[key] = predictors_spec(self.ctx, self.terms([(pair[0], 1.0)], seed),
                                                    self.terms([(pair[1], 1.0)], seed), list(pair), inputs)
        return key

    def throughput(self, s: tuple[str, ...], seed: int, variants: list[str], params: dict) -> None:
        """The serving cost of the subset's fundamentals (lm.throughput), measured once per run."""
        terms = self.terms([(d, 1.0) for d in s], seed)
        self.plan.throughput = throughput_spec(self.ctx, terms, list(s), variants, params)
