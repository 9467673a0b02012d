"""The repair curve: the exact sum of a subset's fundamentals, as one adapter of rank r₁ + r₂ at the blocks' LoRA
scale, trained briefly on the subset's merged training records with the merged block's recipe and learning rate,
for shares of the merged block's optimizer steps (`repair_budgets`); each repaired adapter is evaluated like any
block. How much of the sum's gap to the merged-data block a short repair closes is the practical form of the paper's
"no additional training". Composition `repair`. Wall times (the repair's against the merged block's training) are
in timings.json and the report's Speed section, never in results.json.
"""

from __future__ import annotations

import math

from ...jsonfile import read_json
from ..grid import subsets
from ..jobs import artifact_path
from ..plan import Planner, TrainKey
from .row import Row
from .unit import Assembly, Unit


def repair_name(s: tuple[str, ...], fraction: float) -> str:
    """`repair(0.1)[a+b]`: the sum of a+b's fundamentals repaired for 10% of the merged block's steps."""
    return f"repair({fraction:g})[{'+'.join(s)}]"


def plan(p: Planner) -> None:
    if "repair" not in p.cfg.compositions:
        return
    for seed in p.cfg.seeds:
        for s in subsets(p.cfg.domains, p.cfg.level, 2):
            for f in p.cfg.repair_budgets:
                key = p.repair(s, seed, f)
                for d in s:
                    p.eval_adapter(repair_name(s, f), key, d, seed)


def _steps(a: Assembly, s: tuple[str, ...], f: float) -> list[int]:
    """The optimizer steps each seed's repair took (from its lorasum.json)."""
    out = []
    for seed in a.cfg.seeds:
        meta = read_json(artifact_path(a.plan.train[TrainKey("+".join(s), seed, f"repair@{f:g}")]) / "lorasum.json",
                         "adapter metadata", "rerun the experiment: it removes the damaged adapter and trains it again")
        out.append(int(meta["start"]["steps"]))
    return out


def _gap_closed(a: Assembly, model: str, summed: str, merged: str, doms: list[str]) -> float | None:
    """1 − log(ppl model / ppl merged) / log(ppl sum / ppl merged) (point values, mean over seeds): 1 the whole gap
    closed, 0 none, above 1 past the merged block."""
    rep, su, me = (a.scores.point_ppl(m, doms) for m in (model, summed, merged))
    return None if su == me else 1.0 - math.log(rep / me) / math.log(su / me)


def _row(a: Assembly, out: dict, s: tuple[str, ...]) -> dict:
    r = Row(a, out, s)
    summed = a.plan.models.find("sum", s)
    points = []
    for f in sorted(a.cfg.repair_budgets):
        name = repair_name(s, f)
        point = {"fraction": f, "model": name, "steps": _steps(a, s, f), "perplexity": a.ppl(name, r.doms),
                 "pct_change": a.pct(name, r.merged, r.doms)}
        if summed is not None:
            point.update(vs_sum=a.pct(name, summed.name, r.doms),
                         gap_closed=_gap_closed(a, name, summed.name, r.merged, r.doms))
        points.append(point)
    return {"subset": r.doms, "level": len(s), "budgets": points}


def assemble(a: Assembly, out: dict) -> dict:
    if "repair" not in a.cfg.compositions:
        return {}
    return {"repair": [_row(a, out, s) for s in subsets(a.cfg.domains, a.cfg.level, 2)]}


UNIT = Unit("repair", assemble, plan)
