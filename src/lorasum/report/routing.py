"""The routing rows beside Tables 3 and 4 (the oracle router against the merged block and against the sum), and
where each composition's cost lands, per member domain."""

from __future__ import annotations

from ..lm.throughput import DESCRIPTIONS
from .blocks import Paragraph, Section, Table
from .text import ci as _ci, pct as _pct

ORACLE_LABEL = "oracle routing (own block per domain)"


def oracle_of(r: dict, subset: list[str]) -> dict | None:
    """The subset's oracle-router entry of results.json, or None (results made before it existed)."""
    return next((x["oracle"] for x in r.get("routing", []) if x["subset"] == subset), None)


def routing_table(r: dict, comps: list[dict], ci: str) -> list:
    """One row per subset: merged, the oracle router, its %Δ vs merged and the sum's %Δ vs the oracle."""
    rows, routed = [], any("arrow" in c.get("baselines", {}) for c in comps)
    for c in comps:
        o = oracle_of(r, c["subset"])
        if o is None:
            continue
        verdict = next((f["verdict"] for f in r.get("findings", []) if f["claim"] == "oracle routing vs merged"
                        and f["subject"] == " + ".join(c["subset"])), "")
        arrow = c.get("baselines", {}).get("arrow")
        cost = next((x["models"] for x in r.get("cost_by_domain", []) if x["subset"] == c["subset"]), {})
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(o["perplexity"]), _pct(o["pct_change"]),
                     _pct(o["sum_vs_oracle"]) if "sum_vs_oracle" in o else "",
                     *((_pct(arrow["pct_change"]), _pct(cost["arrow"]["vs_oracle"]) if "arrow" in cost else "")
                       if routed else ()), verdict])
    if not rows:
        return []
    return [Table(["combination", "ppl merged", f"ppl {ORACLE_LABEL}", "%Δ oracle vs merged", "%Δ sum vs oracle",
                   *(("%Δ arrow vs merged", "%Δ arrow vs oracle") if routed else ()), "verdict"],
                  rows, f"The oracle router serves each test example with its own domain's fundamental block (the "
                        f"domain known, as per-request multi-adapter serving does): no per-example routing of these "
                        f"adapters does better on average. Pooled test perplexity ({ci}); %Δ oracle vs merged above 0 "
                        f"means no routing of these adapters reaches the merged block; %Δ sum vs oracle is what adding "
                        f"the deltas costs beyond routing them (the interference); Arrow (PEFT's token-level router, "
                        f"its top_k and temperature chosen on validation) against both. {genknowsub(r)}",
                  verdicts=7 if routed else 5)]


def genknowsub(r: dict) -> str:
    """Whether Arrow subtracted general-domain adapters first (GenKnowSub), and which."""
    general = (r.get("config") or {}).get("general")
    if general:
        return (f"Arrow ran with GenKnowSub: the mean of general-domain adapters trained on {', '.join(general)} "
                "(one per seed) was subtracted from every adapter first.")
    return ("Arrow ran without GenKnowSub: the config names no general-domain partitions (add `general: [...]` to "
            "subtract their adapters first).")


def prompt_table(r: dict, comps: list[dict], ci: str) -> list:
    """The prompt router per subset: routing accuracy, then top-1 and soft against merged and the oracle."""
    rows = []
    for c in comps:
        p = next((x.get("prompt") for x in r.get("routing", []) if x["subset"] == c["subset"]), None)
        if p is None:
            continue
        acc = ", ".join(f"{d} {100 * v:.0f}%" for d, v in p["accuracy_by_domain"].items())
        rows.append([" + ".join(c["subset"]), f"{100 * p['accuracy']:.0f}% ({acc})",
                     _ci(p["top1"]["perplexity"]), _pct(p["top1"]["pct_change"]), _pct(p["top1"]["vs_oracle"]),
                     f"{p['soft']['temperature']:g}", _ci(p["soft"]["perplexity"]), _pct(p["soft"]["pct_change"]),
                     _pct(p["soft"]["vs_oracle"])])
    if not rows:
        return []
    return [Table(["combination", "routing accuracy", "ppl top-1", "%Δ top-1 vs merged", "%Δ top-1 vs oracle",
                   "soft τ", "ppl soft", "%Δ soft vs merged", "%Δ soft vs oracle"], rows,
                  f"The prompt router chooses each example's block from its question alone: the nearest centroid of "
                  f"the base model's prompt features (top-1), or the blocks' predictions mixed with weights from those "
                  f"distances at the temperature τ chosen on validation (soft). Routing accuracy: share of test "
                  f"examples sent to their own domain's block. Pooled test perplexity ({ci}); paired %Δ.")]


