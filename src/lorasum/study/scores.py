"""Reading a run's artifacts back: per-example NLL of (model, domain, seed) from the eval files, stacked for the
bootstrap, and any artifact's JSON."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..jsonfile import read_json
from ..stats import Scores
from .config import ExperimentConfig
from .jobs import artifact_path
from .plan import EvalKey, Plan


def load(spec: dict) -> dict:
    """A finished job's JSON artifact; a damaged one is one error naming it (a rerun removes and recomputes it)."""
    return read_json(artifact_path(spec), "finished-job artifact", "rerun the experiment: it removes the damaged "
                     "artifact and runs its job again")


class RunScores:
    """Per-example NLL of (model, domain, seed) from the eval artifacts, stacked into stats.Scores."""

    def __init__(self, cfg: ExperimentConfig, plan: Plan):
        self.cfg, self.plan = cfg, plan
        self._cache: dict = {}

    def raw(self, model: str, domain: str, seed: int, split: str = "test") -> dict:
        key = EvalKey(model, domain, seed, split)
        if key not in self._cache:
            self._cache[key] = load(self.plan.evals[key])
        return self._cache[key]

    def scores(self, model: str | Mapping[str, str], domains: list[str], split: str = "test") -> Scores:
        """Per-example NLL over the domains' examples (seeds × examples). `model` is one model's name, or a route:
        {domain: model} serving each domain's examples with its own model (the oracle router)."""
        pick = model.__getitem__ if isinstance(model, Mapping) else (lambda d: model)
        nll = np.array([np.concatenate([self.raw(pick(d), d, s, split)["nll"] for d in domains])
                        for s in self.cfg.seeds])
        first = self.cfg.seeds[0]
        tokens = np.concatenate([self.raw(pick(d), d, first, split)["tokens"] for d in domains]).astype(float)
        strata = np.concatenate([np.full(len(self.raw(pick(d), d, first, split)["nll"]), i)
                                 for i, d in enumerate(domains)])
        return Scores(nll, tokens, strata)

    def point_ppl(self, model: str | Mapping[str, str], domains: list[str], split: str = "test") -> float:
        """Pooled perplexity, mean over seeds, without an interval (for choosing, not for reporting)."""
        s = self.scores(model, domains, split)
        return float(np.exp(s.nll.sum(1) / s.tokens.sum()).mean())
