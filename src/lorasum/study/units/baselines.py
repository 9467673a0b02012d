"""The baselines of a composition row: every `baseline` composition of the grid's registry (the mean, ...), the best
single block chosen on validation, and the merge methods (units.methods), each against the merged-data block."""

from __future__ import annotations

from ..grid import COMPOSITIONS, adapter
from ..plan import Planner
from . import methods
from .row import Row


def plan(p: Planner) -> None:
    """Validation evals: each fundamental on every domain (the best single block is chosen on them), and those the
    merge methods are chosen on."""
    cfg = p.cfg
    if "best_single" in cfg.compositions:
        for seed in cfg.seeds:
            for f in cfg.domains:
                for d in cfg.domains:
                    p.eval(adapter([f]), d, seed, "validation")
    methods.plan(p)


def _best_single(r: Row) -> dict:
    """Chosen on the pooled *validation* perplexity of the subset, then reported on test."""
    val = {d: r.a.scores.point_ppl(adapter([d]).name, r.doms, "validation") for d in r.s}
    best = min(r.s, key=lambda d: val[d])
    return {"block": best, "chosen_on": "validation", "validation_perplexity": val,
            **r.versus_merged(adapter([best]).name)}


def rows(r: Row) -> tuple[dict, dict | None]:
    """(the subset's baselines by composition name, the merge-method choice or None)."""
    found = {}
    for comp in COMPOSITIONS.values():
        for m in comp.per_subset(r.s) if comp.baseline else []:
            if m.name in r.a.plan.models.models:
                found[comp.name] = r.versus_merged(m.name)
    if "best_single" in r.a.cfg.compositions:
        found["best_single"] = _best_single(r)
    chosen, choice = methods.rows(r, found)
    return {**found, **chosen}, choice
