"""Merge methods in the grid's results: each method's hyperparameters chosen per subset on validation, the weight
search's weights, and which composition is best on validation, compared with the exact naive sum by a paired CI on
test (nothing here is ever chosen on test)."""

from __future__ import annotations

from ..grid import METHOD_COMPOSITIONS, adapter
from ..plan import Planner, SearchKey
from ..scores import load
from .row import Row


def plan(p: Planner) -> None:
    """Validation evals of every merge-method model and of the sum and mean they are ranked against."""
    if not any(c in METHOD_COMPOSITIONS for c in p.cfg.compositions):
        return
    for seed in p.cfg.seeds:
        for m in p.plan.models.models.values():
            if m.method is not None or m.kind in ("sum", "mean"):
                for d in m.subset:
                    p.eval(m, d, seed, "validation")


def _method(r: Row, name: str) -> tuple[dict, float, str] | None:
    """A method's entry for the subset: its chosen grid point (lowest pooled validation perplexity, mean over seeds;
    first on a tie), every point's validation perplexity, and the chosen model against merged on test."""
    cands = [m for m in r.a.plan.models.of(name) if m.subset == r.s]
    if not cands:
        return None
    points = {m.name: r.a.scores.point_ppl(m.name, r.doms, "validation") for m in cands}
    chosen = min(cands, key=lambda m: points[m.name])
    entry = {"method": chosen.method, "params": dict(chosen.params), "chosen_on": "validation",
             "model": chosen.name, "validation_perplexity": points}
    if name == "weight_search":
        found = [load(r.a.plan.searches[SearchKey(chosen.name, seed)]) for seed in r.a.cfg.seeds]
        entry["weights"] = [f["weights"] for f in found]  # per seed
        entry["search_value"] = [f["value"] for f in found]
    return {**entry, **r.versus_merged(chosen.name)}, points[chosen.name], chosen.name


def rows(r: Row, baselines: dict) -> tuple[dict, dict | None]:
    """(baselines of the subset's merge methods, the method choice) for the row's subset.

    The choice: every composition's pooled validation perplexity, the best, and the paired %Δ of the best vs the
    sum on test.
    """
    catalog, out = r.a.plan.models, {}
    val: dict[str, float] = {}
    models: dict[str, str] = {}
    for name in (c for c in METHOD_COMPOSITIONS if c in r.a.cfg.compositions):
        found = _method(r, name)
        if found is not None:
            out[name], val[name], models[name] = found
    summed = catalog.find("sum", r.s)
    if not out or summed is None:
        return out, None
    for kind in ("sum", "mean"):
        m = catalog.find(kind, r.s)
        if m is not None:
            val[kind], models[kind] = r.a.scores.point_ppl(m.name, r.doms, "validation"), m.name
    bs = baselines.get("best_single")
    if bs is not None:
        val["best_single"] = bs["validation_perplexity"][bs["block"]]
        models["best_single"] = adapter([bs["block"]]).name
    best = min(val, key=lambda k: (val[k], k != "sum"))  # a tie goes to the exact sum
    choice = {"chosen_on": "validation", "validation_perplexity": val, "best": best, "best_model": models[best],
              "vs_sum": None if best == "sum" else r.a.pct(models[best], summed.name, r.doms)}
    return out, choice
