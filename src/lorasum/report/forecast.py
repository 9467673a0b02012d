"""What predicts the summing cost: every candidate predictor ranked against the pairs' %Δ, the rule that decides
"predicts" stated before the numbers, what each family costs, and the figure of ρ per predictor."""

from __future__ import annotations

import math

import numpy as np

from ..charts import png, pyplot
from .blocks import Figures, Paragraph, Section, Table

VERDICT_COLOURS = {"predicts": "C2", "ranks only": "C1", "no evidence": "grey"}


def _real(v, missing: float) -> float:
    """A number from results.json, `missing` for null or NaN."""
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _p(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _rho(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.2f}"


def forecast_rows(fc: dict) -> list[list[str]]:
    rows = []
    for r in fc["predictors"]:
        groups = "; ".join(f"{g} {_rho(x.get('rho'))} (n={x.get('n')})" for g, x in (r.get("groups") or {}).items())
        rows.append([r["name"], r.get("family", ""), str(r["n"]), _rho(r["rho"]), _p(r["p"]), _p(r["p_holm"]),
                     "" if r.get("lodo_mae") is None else f"{r['lodo_mae']:.1f} / {r['baseline_mae']:.1f}",
                     groups, r["verdict"]])
    return rows


def forecast_section(r: dict) -> list[Section]:
    fc = r.get("forecast")
    if not fc:
        return []
    cost = "; ".join(f"{fam}: {c['forward_tokens']:.0f} forward token positions per pair, "
                     f"{100 * c['vs_sum_eval']:.0f}% of evaluating the sum on the pair's test split"
                     for fam, c in fc["cost"].items())
    best = min(fc["predictors"], key=lambda x: _real(x["p_holm"], 2.0), default=None)
    return [Section("What predicts the summing cost", [
        Paragraph(f"The rule, fixed before the numbers: {fc['rule']} {fc['tested']} predictors tested over "
                  f"{fc['n_pairs']} pairs (each the mean over seeds); activation and function predictors read the "
                  f"first {fc['inputs_per_domain']} training questions of each domain (prompts, no answers)."),
        Table(["predictor", "family", "pairs", "Spearman ρ vs %Δ", "p (domain permutation)", "p (Holm)",
               "LODO error / mean baseline (points of %Δ)", "ρ within and across parents", "verdict"],
              forecast_rows(fc), "Each predictor against the measured %Δ of the pair's sum vs its merged-data block. "
              "LODO: each domain's pairs predicted by a least-squares line fitted on the pairs without that domain; "
              "the mean baseline predicts the same pairs by the training pairs' mean %Δ.", verdicts=8),
        Paragraph(f"Cost per pair — {cost}."),
        Figures(("forecast",), *forecast_figure_text(r))],
        summary=f"{fc['tested']} predictors over {fc['n_pairs']} pairs"
                + (f"; lowest Holm p: {best['name']} ({_p(best['p_holm'])}, {best['verdict']})" if best else ""))]


def forecast_figure(results: dict) -> bytes:
    """Left: Spearman ρ of each predictor with the pairs' %Δ, coloured by verdict; right: %Δ against the predictor
    with the lowest Holm-adjusted p."""
    fc = results["forecast"]
    plt = pyplot()
    rows = fc["predictors"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.3 * max(len(rows), 4)))
    ys = np.arange(len(rows))[::-1]
    ax.barh(ys, [_real(x["rho"], 0.0) for x in rows],
            color=[VERDICT_COLOURS.get(x["verdict"], "lightgrey") for x in rows])
    ax.set_yticks(ys, [f"{x['name']} ({x['family']})" for x in rows], fontsize=7)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("Spearman ρ with %Δ (sum vs merged)")
    ax.set_title("Predictors (green predicts, orange ranks only, grey no evidence)", fontsize=9)
    best = min(rows, key=lambda x: _real(x["p_holm"], 2.0))
    pairs = list(fc["values"])
    bx.scatter([fc["values"][p][best["name"]] for p in pairs], [fc["pct_change"][p] for p in pairs], color="C0")
    bx.set_xlabel(best["name"])
    bx.set_ylabel("%Δ perplexity, sum vs merged")
    bx.set_title(f"%Δ against {best['name']} (lowest Holm p)", fontsize=9)
    fig.tight_layout()
    return png(fig)


def forecast_figure_text(results: dict) -> tuple[str, str]:
    fc = results["forecast"]
    listed = "; ".join(f"{x['name']} ρ {_rho(x['rho'])}" for x in fc["predictors"])
    return (f"Bar chart of Spearman ρ between each of {fc['tested']} predictors and the summing cost over "
            f"{fc['n_pairs']} pairs ({listed}), and a scatter of %Δ against the predictor with the lowest Holm p.",
            "Bars near 0: the predictor says nothing of the cost. Colour: the verdict of the stated rule (Holm-"
            "corrected domain-permutation p and a leave-one-domain-out error below the mean baseline's).")
