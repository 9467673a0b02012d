"""One composition row's context: the subset, its merged-data block, and the figures every part of the row shows
against it (read by units.compositions, units.baselines and units.methods)."""

from __future__ import annotations

import numpy as np

from ..grid import adapter
from .unit import Assembly


class Row:
    """What every part of one subset's row reads: the subset, its merged-data block, the perplexity matrix."""

    def __init__(self, a: Assembly, out: dict, s: tuple[str, ...]):
        self.a, self.out, self.s, self.doms, self.merged = a, out, s, list(s), adapter(s).name

    def macro(self, model: str) -> float:
        """Macro mean over the subset's domains of the per-domain perplexities (beside the pooled figure)."""
        return float(np.mean([self.out["perplexity"][model][d]["mean"] for d in self.doms]))

    def versus_merged(self, model: str) -> dict:
        """A model's pooled test perplexity, macro mean and paired %Δ against the merged-data block."""
        return {"perplexity": self.a.ppl(model, self.doms), "macro": self.macro(model),
                "pct_change": self.a.pct(model, self.merged, self.doms)}
