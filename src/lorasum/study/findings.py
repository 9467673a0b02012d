"""Verdicts on the paper's claims by fixed rules, so the report never says more than the intervals allow.

- "summed ≈ merged" only where the whole CI of %Δ perplexity lies within ±10%;
- the RMS → %Δ relation is tested only with at least 8 distinct pairs (fewer cannot decide it), by Spearman's ρ
  with a permutation test over domain labels and an OLS slope whose CI resamples domains (lorasum.relation);
  the fit has one point per pair (its mean over seeds), so n is the number of pairs, not pairs × seeds;
- a pair is "near-orthogonal" only where its RMS (every seed's) lies closer to the random null than to the
  same-domain ceiling on a log scale, i.e. below their geometric midpoint;
- unlearning "restores" a domain only where its perplexity after removal lies within the CI of the model trained
  without that domain;
- the oracle router (each domain's examples served by its own block) "reaches the merged block" only where the CI of
  its %Δ vs merged includes or lies below 0;
- a composition's cost is "interference" only where the CI of its %Δ vs the oracle router lies above 0, and it lands
  "on" a domain only where the CI of its %Δ vs that domain's own block lies above 0 there;
- a practical router (prompt-level, Arrow) is "within 2% of the oracle" only where the upper end of its %Δ vs the
  oracle's CI is at most 2%;
- a repaired sum "reaches the merged block" at the smallest budget whose %Δ vs merged CI includes or lies below 0.
Anything else is stated as what it is, most often "inconclusive" or "cannot be decided here".
"""

from __future__ import annotations

import numpy as np

EQUIVALENCE_MARGIN = 10.0  # percent
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "cannot be decided here"


def summed_verdict(ci: list[float] | tuple[float, float], margin: float = EQUIVALENCE_MARGIN) -> str:
    lo, hi = ci
    if -margin <= lo and hi <= margin:
        return "summed ≈ merged"
    if lo > margin:
        return "summed worse than merged"
    if hi < -margin:
        return "summed better than merged"
    return "inconclusive"


def rms_verdict(fit: dict) -> str:
    """The relation's verdict (see lorasum.relation); 'inconclusive' where too few pairs can decide it."""
    rel = fit.get("relation") or {}
    return rel["verdict"] if rel.get("decidable") else "inconclusive"


def unlearning_verdict(after: float, without_ci: list[float] | tuple[float, float]) -> str:
    lo, hi = without_ci
    return "restores" if lo <= after <= hi else "does not restore"


def orthogonality_verdict(rms_per_seed: list[float], null: float | None, ceiling: float | None) -> str:
    """'near-orthogonal' where every seed's RMS lies below the geometric midpoint of the random null and the
    same-domain ceiling (RMS spans orders of magnitude, so 'closer' is judged on a log scale), 'not' where every
    seed's lies above it; a seed on each side decides nothing."""
    if null is None or ceiling is None or null <= 0 or ceiling <= null:
        return "cannot be decided (no same-domain ceiling above the null)"
    mid = (null * ceiling) ** 0.5
    if max(rms_per_seed) < mid:
        return "near-orthogonal"
    if min(rms_per_seed) > mid:
        return "not near-orthogonal"
    return "inconclusive"


def relation_evidence(fit: dict) -> str:
    rel = fit.get("relation") or {}
    if not rel.get("decidable"):
        return rel.get("reason") or f"{fit.get('n', 0)} pairs: too few to test the RMS → %Δ relation"
    sp, ols = rel["spearman"], rel["ols"]
    return (f"Spearman ρ {sp['rho']:.2f} (permutation p {sp['p']:.3f} over {sp['n_domains']} domain labels), "
            f"slope {ols['slope']:.1f} (domain-bootstrap CI {ols['ci'][0]:.1f} to {ols['ci'][1]:.1f}), "
            f"n = {rel['n']} pairs")


def method_verdict(choice: dict) -> str:
    """The best composition on validation against the exact sum, by the paired CI of %Δ (best vs sum) on test."""
    if choice["best"] == "sum":
        return "the exact naive sum is the best on validation"
    lo, hi = choice["vs_sum"]["ci"]
    if lo <= 0 <= hi:
        return "the exact naive sum is within the CI of the best"
    return f"{choice['best']} beats the exact sum" if hi < 0 else f"the exact sum beats {choice['best']}"


def oracle_verdict(ci: list[float] | tuple[float, float]) -> str:
    """The oracle router against the merged-data block, by the paired CI of its %Δ."""
    lo, hi = ci
    if lo > 0:
        return "even the oracle router is worse than merged: no routing of these adapters per example reaches it"
    return "the oracle router beats merged" if hi < 0 else "the oracle router reaches the merged block"


NEAR_ORACLE_MARGIN = 2.0  # percent: a router "approaches the oracle" where its %Δ vs the oracle's CI stays below it