def _cost_rows(row: dict) -> list[list[str]]:
    out = []
    for name, cost in row["models"].items():
        label = "sum" if name == "sum" else f"best on validation: {cost['method']}"
        gap = cost["log_gap"]
        for d, v in cost["domains"].items():
            share = cost["interference_by_domain"][d]
            out.append([" + ".join(row["subset"]), label, d, _ci(row["own"][d]), _ci(row["merged"][d]),
                        _ci(v["perplexity"]), _pct(v["vs_own"]), _pct(v["vs_merged"]),
                        f"{100 * share / gap:.0f}%" if gap else ""])
        out.append([" + ".join(row["subset"]), label, "oracle's gap", "", "", "", "", "",
                    f"{100 * cost['oracle_gap'] / gap:.0f}%" if gap else ""])
    return out


def cost_section(r: dict) -> list[Section]:
    rows = [x for row in r.get("cost_by_domain", []) for x in _cost_rows(row)]
    if not rows:
        return []
    return [Section("Where the cost lands — per member domain", [
        Table(["combination", "model", "domain", "ppl own block", "ppl merged", "ppl model", "%Δ vs own block",
               "%Δ vs merged", "share of the gap"], rows,
              "Each composed model on each member domain's test set against that domain's own fundamental block and "
              "the merged-data block (paired CIs). The gap to merged, log(ppl model / ppl merged) pooled, splits "
              "exactly into the interference on each domain (model vs own block, weighted by the domain's tokens) "
              "and the oracle's gap (own blocks vs merged), which no routing of these adapters removes."),
        Paragraph("A cost lands on a domain where the CI of its %Δ vs own block lies above 0; the verdicts are under "
                  "Findings ('where the cost of the sum lands'); shares are of the pooled gap to merged and may be "
                  "negative (a domain the composition serves better than its own block) or above 100%.")])]


def serving_cost_table(entries: list[dict]) -> list:
    """Eval tokens per second of the base model and of each serving variant (lm.throughput), from timings.json."""
    found = [t for t in entries if t.get("kind") == "throughput" and isinstance(t.get("throughput"), dict)]
    if not found:
        return []
    t = found[0]["throughput"]
    rows = []
    for name in sorted(t["variants"], key=lambda n: list(DESCRIPTIONS).index(n) if n in DESCRIPTIONS else 99):
        v = t["variants"][name]
        setup = v.get("setup_s", t.get("centroids_s") if name.startswith("prompt") else None)
        rows.append([DESCRIPTIONS.get(name, name), f"{v['tokens_per_s']:.0f}", f"{v['x_base']:.2f}×",
                     "" if setup is None else f"{1000 * setup:.0f} ms"])
    subset = " + ".join(found[0].get("subset", []))
    return [Table(["served as", "eval tokens/s", "speed against the base model (median over rounds)",
                   "one-off setup"], rows,
                  f"Serving cost on {subset}'s test split ({t['tokens']} token positions per pass, {t['rounds']} "
                  "rounds, the variants taking turns within each round on the same batches): a merged model runs "
                  "the base model's own architecture; Arrow keeps the adapters beside it and routes each token; the "
                  "prompt router first reads each prompt with the base model, then applies the chosen adapter "
                  "(top-1) or every adapter (soft). Setup: building the Arrow router, or the prompt router's "
                  "centroids from the training questions. Wall times on this machine, from timings.json.")]
