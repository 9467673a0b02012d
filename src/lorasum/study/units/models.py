"""The grid's models: an adapter per partition and seed (the train jobs every other unit reads), and the catalog of
every model evaluated (`models` in results.json)."""

from __future__ import annotations

from ..grid import partition_name, subsets
from ..plan import Planner
from .unit import Assembly, Unit


def plan(p: Planner) -> None:
    """An adapter per non-empty subset of domains up to the grid's level, per seed."""
    for seed in p.cfg.seeds:
        for s in subsets(p.cfg.domains, p.cfg.level):
            p.train(partition_name(s), seed)


def assemble(a: Assembly, out: dict) -> dict:
    return {"models": {name: m.as_dict() for name, m in a.plan.models.models.items()}}


UNIT = Unit("models", assemble, plan)
