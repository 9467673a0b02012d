"""Where the cost of a composition lands: per member domain, the composed model's test perplexity against that
domain's own fundamental block and against the merged-data block, for the exact sum, each route (Arrow) at its point
chosen on validation, and the composition best on validation (when the run ranks merge methods and it is neither).

The pooled gap splits exactly (per seed, in NLL per token, T the subset's test tokens):

    log(ppl_model / ppl_merged) = log(ppl_model / ppl_oracle) + log(ppl_oracle / ppl_merged)
                                = Σ_d (NLL_model,d − NLL_own,d) / T + Σ_d (NLL_own,d − NLL_merged,d) / T

The first sum is the interference, by domain: the other adapters' deltas disturbing d's inputs (the oracle serves d
with its own adapter alone). The second is the merged block's advantage over the domains' own adapters (the oracle's
gap), which no composition of these adapters removes by routing. Point values are means over seeds; the paired CIs
of the per-domain %Δ decide the verdicts (study.findings).
"""

from __future__ import annotations

import numpy as np

from ...delta.registry import ROUTES
from ..grid import adapter, subsets
from .routing import oracle_route
from .row import Row
from .unit import Assembly, Unit


def _nll_sum(r: Row, model, d: str) -> np.ndarray:
    """ΣNLL on domain d's test examples per seed (S,)."""
    return r.a.scores.scores(model, [d]).nll.sum(1)


def split_gap(r: Row, model: str) -> dict:
    """The model's pooled log-gap to the merged block, its interference part by domain and the oracle's gap (NLL per
    token, mean over seeds); parts sum to the gap."""
    tokens = r.a.scores.scores(r.merged, r.doms).tokens.sum()
    per = {d: (_nll_sum(r, model, d), _nll_sum(r, adapter([d]).name, d), _nll_sum(r, r.merged, d))
           for d in r.s}
    by_domain = {d: float(np.mean((m - own) / tokens)) for d, (m, own, _) in per.items()}
    oracle_gap = float(np.mean(sum((own - merged) / tokens for _, own, merged in per.values())))
    return {"log_gap": sum(by_domain.values()) + oracle_gap, "interference": sum(by_domain.values()),
            "interference_by_domain": by_domain, "oracle_gap": oracle_gap}


def model_cost(r: Row, model: str) -> dict:
    """Per domain: the model's perplexity, %Δ vs the domain's own block and vs merged (paired CIs); pooled: %Δ vs
    the oracle router; and the split of its gap."""
    return {"model": model, "vs_oracle": r.a.pct(model, oracle_route(r.s), r.doms), **split_gap(r, model),
            "domains": {d: {"perplexity": r.a.ppl(model, [d]), "vs_own": r.a.pct(model, adapter([d]).name, [d]),
                            "vs_merged": r.a.pct(model, r.merged, [d])} for d in r.s}}


def _row(r: Row, comp: dict) -> dict:
    """The subset's own blocks and merged block per domain, then the sum and (where one was chosen on validation
    and it is not the sum) the best merge method."""
    models = {}
    summed = r.a.plan.models.find("sum", r.s)
    if summed is not None:
        models["sum"] = model_cost(r, summed.name)
    for name in ROUTES:  # each route at its point chosen on validation
        chosen = comp.get("baselines", {}).get(name)
        if chosen:
            models[name] = {"method": name, **model_cost(r, chosen["model"])}
    choice = comp.get("method_choice")
    if choice and choice["best"] != "sum" and choice["best"] not in models:
        models["best_on_validation"] = {"method": choice["best"], **model_cost(r, choice["best_model"])}
    return {"subset": r.doms, "level": len(r.s),
            "own": {d: r.a.ppl(adapter([d]).name, [d]) for d in r.s},
            "merged": {d: r.a.ppl(r.merged, [d]) for d in r.s}, "models": models}


def assemble(a: Assembly, out: dict) -> dict:
    comps = {tuple(c["subset"]): c for c in out.get("compositions", [])}
    return {"cost_by_domain": [_row(Row(a, out, s), comps.get(s, {}))
                               for s in subsets(a.cfg.domains, a.cfg.level, 2)]}


UNIT = Unit("cost_by_domain", assemble)
