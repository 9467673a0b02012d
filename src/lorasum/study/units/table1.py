"""The paper's Table 1: three sample layers of the first fundamental block (name, A/B shapes, first values), read
from its adapter (the primary mode's, first seed)."""

from __future__ import annotations

from ...delta.peft_format import load_adapter
from ..grid import adapter
from ..jobs import artifact_path
from ..plan import TrainKey
from .unit import Assembly, Unit


def assemble(a: Assembly, out: dict) -> dict:
    d, seed = a.cfg.domains[0], a.cfg.seeds[0]
    ad = load_adapter(artifact_path(a.plan.train[TrainKey(d, seed)]))
    names = sorted(ad.layers)
    picks = [names[0], names[len(names) // 2], names[-1]]
    rows = [{"layer": n, "A_shape": list(ad.layers[n].A.shape), "B_shape": list(ad.layers[n].B.shape),
             "A_first": [float(v) for v in ad.layers[n].A[0, :3]], "B_first": [float(v) for v in ad.layers[n].B[0, :3]],
             "scale": ad.layers[n].scale} for n in dict.fromkeys(picks)]
    return {"table1": {"adapter": adapter([d]).name, "seed": seed, "layers": rows}}


UNIT = Unit("table1", assemble, scope="run")
