"""The merge methods' rows of Tables 3 and 4: one row per composition of each subset (the exact sum, the mean, the
best single block, every merge method at its hyperparameters chosen on validation, the weight search), with pooled
test perplexity and %Δ vs merged, and which one was best on validation."""

from __future__ import annotations

from .blocks import Table
from .text import ci as _ci, pct as _pct


def method_label(name: str, entry: dict | None) -> str:
    """`ties (density=0.2)`, `weight_search (w 1.10, 0.85)`, or the name."""
    if not entry:
        return name
    if entry.get("weights"):
        ws = entry["weights"][0]
        return f"{name} (w {', '.join(f'{v:.2f}' for v in ws.values())}" + (", seed 1" if len(entry["weights"]) > 1
                                                                            else "") + ")"
    if entry.get("block"):
        return f"{name} ({entry['block']})"
    params = entry.get("params") or {}
    return f"{name} ({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else name


def ranked(row: dict) -> list[tuple[str, dict, dict, float]]:
    """(name, test perplexity, %Δ vs merged, validation perplexity) of every composition of the row, best first on
    validation."""
    choice, out = row["method_choice"], []
    for name, v in sorted(choice["validation_perplexity"].items(), key=lambda kv: kv[1]):
        if name == "sum":
            out.append((name, row["summed"], row["pct_change"], v))
        elif name in row.get("baselines", {}):
            b = row["baselines"][name]
            out.append((name, b["perplexity"], b["pct_change"], v))
    return out


def method_tables(comps: list[dict], ci: str) -> list:
    rows_in = [c for c in comps if c.get("method_choice")]
    if not rows_in:
        return []
    rows = []
    for c in rows_in:
        best = c["method_choice"]["best"]
        for name, ppl, change, val in ranked(c):
            rows.append([" + ".join(c["subset"]), method_label(name, c.get("baselines", {}).get(name)), _ci(ppl),
                         _pct(change), f"{val:.2f}", "best" if name == best else ""])
    return [Table(["combination", "method (hyperparameters chosen on validation)", "ppl (test)", "%Δ vs merged",
                   "ppl (validation)", "on validation"], rows,
                  f"Every merge method against the merged-data block, best first on validation: pooled test "
                  f"perplexity ({ci}) and %Δ vs merged (paired CI); each method's hyperparameters (and the weight "
                  f"search's weights) were chosen on the validation split, never on test.")]
