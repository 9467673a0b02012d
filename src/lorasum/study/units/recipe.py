"""The recipe check: does each fundamental lower its domain's test perplexity enough against the base model
(`max_ppl_ratio`)? Read from the perplexity matrix; no jobs of its own."""

from __future__ import annotations

from ..grid import adapter
from .unit import Assembly, Unit


def assemble(a: Assembly, out: dict) -> dict:
    matrix, ratio = out["perplexity"], a.cfg.max_ppl_ratio
    fundamentals = {d: matrix[adapter([d]).name][d]["mean"] for d in a.cfg.domains}
    recipe = {d: {"base": matrix["base"][d]["mean"], "adapter": fundamentals[d],
                  "ratio": fundamentals[d] / matrix["base"][d]["mean"]} for d in a.cfg.domains}
    return {"recipe_check": {"max_ppl_ratio": ratio, "domains": recipe,
                             "passed": None if ratio is None else all(v["ratio"] <= ratio for v in recipe.values())}}


UNIT = Unit("recipe_check", assemble)
