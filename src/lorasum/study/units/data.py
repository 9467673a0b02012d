"""The data section: split sizes per domain (from the fundamentals' training metadata) and truncation statistics
per domain and split (a data_stats job)."""

from __future__ import annotations

from ...jsonfile import read_json
from ..jobs import artifact_path
from ..plan import Planner, TrainKey
from ..scores import load
from .unit import Assembly, Unit


def plan(p: Planner) -> None:
    p.data_stats()


def assemble(a: Assembly, out: dict) -> dict:
    meta = {}
    for d in a.cfg.domains:
        lj = read_json(artifact_path(a.plan.train[TrainKey(d, a.cfg.seeds[0])]) / "lorasum.json", "adapter metadata",
                       "rerun the experiment: it removes the damaged adapter and trains it again")
        meta[d] = lj["data"]["domains"][0]
    return {"data": {"domains": meta, "stats": load(a.plan.data_stats)["rows"]}}


UNIT = Unit("data", assemble, plan, scope="run")