def near_oracle_verdict(ci: list[float] | tuple[float, float], margin: float = NEAR_ORACLE_MARGIN) -> str:
    """A practical router against the oracle router, by the paired CI of its %Δ."""
    lo, hi = ci
    if hi <= margin:
        return f"within {margin:g}% of the oracle"
    return f"more than {margin:g}% worse than the oracle" if lo > margin else "inconclusive"


def _router_findings(results: dict) -> list[dict]:
    """The prompt router (top-1, soft) and Arrow against the oracle, per subset."""
    out = []
    arrow = {tuple(c["subset"]): c["models"]["arrow"] for c in results.get("cost_by_domain", [])
             if "arrow" in c["models"]}
    for row in results.get("routing", []):
        found = {f"prompt router ({k})": row["prompt"][k]["vs_oracle"] for k in ("top1", "soft")} \
            if "prompt" in row else {}
        if tuple(row["subset"]) in arrow:
            found["arrow"] = arrow[tuple(row["subset"])]["vs_oracle"]
        for name, vs in found.items():
            acc = f"; routing accuracy {100 * row['prompt']['accuracy']:.0f}%" if name.startswith("prompt") else ""
            out.append({"claim": f"{name} vs the oracle router", "subject": " + ".join(row["subset"]),
                        "verdict": near_oracle_verdict(vs["ci"]),
                        "evidence": f"%Δ vs oracle {vs['mean']:+.1f}% (CI {vs['ci'][0]:+.1f}% to {vs['ci'][1]:+.1f}%)"
                                    f"{acc}"})
    return out


def cost_verdict(cost: dict) -> str:
    """Where a composition's cost lands (see study.units.cost): interference on one domain, on several, or none
    detectable (then the cost, if any, is the merged block's advantage over the domains' own blocks)."""
    lo, hi = cost["vs_oracle"]["ci"]
    if hi < 0:
        return "no interference: better than the oracle router (the other blocks help)"
    if lo <= 0:
        return "no interference detected (within the CI of the oracle router)"
    hit = [d for d, v in cost["domains"].items() if v["vs_own"]["ci"][0] > 0]
    if not hit:
        return "interference, on no single domain decidably"
    return f"interference on {hit[0]}" if len(hit) == 1 else f"interference spread over {', '.join(hit)}"


def _shares(cost: dict) -> str:
    gap = cost["log_gap"]
    if not gap:
        return "no gap to split"
    parts = ", ".join(f"{d} {100 * v / gap:.0f}%" for d, v in cost["interference_by_domain"].items())
    return f"of the gap to merged: interference {100 * cost['interference'] / gap:.0f}% ({parts}), the oracle's " \
           f"gap {100 * cost['oracle_gap'] / gap:.0f}%"


def repair_finding(row: dict) -> dict:
    """The smallest budget whose repaired sum reaches the merged block (its %Δ CI includes or lies below 0), else how
    much of the gap the largest budget closes."""
    reached = next((b for b in row["budgets"] if b["pct_change"]["ci"][0] <= 0), None)
    last = row["budgets"][-1]
    if reached is not None:
        verdict = f"reaches the merged block at {100 * reached['fraction']:g}% of its steps"
    else:
        verdict = f"does not reach the merged block within {100 * last['fraction']:g}% of its steps"
    evidence = "; ".join(f"{100 * b['fraction']:g}%: %Δ vs merged {b['pct_change']['mean']:+.1f}% (CI "
                         f"{b['pct_change']['ci'][0]:+.1f}% to {b['pct_change']['ci'][1]:+.1f}%)"
                         + ("" if b.get("gap_closed") is None else f", gap closed {100 * b['gap_closed']:.0f}%")
                         for b in row["budgets"])
    return {"claim": "a short repair of the sum vs merged", "subject": " + ".join(row["subset"]), "verdict": verdict,
            "evidence": evidence}


def routing_findings(results: dict) -> list[dict]:
    """The oracle router per subset, and where the sum's (and the best merge method's) cost lands."""
    out = []
    for row in results.get("routing", []):
        o = row["oracle"]
        pc = o["pct_change"]
        out.append({"claim": "oracle routing vs merged", "subject": " + ".join(row["subset"]),
                    "verdict": oracle_verdict(pc["ci"]),
                    "evidence": f"%Δ oracle vs merged {pc['mean']:+.1f}% (CI {pc['ci'][0]:+.1f}% to "
                                f"{pc['ci'][1]:+.1f}%)"})
    out += _router_findings(results)
    out += [repair_finding(row) for row in results.get("repair", [])]
    for row in results.get("cost_by_domain", []):
        for name, cost in row["models"].items():
            label = "sum" if name == "sum" else cost["method"]
            vs = cost["vs_oracle"]
            what = "best on validation" if name == "best_on_validation" else name
            out.append({"claim": f"where the cost of the {what} lands",
                        "subject": " + ".join(row["subset"]), "verdict": cost_verdict(cost),
                        "evidence": f"%Δ {label} vs oracle {vs['mean']:+.1f}% (CI {vs['ci'][0]:+.1f}% to "
                                    f"{vs['ci'][1]:+.1f}%); {_shares(cost)}"})
    return out


