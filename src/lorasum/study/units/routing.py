"""Routing beside Tables 3 and 4: the oracle router serves every test example with its own domain's fundamental
block, as multi-adapter serving does per request when the domain is known. No routing of the subset's adapters per
example can do better on average than serving each domain's examples with the adapter trained on that domain, so:

- the oracle reaching the merged-data block (its %Δ CI includes or lies below 0) means some composition could;
- the oracle worse than merged means none routed per example can: the gap is what merged training learned from the
  pooled data, not interference between the deltas.

The oracle reuses the fundamentals' own-domain test evals: it plans no job.
"""

from __future__ import annotations

from ..grid import adapter, subsets
from .row import Row
from .unit import Assembly, Unit


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


def assemble(a: Assembly, out: dict) -> dict:
    return {"routing": [{"subset": list(s), "level": len(s), "oracle": oracle(Row(a, out, s))}
                        for s in subsets(a.cfg.domains, a.cfg.level, 2)]}


UNIT = Unit("routing", assemble)
