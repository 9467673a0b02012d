"""The repair curve (the exact sum trained briefly on merged data) per subset, and its wall time against the merged
block's training (from timings.json)."""

from __future__ import annotations

from .blocks import Section, Table
from .text import ci as _ci, pct as _pct


def repair_section(r: dict) -> list[Section]:
    rows = []
    for row in r.get("repair", []):
        for b in row["budgets"]:
            closed = b.get("gap_closed")
            rows.append([" + ".join(row["subset"]), f"{100 * b['fraction']:g}%", "/".join(map(str, b["steps"])),
                         _ci(b["perplexity"]), _pct(b["pct_change"]), _pct(b["vs_sum"]) if "vs_sum" in b else "",
                         "" if closed is None else f"{100 * closed:.0f}%"])
    if not rows:
        return []
    return [Section("Repair — the exact sum trained briefly on the merged data", [Table(
        ["combination", "budget (share of merged steps)", "steps (per seed)", "ppl repaired", "%Δ vs merged",
         "%Δ vs sum", "gap closed"], rows,
        "The sum of a subset's fundamentals, as one adapter of rank r₁ + r₂ at the blocks' LoRA scale, trained on the "
        "subset's merged training records with the merged block's recipe for a share of its optimizer steps. Pooled "
        "test perplexity with CIs; gap closed = 1 − log(ppl repaired / ppl merged) / log(ppl sum / ppl merged) "
        "(100%: as good as the merged block). Wall times against the merged block's training: Speed section.")])]


def repair_timing_table(entries: list[dict], train: dict) -> list:
    """Mean wall time of each (partition, budget) repair beside the merged block's training (means over seeds)."""
    rep: dict = {}
    for t in entries:
        if t.get("kind") == "train" and "repair" in t:
            rep.setdefault((t.get("partition"), t["repair"]), []).append(t["wall_s"])
    rows = []
    for (part, f), walls in sorted(rep.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        mean, full = sum(walls) / len(walls), train.get(part)
        full_mean = sum(full) / len(full) if full else None
        rows.append([part, f"{100 * f:g}%", f"{mean:.1f} s", "" if full_mean is None else f"{full_mean:.1f} s",
                     "" if not full_mean else f"{100 * mean / full_mean:.0f}%"])
    if not rows:
        return []
    return [Table(["partition", "repair budget", "repair wall time", "merged block's training", "repair / merged"],
                  rows, "Training time of each repair (mean over seeds) beside the merged-data block's, on this "
                        "machine, from timings.json: what a repair saves, or not.")]
