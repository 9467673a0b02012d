"""Verdicts on the paper's claims by fixed rules, so the report never says more than the intervals allow.

- "summed ≈ merged" only where the whole CI of %Δ perplexity lies within ±10%;
- "positive RMS relation" only where the CI of the RMS → %Δ slope excludes 0 (and the slope is positive); the fit
  has one point per pair (its mean over seeds), so n is the number of pairs, not pairs × seeds;
- unlearning "restores" a domain only where its perplexity after removal lies within the CI of the model trained
  without that domain.
Anything else is stated as what it is, most often "inconclusive".
"""

from __future__ import annotations

EQUIVALENCE_MARGIN = 10.0  # percent


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
    ci = fit.get("slope_ci")
    if not ci:
        return "inconclusive"
    lo, hi = ci
    if lo > 0:
        return "positive RMS relation"
    if hi < 0:
        return "negative RMS relation"
    return "inconclusive"


def unlearning_verdict(after: float, without_ci: list[float] | tuple[float, float]) -> str:
    lo, hi = without_ci
    return "restores" if lo <= after <= hi else "does not restore"


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
    fit = results.get("fit", {})
    if fit.get("slope") is None:
        ev = f"{fit.get('n', 0)} pairs: too few for a fit"
    elif fit.get("slope_ci") is None:
        ev = f"slope {fit['slope']:.1f} from {fit['n']} pairs: too few for an interval"
    else:
        ev = (f"slope {fit['slope']:.1f} (CI {fit['slope_ci'][0]:.1f} to {fit['slope_ci'][1]:.1f}), "
              f"r² {fit['r2']:.2f}, n = {fit['n']} pairs")
    out.append({"claim": "RMS similarity predicts %Δ perplexity", "subject": "pairs", "verdict": rms_verdict(fit),
                "evidence": ev})
    for row in results.get("unlearning", []):
        after = row["removed_domain"]["after"]["mean"]
        wci = row["removed_domain"]["without"]["ci"]
        out.append({"claim": "unlearning by subtraction", "subject": row["removed"],
                    "verdict": unlearning_verdict(after, wci),
                    "evidence": f"perplexity on {row['removed']} after removal {after:.2f}; model trained without it "
                                f"{row['removed_domain']['without']['mean']:.2f} (CI {wci[0]:.2f} to {wci[1]:.2f})"})
    return out
