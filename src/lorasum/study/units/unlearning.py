"""Unlearning by subtraction, tested fairly: base + full − λ·fundamental for each swept λ, with λ chosen on the
validation split and reported on test, and the in-place removal checked against adding only the others.

Subtracting at λ = 1 (the paper) can overshoot: the removed domain ends worse than the base model. The chosen λ
is the one whose removed-domain validation perplexity is closest (in log ratio) to the model trained without that
domain, among the λ that keep every remaining domain within (1 + δ)× its validation perplexity before removal.
"""

from __future__ import annotations

import math

from ..grid import Model, adapter
from ..plan import CheckKey, Planner
from ..scores import load
from .unit import Assembly, Unit


def choose_weight(removed: dict[float, float], others: dict[float, dict[str, float]], without: float,
                  before: dict[str, float], tolerance: float) -> tuple[float | None, str]:
    """The λ to report, from validation perplexities, and why.

    Args:
        removed: λ -> perplexity on the removed domain after subtracting λ · its block.
        others: λ -> {domain: perplexity} on each remaining domain.
        without: perplexity on the removed domain of the block trained without it (the target).
        before: {domain: perplexity} of the all-domain block on each remaining domain (retention reference).
        tolerance: δ; a λ is admissible when every remaining domain stays within (1 + δ)× `before`.

    Returns:
        (λ or None when no λ is admissible, a one-line reason).
    """
    ok = [w for w in sorted(removed) if all(others[w][o] <= (1 + tolerance) * before[o] for o in before)]
    if not ok:
        return None, f"no λ keeps every other domain within {1 + tolerance:g}× its perplexity before removal"
    best = min(ok, key=lambda w: (abs(math.log(removed[w] / without)), w))
    return best, (f"λ = {best:g}: removed-domain validation perplexity closest to the model trained without it "
                  f"among the {len(ok)} of {len(removed)} λ that keep every other domain within {1 + tolerance:g}×")


def plan(p: Planner) -> None:
    """The in-place checks (when the grid trains the all-domain block), then the validation evals λ is chosen on:
    every λ, the block before removal, and the block without the domain."""
    cfg, unlearn = p.cfg, p.plan.models.of("unlearn")
    if "unlearning" in cfg.compositions and cfg.level == len(cfg.domains):
        for seed in cfg.seeds:
            for d in cfg.domains:
                p.inplace(d, seed)
    if not unlearn:
        return
    models = [*unlearn, adapter(cfg.domains), *(adapter(m.subset) for m in unlearn if m.weight == 1.0)]
    for seed in cfg.seeds:
        for m in models:
            for d in cfg.domains:
                p.eval(m, d, seed, "validation")


def _figures(a: Assembly, d: str, others: list[str], models: dict[str, str]) -> dict:
    """The paper's λ = 1 figures on the removed domain and on the others, and the in-place check (worst seed)."""
    checks = [load(a.plan.checks[CheckKey(d, s)]) for s in a.cfg.seeds]
    return {"removed_domain": {k: a.ppl(m, [d]) for k, m in models.items()},
            "other_domains": {k: a.ppl(m, others) for k, m in models.items()},
            "inplace_check": {"rel_error_weights": max(c["rel_error_weights"] for c in checks),
                              "rel_error_delta": max(c["rel_error_delta"] for c in checks)}}


def _sweep(a: Assembly, d: str, others: list[str], sweep: list[Model], full: str, without: str) -> dict:
    """The λ sweep on validation and test, the validation references and the chosen λ."""
    point, tolerance = a.scores.point_ppl, a.cfg.retention_tolerance
    val_removed = {m.weight: point(m.name, [d], "validation") for m in sweep}
    val_others = {m.weight: {o: point(m.name, [o], "validation") for o in others} for m in sweep}
    target = point(without, [d], "validation")
    before = {o: point(full, [o], "validation") for o in others}
    chosen, reason = choose_weight(val_removed, val_others, target, before, tolerance)
    return {"sweep": [{"weight": m.weight, "model": m.name, "validation_removed": val_removed[m.weight],
                       "validation_others": val_others[m.weight], "removed": a.ppl(m.name, [d]),
                       "others": a.ppl(m.name, others)} for m in sweep],
            "validation_reference": {"without": target, "before": before},
            "chosen": {"weight": chosen, "rule": reason, "tolerance": tolerance}}


def assemble(a: Assembly, out: dict) -> dict:
    """One row per removed domain: the paper's λ = 1 figures, the λ sweep (validation and test) and the choice."""
    full, rows = adapter(a.cfg.domains).name, []
    for d in a.cfg.domains:
        sweep = sorted((m for m in a.plan.models.of("unlearn") if m.removed == d), key=lambda m: m.weight)
        if not sweep:
            continue
        plain = next(m for m in sweep if m.weight == 1.0)
        others = list(plain.subset)
        without = adapter(others).name
        models = {"base": "base", "before": full, "after": plain.name, "without": without}
        rows.append({"removed": d, "others": others, "without_model": without, **_figures(a, d, others, models),
                     **_sweep(a, d, others, sweep, full, without)})
    return {"unlearning": rows}


UNIT = Unit("unlearning", assemble, plan)
