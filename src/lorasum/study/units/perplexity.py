"""The perplexity matrix: every model of the catalog on each domain's test set it is judged on (eval_scope), and
pooled over all domains where it was evaluated on all of them."""

from __future__ import annotations

from ..config import ExperimentConfig
from ..grid import Catalog, Model, eval_domains
from ..plan import Planner
from .unit import Assembly, Unit


def _domains(cfg: ExperimentConfig, catalog: Catalog, m: Model) -> list[str]:
    return eval_domains(m, cfg.domains, cfg.eval_scope, "best_single" in cfg.compositions,
                        bool(catalog.of("unlearn")))


def plan(p: Planner) -> None:
    """A test-split eval of every model on each of its domains, per seed."""
    catalog = p.plan.models
    for seed in p.cfg.seeds:
        for m in catalog.models.values():
            for d in _domains(p.cfg, catalog, m):
                p.eval(m, d, seed)


def assemble(a: Assembly, out: dict) -> dict:
    domains, catalog, matrix = a.cfg.domains, a.plan.models, {}
    for name, m in catalog.models.items():
        doms = _domains(a.cfg, catalog, m)
        matrix[name] = {**{d: a.ppl(name, [d]) for d in doms},
                        **({"pooled": a.ppl(name, domains)} if doms == domains else {})}
    return {"perplexity": matrix}


UNIT = Unit("perplexity", assemble, plan)
