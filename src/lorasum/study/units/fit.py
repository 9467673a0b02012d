"""The RMS → %Δ relation over pairs (the paper's claim that orthogonal blocks sum well): a least-squares fit and the
test that decides it, from the composition rows; no jobs of its own."""

from __future__ import annotations

import numpy as np

from ...lm.data import parse_spec
from ...relation import relation
from ...stats import linear_fit
from .unit import Assembly, Unit


def fit(compositions: list[dict], level: float, seed: int = 0) -> dict:
    """RMS -> %Δ least squares over pairs: one point per pair, (mean RMS, mean %Δ) over seeds, so n = pairs.

    Seeds of one pair share its data and are not independent draws of the relation; fitting them as separate
    points would narrow the slope's interval. The per-seed points are kept for the scatter. `relation` is the test
    that decides the claim (lorasum.relation: ≥ 8 pairs, domain-label permutations, domain bootstrap), within each
    group too when pairs fall within one parent domain and across parents.
    """
    rows = [c for c in compositions if c["level"] == 2 and "pct_change" in c]
    points = [[float(np.mean(c["rms_per_seed"])), c["pct_change"]["mean"]] for c in rows]
    per_seed = [[x, y] for c in rows for x, y in zip(c["rms_per_seed"], c["pct_change"]["per_seed"])]
    pairs = [tuple(c["subset"]) for c in rows]
    parents = {d: parse_spec(d)[0] for p in pairs for d in p}
    groups = {p: "within one parent domain" if parents[p[0]] == parents[p[1]] else "across parent domains"
              for p in pairs}
    rel = relation(pairs, [p[0] for p in points], [p[1] for p in points],
                   groups if len(set(groups.values())) > 1 else None, level=level, seed=seed)
    return {**linear_fit([p[0] for p in points], [p[1] for p in points], level), "points": points,
            "pairs": ["|".join(c["subset"]) for c in rows], "points_per_seed": per_seed, "level": level,
            "relation": rel, "groups": [groups[p] for p in pairs]}


def assemble(a: Assembly, out: dict) -> dict:
    return {"fit": fit(out["compositions"], a.cfg.ci_level, a.cfg.bootstrap_seed)}


UNIT = Unit("fit", assemble)
