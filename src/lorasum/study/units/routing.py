"""Routing beside Tables 3 and 4: the oracle router serves every test example with its own domain's fundamental
block, as multi-adapter serving does per request when the domain is known. No routing of the subset's adapters per
example can do better on average than serving each domain's examples with the adapter trained on that domain, so:

- the oracle reaching the merged-data block (its %Δ CI includes or lies below 0) means some composition could;
- the oracle worse than merged means none routed per example can: the gap is what merged training learned from the
  pooled data, not interference between the deltas.

The oracle reuses the fundamentals' own-domain test evals: it plans no job. The prompt router (lm.prompt_routing;
composition `prompt_router`) is the oracle's practical form: it chooses each example's block from its question
alone, by the nearest centroid of the base model's prompt features (top-1), or mixes the blocks' predictions with
weights from those distances at a temperature chosen on validation (soft). It plans one prompt_route job and every
fundamental's evals on each of its subsets' domains.
"""

from __future__ import annotations

import numpy as np

from ...delta.registry import ROUTES, method_params
from ...lm.prompt_routing import mixture_nll, soft_weights
from ...stats import Scores
from ..grid import adapter, subsets
from ..plan import Planner
from ..scores import load
from .row import Row
from .unit import Assembly, Unit

PROMPT_TEMPERATURES = (0.1, 0.3, 1.0, 3.0)  # τ of the soft prompt router, chosen on validation


def oracle_route(s: tuple[str, ...]) -> dict[str, str]:
    """{domain: the name of its fundamental block}: each domain's examples served by its own adapter."""
    return {d: adapter([d]).name for d in s}


def oracle(r: Row) -> dict:
    """The oracle router's pooled and macro test perplexity, its %Δ vs merged (paired CI), and the sum's %Δ vs the
    oracle (the interference: the same adapters, added instead of routed)."""
    route = oracle_route(r.s)
    entry = {"route": route, "perplexity": r.a.ppl(route, r.doms),
             "macro": sum(r.out["perplexity"][m][d]["mean"] for d, m in route.items()) / len(route),
             "pct_change": r.a.pct(route, r.merged, r.doms)}
    summed = r.a.plan.models.find("sum", r.s)
    if summed is not None:
        entry["sum_vs_oracle"] = r.a.pct(summed.name, route, r.doms)
    return entry


def plan_throughput(p: Planner) -> None:
    """With routing rows, what serving costs per token: the base model, the first pair's fundamentals merged, routed
    by Arrow (at its default parameters) and chosen per prompt, for the first seed (lm.throughput)."""
    comps = p.cfg.compositions
    routes = (["arrow"] if "arrow" in comps else []) + (["prompt_top1", "prompt_soft"] if "prompt_router" in comps
                                                        else [])
    pairs = list(subsets(p.cfg.domains, p.cfg.level, 2))
    if routes and pairs:
        p.throughput(pairs[0], p.cfg.seeds[0], ["base", "merged", *routes], method_params("arrow", {}, ROUTES))


def plan(p: Planner) -> None:
    """The prompt router's features, and each fundamental on every domain of each subset (validation: the soft
    router's temperature; test: the rows); the serving cost when there are routing rows."""
    plan_throughput(p)
    if "prompt_router" not in p.cfg.compositions:
        return
    p.prompt_route()
    for seed in p.cfg.seeds:
        for s in subsets(p.cfg.domains, p.cfg.level, 2):
            for k in s:
                for d in s:
                    for split in ("validation", "test"):
                        p.eval(adapter([k]), d, seed, split)


def _candidates(r: Row, split: str) -> tuple[np.ndarray, np.ndarray, Scores]:
    """(squared distances (n, k) of the subset's examples to its domains' centroids, per-example NLL (S, n, k) of
    each of its fundamentals, the oracle's scores (tokens and strata in the same order))."""
    art = load(r.a.plan.prompt_route)
    cols = [art["domains"].index(k) for k in r.s]
    dist = np.concatenate([np.asarray(art["distances"][split][d], float)[:, cols] for d in r.s])  # (n, k)
    raw = r.a.scores.raw
    nll = np.stack([np.array([np.concatenate([raw(adapter([k]).name, d, seed, split)["nll"] for d in r.s])
                              for seed in r.a.cfg.seeds]) for k in r.s], -1)  # (S, n, k)
    if nll.shape[1] != dist.shape[0]:
        raise ValueError(f"prompt router: {dist.shape[0]} examples routed, {nll.shape[1]} evaluated")
    return dist, nll, r.a.scores.scores(oracle_route(r.s), r.doms, split)


def _ppl(nll: np.ndarray, tokens: np.ndarray) -> float:
    return float(np.exp(nll.sum(1) / tokens.sum()).mean())


def prompt(r: Row) -> dict:
    """Top-1 (nearest centroid) and soft (mixture at τ chosen on validation): perplexity, %Δ vs merged and vs the
    oracle (paired CIs), and the routing accuracy (share of test examples sent to their own domain's block)."""
    art = load(r.a.plan.prompt_route)
    dist, nll, oracle_scores = _candidates(r, "test")
    vdist, vnll, vscores = _candidates(r, "validation")
    choice = dist.argmin(1)  # (n,)
    own = oracle_scores.strata.astype(int)
    top1 = Scores(np.take_along_axis(nll, choice[None, :, None], -1)[..., 0], oracle_scores.tokens, own)
    val = {t: _ppl(mixture_nll(vnll, soft_weights(vdist, art["scale"], t)), vscores.tokens)
           for t in PROMPT_TEMPERATURES}
    best = min(val, key=val.get)
    soft = Scores(mixture_nll(nll, soft_weights(dist, art["scale"], best)), oracle_scores.tokens, own)
    route = oracle_route(r.s)
    rows = {name: {"perplexity": r.a.ppl(sc, r.doms), "pct_change": r.a.pct(sc, r.merged, r.doms),
                   "vs_oracle": r.a.pct(sc, route, r.doms)} for name, sc in (("top1", top1), ("soft", soft))}
    return {"accuracy": float(np.mean(choice == own)),
            "accuracy_by_domain": {d: float(np.mean(choice[own == i] == i)) for i, d in enumerate(r.s)},
            "top1": rows["top1"], "soft": {"temperature": best, "chosen_on": "validation",
                                           "validation_perplexity": {f"{t:g}": v for t, v in val.items()},
                                           **rows["soft"]}}


def _entry(a: Assembly, out: dict, s: tuple[str, ...]) -> dict:
    r = Row(a, out, s)
    found = {"subset": list(s), "level": len(s), "oracle": oracle(r)}
    return {**found, "prompt": prompt(r)} if a.plan.prompt_route else found


def assemble(a: Assembly, out: dict) -> dict:
    return {"routing": [_entry(a, out, s) for s in subsets(a.cfg.domains, a.cfg.level, 2)]}


UNIT = Unit("routing", assemble, plan)
