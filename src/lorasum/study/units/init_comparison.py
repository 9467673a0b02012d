"""The init modes side by side (when a run trains a grid per LoRA initialisation): per pair and mode, the RMS, the
A and B subspace similarities and %Δ summed vs merged. Read from every mode's assembled body."""

from __future__ import annotations

from .unit import Assembly, Unit


def assemble(a: Assembly, out: dict) -> dict:
    if len(a.bodies) < 2:
        return {"init_comparison": None}
    rows: dict = {}
    for mode, b in a.bodies.items():
        pct = {"|".join(c["subset"]): c.get("pct_change") for c in b["compositions"] if c["level"] == 2}
        for pair, p in b["pairs"].items():
            rows.setdefault(pair, {})[mode] = {"rms": p["rms"], "factors": p.get("factors"),
                                               "pct_change": pct.get(pair)}
    return {"init_comparison": {"modes": list(a.bodies), "pairs": rows}}


UNIT = Unit("init_comparison", assemble, scope="run")
