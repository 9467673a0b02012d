"""Tables 3 and 4: one row per subset of ≥ 2 domains, the merged-data block against the composed models — the naive
sum, the baselines (units.baselines: mean, best single block, merge methods), each block against the rest, the sum
against the merged block in weight space, and level-2 block + the remaining fundamental."""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..grid import Model, partition_name, subsets
from ..plan import Planner, SimKey
from . import baselines
from .row import Row
from .unit import Assembly, Unit


def plan(p: Planner) -> None:
    """The similarities of each subset's row (per seed), then the validation evals its baselines are chosen on."""
    for seed in p.cfg.seeds:
        for s in subsets(p.cfg.domains, p.cfg.level, 2):
            p.similarity(SimKey("weight", s, seed), [(d, 1.0) for d in s], [(partition_name(s), 1.0)])
            for d in s if len(s) >= 3 else ():
                p.similarity(SimKey("block_vs_rest", s, seed, d), [(d, 1.0)], [(x, 1.0) for x in s if x != d])
            for d in s if len(s) == 3 else ():
                p.similarity(SimKey("level2_plus_one", s, seed, d),
                             [(partition_name([x for x in s if x != d]), 1.0)], [(d, 1.0)])
    baselines.plan(p)


def _rms(values) -> float:
    v = list(values)
    return math.sqrt(sum(x * x for x in v) / len(v)) if v else float("nan")


def _head(r: Row) -> dict:
    """The merged-data block and the RMS of every pair of the subset's fundamentals (mean over seeds and per seed)."""
    pairs = list(itertools.combinations(r.s, 2))
    runs = {pair: r.a.sim_runs("pair", pair) for pair in pairs}
    return {"subset": r.doms, "level": len(r.s), "merged": r.a.ppl(r.merged, r.doms),
            "merged_macro": r.macro(r.merged),
            "rms": _rms(c for x, y in pairs for c in r.out["pairs"][f"{x}|{y}"]["layers"].values()),
            "rms_per_seed": [_rms(c for pair in pairs for c in runs[pair][i]["layers"].values())
                             for i in range(len(r.a.cfg.seeds))]}


def _summed(r: Row) -> dict:
    summed = r.a.plan.models.find("sum", r.s)
    if summed is None:
        return {}
    return {"summed": r.a.ppl(summed.name, r.doms), "summed_macro": r.macro(summed.name),
            "pct_change": r.a.pct(summed.name, r.merged, r.doms)}


def _block_vs_rest(r: Row) -> dict:
    """Each fundamental against the sum of the subset's others (subsets of ≥ 3 domains)."""
    if len(r.s) < 3:
        return {}
    sims = {d: r.a.sim("block_vs_rest", r.s, d) for d in r.s}
    return {"block_vs_rest": {d: {"rms": b["rms"], "layers": b["layers"]} for d, b in sims.items()}}


def _weight_space(r: Row) -> dict:
    """The sum of the fundamentals against the merged-data block: per-layer cosine and norm ratio."""
    ws = r.a.sim("weight", r.s)
    return {"weight_space": {
        "layers": {n: {"cos": c, "norm_ratio": ws["norm_a"][n] / ws["norm_b"][n] if ws["norm_b"][n] else None}
                   for n, c in ws["layers"].items()},
        "mean_cos": float(np.mean(list(ws["layers"].values()))), "rms": ws["rms"],
        "norm_ratio": math.sqrt(sum(v * v for v in ws["norm_a"].values()))
        / math.sqrt(sum(v * v for v in ws["norm_b"].values())),
    }}


def _level2_plus_one(r: Row) -> dict:
    """Table 4: each level-2 block + the remaining fundamental, against merged, with the RMS between the two."""
    found: list[Model | None] = [r.a.plan.models.find("level2_plus_one", r.s, added=d) for d in r.s]
    if not any(found):
        return {}
    rows = {}
    for d, m in zip(r.s, found):
        t5 = r.a.sim("level2_plus_one", r.s, d)
        rows[d] = {"level2": m.terms[0][0], **r.versus_merged(m.name), "rms": t5["rms"], "layers": t5["layers"]}
    return {"level2_plus_one": rows}


def row(a: Assembly, out: dict, s: tuple[str, ...]) -> dict:
    r = Row(a, out, s)
    found, choice = baselines.rows(r)
    return {**_head(r), **_summed(r), **({"method_choice": choice} if choice is not None else {}),
            "baselines": found, **_block_vs_rest(r), **_weight_space(r), **_level2_plus_one(r)}


def assemble(a: Assembly, out: dict) -> dict:
    return {"compositions": [row(a, out, s) for s in subsets(a.cfg.domains, a.cfg.level, 2)]}


UNIT = Unit("compositions", assemble, plan)