def method_finding(row: dict) -> dict:
    c = choice = row["method_choice"]
    label = row["baselines"].get(c["best"], {}).get("model") or choice["best_model"]
    vs = c["vs_sum"]
    test = "" if vs is None else (f"; on test %Δ {c['best']} vs sum {vs['mean']:+.1f}% (CI {vs['ci'][0]:+.1f}% to "
                                  f"{vs['ci'][1]:+.1f}%)")
    return {"claim": "best merge method on validation vs the exact sum", "subject": " + ".join(row["subset"]),
            "verdict": method_verdict(c),
            "evidence": f"best on validation: {label} (ppl {c['validation_perplexity'][c['best']]:.2f}; sum "
                        f"{c['validation_perplexity']['sum']:.2f}){test}"}


def findings(results: dict) -> list[dict]:
    out = []
    rc = results.get("recipe_check") or {}
    if rc.get("passed") is not None:
        worst = max(rc["domains"].items(), key=lambda kv: kv[1]["ratio"])
        out.append({"claim": "recipe check (fundamental ppl <= %.2f x base on its own domain)" % rc["max_ppl_ratio"],
                    "subject": "fundamental blocks", "verdict": "passed" if rc["passed"] else
                    "FAILED: the training recipe is broken, the comparisons below are not results",
                    "evidence": ", ".join(f"{d} {v['ratio']:.2f}x" for d, v in rc["domains"].items())
                    + f" (worst: {worst[0]})"})
    for row in results.get("compositions", []):
        if "pct_change" not in row:
            continue
        pc = row["pct_change"]
        out.append({"claim": "summed vs merged", "subject": " + ".join(row["subset"]),
                    "verdict": summed_verdict(pc["ci"]),
                    "evidence": f"%Δ perplexity {pc['mean']:+.1f}% (CI {pc['ci'][0]:+.1f}% to {pc['ci'][1]:+.1f}%)"})
    for row in results.get("compositions", []):
        if row.get("method_choice"):
            out.append(method_finding(row))
    out += routing_findings(results)
    for pair, p in results.get("pairs", {}).items():
        if "null" not in p:
            continue
        ceil = p.get("ceiling")
        out.append({"claim": "deltas near-orthogonal", "subject": " + ".join(p["domains"]),
                    "verdict": orthogonality_verdict(p["rms_per_seed"], p["null"]["mean"], ceil),
                    "evidence": f"RMS {p['rms']:.4f}; random null {p['null']['mean']:.4f}; same-domain ceiling "
                                + ("none" if ceil is None else f"{ceil:.4f} (log midpoint "
                                                               f"{(p['null']['mean'] * ceil) ** 0.5:.4f})")})
    fit = results.get("fit", {})
    out.append({"claim": "RMS similarity predicts %Δ perplexity", "subject": "pairs", "verdict": rms_verdict(fit),
                "evidence": relation_evidence(fit)})
    for row in results.get("unlearning", []):
        after = row["removed_domain"]["after"]["mean"]
        wci = row["removed_domain"]["without"]["ci"]
        out.append({"claim": "unlearning by subtraction (λ = 1)", "subject": row["removed"],
                    "verdict": unlearning_verdict(after, wci),
                    "evidence": f"perplexity on {row['removed']} after removal {after:.2f}; model trained without it "
                                f"{row['removed_domain']['without']['mean']:.2f} (CI {wci[0]:.2f} to {wci[1]:.2f})"})
        chosen = (row.get("chosen") or {}).get("weight")
        if chosen is not None and chosen != 1.0:
            s = next(x for x in row["sweep"] if x["weight"] == chosen)
            out.append({"claim": f"unlearning by subtraction (λ = {chosen:g}, chosen on validation)",
                        "subject": row["removed"], "verdict": unlearning_verdict(s["removed"]["mean"], wci),
                        "evidence": f"perplexity on {row['removed']} after removal {s['removed']['mean']:.2f}"})
    return out


def _claim_sum(results: dict) -> dict:
    pairs = [c for c in results.get("compositions", []) if c["level"] == 2 and "pct_change" in c]
    verdicts = [summed_verdict(c["pct_change"]["ci"]) for c in pairs]
    return _claim("summed ≈ merged (the sum of fundamentals performs like the merged-data block)",
                  HOLDS if pairs and all(v == "summed ≈ merged" for v in verdicts) else
                  FAILS if any(v in ("summed worse than merged", "summed better than merged") for v in verdicts)
                  else UNDECIDED,
                  ", ".join(f"{' + '.join(c['subset'])} {c['pct_change']['mean']:+.1f}%" for c in pairs) or "no pairs",
                  f"holds when every pair's %Δ CI lies within ±{EQUIVALENCE_MARGIN:g}%; does not hold when any "
                  "lies wholly outside")


