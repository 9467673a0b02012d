"""Assemble results.json from a run's artifacts: each analysis unit's part (study.units), the findings, the claims
and provenance.

Everything here is recomputed from the cached artifacts (per-example NLL, similarity files), deterministically,
so an interrupted-and-resumed run gives a byte-identical results.json. Wall times live in timings.json.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_write_json
from ..jsonfile import content_digest
from .config import ExperimentConfig
from .findings import claims, findings
from .plan import Plan
from .scores import RunScores
from .units import UNITS
from .units.unit import Assembly

SCHEMA = "lorasum.results/2"


def mode_body(cfg: ExperimentConfig, plan: Plan) -> dict:
    """One init mode's part of results.json: each mode-scope unit's keys, in registry order."""
    a, body = Assembly(cfg, plan, RunScores(cfg, plan)), {}
    for unit in UNITS.values():
        if unit.scope == "mode":
            body.update(unit.assemble(a, body))
    return body


def assemble(cfg: ExperimentConfig, plans: dict[str, Plan], run_dir: str | Path, prov: dict,
             tuning: dict | None = None) -> dict:
    """results.json: the primary init mode's units at the top level, then the run-scope units (which see every
    mode's body), tuning, findings, the claims and provenance (`prov`, as recorded when the run started)."""
    modes = list(plans)
    bodies = {m: mode_body(cfg, plans[m]) for m in modes}
    primary = plans[modes[0]]
    out = {"schema": SCHEMA, "config": cfg.to_dict(), "config_hash": cfg.hash(), **bodies[modes[0]],
           "init": {"modes": modes, "primary": modes[0]}}
    a = Assembly(cfg, primary, RunScores(cfg, primary), bodies)
    for unit in UNITS.values():
        if unit.scope == "run":
            out.update(unit.assemble(a, out))
    out["provenance"] = {k: v for k, v in prov.items() if k != "torch_threads"}
    if tuning:  # how the hyperparameters were tuned (per_partition: confounded)
        out["tuning"] = tuning
    out["findings"] = findings(out)
    out["claims"] = claims(out)
    out = _clean(out)
    out["digest"] = content_digest(out)  # `lorasum report` renders only what lorasum wrote
    atomic_write_json(Path(run_dir) / "results.json", out)
    return out


def _clean(obj):
    """Floats rounded to 12 significant digits (stable text), NaN/inf -> None (valid JSON)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
