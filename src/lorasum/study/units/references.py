"""Same-domain references (ceilings) of the RMS: each domain's fundamental against one trained on a disjoint second
sample of its records (where the domain has twice the records a fundamental trains on), and, with two or more seeds,
against the same fundamental trained with the second seed."""

from __future__ import annotations

import numpy as np

from ...lm.data import load_domain
from ..plan import SECOND, Planner, SimKey
from ..scores import load
from .unit import Assembly, Unit


def plan(p: Planner) -> None:
    cfg = p.cfg
    if cfg.max_train:
        data = cfg.data_config()
        for d in cfg.domains:
            if load_domain(d, data).available["train"] >= 2 * cfg.max_train:
                for seed in cfg.seeds:
                    p.train(d, seed, skip={"train": cfg.max_train})
                    p.similarity(SimKey("ceiling", (d,), seed), [(d, 1.0)], [(d, 1.0)], b_sample=SECOND)
    if len(cfg.seeds) >= 2:  # the same partition trained with two seeds
        s0, s1 = cfg.seeds[:2]
        for d in cfg.domains:
            p.similarity(SimKey("seeds", (d,), s0), [(d, 1.0)], [(d, 1.0)], b_seed=s1)


def domain_references(a: Assembly, d: str) -> dict:
    """Same-domain ceilings of domain `d`: the second sample's RMS (mean over seeds) and the two seeds' RMS."""
    out, seeds, sims = {}, a.cfg.seeds, a.plan.sims
    if SimKey("ceiling", (d,), seeds[0]) in sims:
        out["split"] = float(np.mean([r["rms"] for r in a.sim_runs("ceiling", (d,))]))
    if SimKey("seeds", (d,), seeds[0]) in sims:
        out["seeds"] = load(sims[SimKey("seeds", (d,), seeds[0])])["rms"]
    return out


def assemble(a: Assembly, out: dict) -> dict:
    return {"references": {d: ref for d in a.cfg.domains if (ref := domain_references(a, d))}}


UNIT = Unit("references", assemble, plan)