def _claim_orthogonal(results: dict) -> dict:
    ortho = [f for f in findings_of(results, "deltas near-orthogonal")]
    return _claim("the deltas of different domains are near-orthogonal",
                  UNDECIDED if not ortho or any(f["verdict"].startswith("cannot") for f in ortho) else
                  HOLDS if all(f["verdict"] == "near-orthogonal" for f in ortho) else FAILS,
                  "; ".join(f"{f['subject']}: {f['evidence']}" for f in ortho) or "no null or ceiling computed",
                  "holds when every pair's RMS, in every seed, is closer to the random null than to the same-domain "
                  "ceiling on a log scale (below their geometric midpoint); does not hold when some pair's is not")


def _claim_relation(results: dict) -> dict:
    fit = results.get("fit", {})
    rel = fit.get("relation") or {}
    groups = {g: v for g, v in (rel.get("groups") or {}).items() if v.get("decidable")}
    if not rel.get("decidable"):
        verdict = UNDECIDED
    elif any(v["verdict"] != rel["verdict"] for v in groups.values()):
        verdict = UNDECIDED  # the groups disagree with the whole: clusters may fake (or hide) the slope
    else:
        verdict = {"positive relation": HOLDS, "negative relation": FAILS}.get(rel["verdict"], UNDECIDED)
    group_text = "; ".join(f"{g}: {v['verdict']} (n = {v['n']})" if v.get("decidable") else f"{g}: {v['reason']}"
                           for g, v in (rel.get("groups") or {}).items())
    return _claim("RMS similarity predicts %Δ perplexity linearly", verdict,
                  relation_evidence(fit) + (f"; within groups — {group_text}" if group_text else ""),
                  (rel.get("rule") or "needs at least 8 distinct pairs") + "; holds only with a positive relation "
                  "that every decidable group of pairs (within one parent domain, across parents) shares; no "
                  "detectable relation is not a refutation, so it leaves the claim undecided")


def _claim_levels(results: dict) -> dict:
    by_level = {}
    for c in results.get("compositions", []):
        if "pct_change" in c:
            by_level.setdefault(c["level"], []).append(c["pct_change"])
    if max(by_level, default=0) >= 3:
        lo3 = min(p["ci"][0] for p in by_level[3])
        hi3 = max(p["ci"][1] for p in by_level[3])
        mean2 = float(np.mean([p["mean"] for p in by_level[2]]))
        verdict = HOLDS if lo3 > mean2 else FAILS if hi3 < mean2 else UNDECIDED
        ev = (f"3-block sums %Δ CI {lo3:+.1f}% to {hi3:+.1f}%; mean %Δ of 2-block sums {mean2:+.1f}%")
    else:
        verdict, ev = UNDECIDED, "needs compositions of at least 3 blocks"
    return _claim("quality degrades as blocks are added", verdict, ev,
                  "holds when every 3-block sum's %Δ CI lies above the mean %Δ of the 2-block sums")


def _claim_unlearning(results: dict) -> dict:
    unl = results.get("unlearning", [])
    restored = [f for f in findings_of(results, "unlearning by subtraction (λ = 1)")]
    chosen = {u["removed"]: (u.get("chosen") or {}).get("weight") for u in unl}
    return _claim("subtracting a block unlearns its domain",
                  UNDECIDED if not unl or not restored else
                  HOLDS if all(f["verdict"] == "restores" for f in restored) else FAILS,
                  "; ".join(f"{f['subject']}: {f['verdict']} at λ = 1"
                            + ("" if chosen.get(f["subject"]) in (None, 1.0) else
                               f" (λ chosen on validation: {chosen[f['subject']]:g})") for f in restored)
                  or "unlearning not run",
                  "holds when, for every removed domain, perplexity after subtraction lies within the CI of the "
                  "model trained without it")


CLAIMS = (_claim_sum, _claim_orthogonal, _claim_relation, _claim_levels, _claim_unlearning)  # the report's order


def claims(results: dict) -> list[dict]:
    """The paper's claims, one line each: holds / does not hold / cannot be decided here, with the rule."""
    return [claim(results) for claim in CLAIMS]


def findings_of(results: dict, claim: str) -> list[dict]:
    return [f for f in results.get("findings", []) if f["claim"] == claim]


def _claim(claim: str, verdict: str, evidence: str, rule: str) -> dict:
    return {"claim": claim, "verdict": verdict, "evidence": evidence, "rule": rule}
