"""The paper's published values (GPT-2 small, their data), shown beside ours and always labelled as the paper's."""

from __future__ import annotations

from .blocks import Table

LABEL = "the paper's values (GPT-2 small, their data)"

# Table 3: pair -> (ppl merged, ppl summed, RMS cos, %Δ)
TABLE3 = {frozenset({"math", "medicine"}): (482.87, 438.94, 0.0514, -9.10),
          frozenset({"math", "finance"}): (93.83, 98.09, 0.0583, 4.54),
          frozenset({"finance", "medicine"}): (205.62, 262.29, 0.0708, 27.56)}
# Table 4: "sum" (all three fundamentals) or the fundamental added to the other two's level-2 block
TABLE4 = {"sum": (127.76, 191.28, None, 49.67), "math": (127.76, 238.52, 0.0714, 86.60),
          "medicine": (127.76, 194.12, 0.0824, 51.94), "finance": (127.76, 260.35, 0.0872, 103.76)}
TABLE4_DOMAINS = frozenset({"math", "medicine", "finance"})
FIT = "y = 1883.89x − 105.68"


def cell(values: tuple | None) -> str:
    """`merged / summed / RMS / %Δ` as one cell, or an em dash where the paper has no such row."""
    if values is None:
        return "—"
    merged, summed, rms, pct = values
    return f"{merged:.2f} / {summed:.2f} / {'—' if rms is None else f'{rms:.4f}'} / {pct:+.2f}%"


def table3_reference() -> Table:
    rows = [[" + ".join(sorted(k)), f"{v[0]:.2f}", f"{v[1]:.2f}", f"{v[2]:.4f}", f"{v[3]:+.2f}%"]
            for k, v in TABLE3.items()]
    return Table(["paper: pair", "ppl merged", "ppl summed", "RMS cos", "%Δ"], rows,
            f"Table 3 as published: {LABEL}. Not comparable number for number with ours (other model and data).")


def table4_reference() -> Table:
    others = {d: " + ".join(sorted(TABLE4_DOMAINS - {d})) for d in TABLE4_DOMAINS}
    rows = [["math + medicine + finance (sum)" if k == "sum" else f"({others[k]}) + {k}", f"{v[0]:.2f}",
             f"{v[1]:.2f}", "—" if v[2] is None else f"{v[2]:.4f}", f"{v[3]:+.2f}%"] for k, v in TABLE4.items()]
    return Table(["paper: composition", "ppl merged", "ppl composed", "RMS cos", "%Δ"], rows,
            f"Table 4 as published: {LABEL}.")
