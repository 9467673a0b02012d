"""What an analysis unit is: the jobs it plans and how it assembles its part of results.json from their artifacts.

A unit's `plan` adds its jobs to one init mode's plan through the Planner (typed keys: study.plan); its `assemble`
returns its top-level keys of results.json, reading its artifacts by the same keys through an Assembly, and may
read the parts of the units registered before it (`out`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ...stats import Scores, bootstrap_ppl, paired_pct_change
from ..config import ExperimentConfig
from ..plan import Plan, Planner, SimKey
from ..scores import RunScores, load


Served = str | Mapping[str, str] | Scores  # a model's name, a route {domain: model}, or a per-example router's scores


def _mean_layers(per_seed: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}


@dataclass
class Assembly:
    """What a unit reads when it assembles: the config, its init mode's plan and the eval scores; a run-scope
    unit also every mode's assembled body (`bodies`, by init mode)."""

    cfg: ExperimentConfig
    plan: Plan
    scores: RunScores
    bodies: dict[str, dict] = field(default_factory=dict)

    def ppl(self, model: Served, domains: list[str]) -> dict:
        """Pooled test perplexity of a model (or a route {domain: model}) over the domains, with its bootstrap
        interval."""
        cfg = self.cfg
        return bootstrap_ppl(self._scores(model, domains), cfg.bootstrap_samples, cfg.ci_level, cfg.bootstrap_seed)

    def pct(self, a: Served, b: Served, domains: list[str]) -> dict:
        """Paired %Δ of model (or route) `a`'s pooled test perplexity against `b`'s."""
        cfg = self.cfg
        return paired_pct_change(self._scores(a, domains), self._scores(b, domains), cfg.bootstrap_samples,
                                 cfg.ci_level, cfg.bootstrap_seed)

    def _scores(self, model: Served, domains: list[str]) -> Scores:
        """A model's (or route's) test scores over the domains; Scores built elsewhere (a per-example router's) as
        given."""
        return model if isinstance(model, Scores) else self.scores.scores(model, domains)

    def sim_runs(self, what: str, subset: tuple[str, ...], domain: str | None = None) -> list[dict]:
        """A similarity's artifact for each seed."""
        return [load(self.plan.sims[SimKey(what, subset, s, domain)]) for s in self.cfg.seeds]

    def sim(self, what: str, subset: tuple[str, ...], domain: str | None = None) -> dict:
        """A similarity, mean over seeds: per-layer cosines, RMS (and per seed), norms, factor similarities and the
        random null where the job computed them."""
        per_seed = self.sim_runs(what, subset, domain)
        out = {"layers": _mean_layers([p["layers"] for p in per_seed]),
               "rms": float(np.mean([p["rms"] for p in per_seed])), "rms_per_seed": [p["rms"] for p in per_seed],
               "norm_a": _mean_layers([p["norm_a"] for p in per_seed]),
               "norm_b": _mean_layers([p["norm_b"] for p in per_seed])}
        if "factors" in per_seed[0]:  # single adapters on both sides: their A and B subspace similarity
            out["factors"] = {k: float(np.mean([p["factors"][f"mean_{k}"] for p in per_seed])) for k in ("A", "B")}
        if "null" in per_seed[0]:
            out["null"] = per_seed[0]["null"]  # depends on shapes alone
        return out


def no_jobs(planner: Planner) -> None:
    """A unit that reads only other units' jobs (or parts) plans nothing."""


@dataclass(frozen=True)
class Unit:
    """One table or analysis of the report: the jobs it needs and its part of results.json.

    `scope` "mode": planned and assembled for each init mode (the primary mode's part at the top level of
    results.json, every mode's in `bodies`); "run": assembled once, from the primary mode's plan, after the modes.
    """

    name: str
    assemble: Callable[[Assembly, dict], dict]
    plan: Callable[[Planner], None] = no_jobs
    scope: str = "mode"
