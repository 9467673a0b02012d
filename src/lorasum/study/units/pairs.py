"""Table 3's similarities: each pair of fundamentals' per-layer cosines, RMS, A/B subspace similarity and random
null, beside the pair's same-domain ceiling (from the `references` unit)."""

from __future__ import annotations

import itertools

import numpy as np

from ..plan import Planner, SimKey
from .unit import Assembly, Unit


def plan(p: Planner) -> None:
    for seed in p.cfg.seeds:
        for x, y in itertools.combinations(p.cfg.domains, 2):
            p.similarity(SimKey("pair", (x, y), seed), [(x, 1.0)], [(y, 1.0)])


def ceiling(ref: dict) -> float | None:
    """A domain's ceiling: the second-sample reference, which has the same init relation as the pairs in either
    mode; the two-seed one only where there is no second sample (in shared mode its A differs, unlike the pairs')."""
    return ref.get("split", ref.get("seeds"))


def assemble(a: Assembly, out: dict) -> dict:
    pairs = {f"{x}|{y}": {"domains": [x, y], **a.sim("pair", (x, y))}
             for x, y in itertools.combinations(a.cfg.domains, 2)}
    for p in pairs.values():  # the pair's same-domain ceiling: the mean of its two domains'
        ceil = [ceiling(out["references"].get(d, {})) for d in p["domains"]]
        p["ceiling"] = float(np.mean(ceil)) if None not in ceil else None
    return {"pairs": pairs}


UNIT = Unit("pairs", assemble, plan)
