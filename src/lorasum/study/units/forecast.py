"""What predicts the cost of summing two adapters before the sum is evaluated (composition `forecast`).

For every pair and seed a `predictors` job computes each candidate from the pair's two fundamentals: weight-space
ones from the factors, activation- and function-space ones on each domain's first FORECAST_INPUTS training questions
(prompts only). Per pair the values are averaged over seeds, as RMS is in the fit, and ranked against the pair's
measured %Δ (sum vs merged) by lorasum.forecast, whose rule decides "predicts" before any number is seen: at least 8
pairs, a domain-label permutation p below 0.05 after Holm's correction over every predictor tested, and a
leave-one-domain-out prediction error below that of predicting the training mean. The cost of each family is the
forward-pass token positions it runs against those of evaluating the sum on the pair's test split.
"""

from __future__ import annotations

import numpy as np

from ...forecast import rank_predictors
from ...lm.data import parse_spec
from ...lm.pair_predictors import FAMILIES
from ..grid import subsets
from ..plan import Planner, SimKey
from ..scores import load
from .unit import Assembly, Unit

FORECAST_INPUTS = 32  # training questions per domain the activation and function predictors read
MIN_PAIRS = 8  # no verdict below (lorasum.forecast)


def plan(p: Planner) -> None:
    if "forecast" not in p.cfg.compositions:
        return
    for seed in p.cfg.seeds:
        for pair in subsets(p.cfg.domains, p.cfg.level, 2):
            if len(pair) == 2:
                p.predictors(pair, seed, FORECAST_INPUTS)


def _sum_tokens(a: Assembly, pair: tuple[str, ...]) -> int:
    """Token positions scored when the sum is evaluated on the pair's test split (first seed): predicted tokens."""
    return int(a.scores.scores(a.plan.models.find("sum", pair).name, list(pair)).tokens.sum())


def assemble(a: Assembly, out: dict) -> dict:
    if "forecast" not in a.cfg.compositions:
        return {}
    rows = [c for c in out["compositions"] if c["level"] == 2 and "pct_change" in c]
    pairs = [tuple(c["subset"]) for c in rows]
    arts = {p: [load(a.plan.predictors[SimKey("predictors", p, s)]) for s in a.cfg.seeds] for p in pairs}
    names = list(arts[pairs[0]][0]["values"]) if pairs else []
    values = {n: [float(np.mean([x["values"][n] for x in arts[p]])) for p in pairs] for n in names}
    parents = {d: parse_spec(d)[0] for p in pairs for d in p}
    groups = {p: "within one parent domain" if parents[p[0]] == parents[p[1]] else "across parent domains"
              for p in pairs}
    ranked = rank_predictors(pairs, values, [c["pct_change"]["mean"] for c in rows],
                             groups if len(set(groups.values())) > 1 else None, seed=a.cfg.bootstrap_seed,
                             min_pairs=MIN_PAIRS)
    cost = {}
    if pairs:
        evals = float(np.mean([_sum_tokens(a, p) for p in pairs]))
        for fam in ("weight", "activation", "function"):
            run = float(np.mean([x["forward_tokens"][fam] for p in pairs for x in arts[p]]))
            cost[fam] = {"forward_tokens": run, "vs_sum_eval": run / evals}
    for r in ranked:
        r["family"] = FAMILIES.get(r["name"], "")
    return {"forecast": {"n_pairs": len(pairs), "inputs_per_domain": FORECAST_INPUTS, "tested": len(names),
                         "rule": RULE, "predictors": ranked, "cost": cost,
                         "values": {"|".join(p): {n: values[n][i] for n in names} for i, p in enumerate(pairs)},
                         "pct_change": {"|".join(c["subset"]): c["pct_change"]["mean"] for c in rows}}}


RULE = (f"A predictor 'predicts' the summing cost only with at least {MIN_PAIRS} pairs, a domain-label permutation "
        "p < 0.05 for Spearman's ρ after Holm's correction over every predictor tested, and a leave-one-domain-out "
        "least-squares error below that of predicting the training mean; 'ranks only' when the p holds but the "
        "error does not; else 'no evidence'.")

UNIT = Unit("forecast", assemble, plan)
