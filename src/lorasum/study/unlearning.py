"""Unlearning by subtraction, tested fairly: base + full − λ·fundamental for each swept λ, with λ chosen on the
validation split and reported on test.

Subtracting at λ = 1 (the paper) can overshoot: the removed domain ends worse than the base model. The chosen λ
is the one whose removed-domain validation perplexity is closest (in log ratio) to the model trained without that
domain, among the λ that keep every remaining domain within (1 + δ)× its validation perplexity before removal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .config import ExperimentConfig
from .grid import adapter
from .scores import RunScores, load


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


def unlearning_rows(cfg: ExperimentConfig, plan: dict, S: RunScores, ppl: Callable[[str, list[str]], dict]) -> list:
    """One row per removed domain: the paper's λ = 1 figures, the λ sweep (validation and test) and the choice."""
    catalog, seeds, domains = plan["models"], cfg.seeds, cfg.domains
    full = adapter(domains).name
    rows = []
    for d in domains:
        sweep = sorted((m for m in catalog.of("unlearn") if m.removed == d), key=lambda m: m.weight)
        if not sweep:
            continue
        plain = next(m for m in sweep if m.weight == 1.0)
        others = list(plain.subset)
        without = adapter(others).name
        checks = [load(plan["checks"][(d, s)]) for s in seeds]
        row = {"removed": d, "others": others, "without_model": without,
               "removed_domain": {k: ppl(mm, [d]) for k, mm in (("base", "base"), ("before", full),
                                                                 ("after", plain.name), ("without", without))},
               "other_domains": {k: ppl(mm, others) for k, mm in (("base", "base"), ("before", full),
                                                                   ("after", plain.name), ("without", without))},
               "inplace_check": {"rel_error_weights": max(c["rel_error_weights"] for c in checks),
                                 "rel_error_delta": max(c["rel_error_delta"] for c in checks)}}
        val_removed = {m.weight: S.point_ppl(m.name, [d], "validation") for m in sweep}
        val_others = {m.weight: {o: S.point_ppl(m.name, [o], "validation") for o in others} for m in sweep}
        target = S.point_ppl(without, [d], "validation")
        before = {o: S.point_ppl(full, [o], "validation") for o in others}
        chosen, reason = choose_weight(val_removed, val_others, target, before, cfg.retention_tolerance)
        row["sweep"] = [{"weight": m.weight, "model": m.name, "validation_removed": val_removed[m.weight],
                         "validation_others": val_others[m.weight], "removed": ppl(m.name, [d]),
                         "others": ppl(m.name, others)} for m in sweep]
        row["validation_reference"] = {"without": target, "before": before}
        row["chosen"] = {"weight": chosen, "rule": reason, "tolerance": cfg.retention_tolerance}
        rows.append(row)
    return rows
