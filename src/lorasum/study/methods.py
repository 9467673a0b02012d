"""Merge methods in the grid's results: each method's hyperparameters chosen per subset on validation, the weight
search's weights, and which composition is best on validation, compared with the exact naive sum by a paired CI on
test (nothing here is ever chosen on test)."""

from __future__ import annotations

from collections.abc import Callable

from .grid import METHOD_COMPOSITIONS, adapter
from .scores import load


def method_rows(cfg, plan: dict, S, s: tuple[str, ...], versus_merged: Callable[[str], dict],
                pct: Callable[[str, str, list[str]], dict], baselines: dict) -> tuple[dict, dict | None]:
    """(baselines of the subset's merge methods, the method choice) for subset `s`.

    Each method's entry: its chosen grid point (lowest pooled validation perplexity, mean over seeds; first on a
    tie), every point's validation perplexity, and the chosen model's test perplexity and %Δ vs merged. The choice:
    every composition's pooled validation perplexity, the best, and the paired %Δ of the best vs the sum on test.
    """
    doms, catalog = list(s), plan["models"]
    out: dict = {}
    val: dict[str, float] = {}
    models: dict[str, str] = {}
    for name in (c for c in METHOD_COMPOSITIONS if c in cfg.compositions):
        cands = [m for m in catalog.of(name) if m.subset == s]
        if not cands:
            continue
        points = {m.name: S.point_ppl(m.name, doms, "validation") for m in cands}
        chosen = min(cands, key=lambda m: points[m.name])
        entry = {"method": chosen.method, "params": dict(chosen.params), "chosen_on": "validation",
                 "model": chosen.name, "validation_perplexity": points}
        if name == "weight_search":
            found = [load(plan["searches"][(chosen.name, seed)]) for seed in cfg.seeds]
            entry["weights"] = [f["weights"] for f in found]  # per seed
            entry["search_value"] = [f["value"] for f in found]
        out[name] = {**entry, **versus_merged(chosen.name)}
        val[name], models[name] = points[chosen.name], chosen.name
    summed = catalog.find("sum", s)
    if not out or summed is None:
        return out, None
    val["sum"], models["sum"] = S.point_ppl(summed.name, doms, "validation"), summed.name
    mean = catalog.find("mean", s)
    if mean is not None:
        val["mean"], models["mean"] = S.point_ppl(mean.name, doms, "validation"), mean.name
    bs = baselines.get("best_single")
    if bs is not None:
        val["best_single"], models["best_single"] = bs["validation_perplexity"][bs["block"]], adapter([bs["block"]]).name
    best = min(val, key=lambda k: (val[k], k != "sum"))  # a tie goes to the exact sum
    choice = {"chosen_on": "validation", "validation_perplexity": val, "best": best, "best_model": models[best],
              "vs_sum": None if best == "sum" else pct(models[best], summed.name, doms)}
    return out, choice
