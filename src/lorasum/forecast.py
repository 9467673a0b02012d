"""Which cheap predictor forecasts the cost of summing two adapters? Ranking predictors over domain pairs.

Each predictor gives one number x per domain pair (a, b); y is the pair's measured cost (%Δ of the sum vs the
merged model). A predictor is judged on three things, all over the same pairs:

- Spearman's ρ with a two-sided p from permuting domain labels (`relation.mantel_test`; a pair set that
  relabelling does not map onto itself falls back to `relation.pair_permutation_test`, named in "test");
- Holm–Bonferroni adjusted p across every predictor tested together (m = the number of predictors ranked);
- leave-one-domain-out (LODO) prediction: for each domain d, y ~ x is fitted by ordinary least squares on the
  pairs that do not contain d and predicts the pairs that do; its mean absolute error is compared with the
  baseline that predicts the same held-out pairs by the mean y of the same training pairs.

The verdict rule, fixed before any numbers are seen:

- "too few pairs (n<MIN)" when the pairs number fewer than `min_pairs` (no p-value is computed then);
- "predicts" when n ≥ min_pairs AND the Holm-adjusted p < alpha AND the LODO MAE is below the mean baseline's;
- "ranks only" when the Holm-adjusted p < alpha but the LODO MAE is not below the baseline's;
- "no evidence" otherwise (including a constant predictor, whose ρ and p are undefined).

Pure numpy; pairs are unordered (`relation.pair_key`) and each appears once (average seeds first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .errors import LorasumError
from .relation import (Pair, closed_under_relabelling, mantel_test, pair_key, pair_keys, pair_permutation_test,
                       spearman)

MIN_FIT_PAIRS = 3  # a LODO fold needs this many training pairs (and spread in x) to fit a line
VERDICTS = ("predicts", "ranks only", "no evidence")


# --- multiple testing --------------------------------------------------------------------------------------------

def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: with p₍₁₎ ≤ … ≤ p₍ₘ₎, adj₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1)·p₍ⱼ₎).

    Monotone in the raw p and capped at 1. A NaN p (an untestable predictor) still counts in m, sorts last
    (as p = 1) and stays NaN. Args: {name: p in [0, 1] or NaN}. Returns: {name: adjusted p}, same keys.
    """
    names = list(pvalues)
    raw = np.array([float(pvalues[k]) for k in names], float)  # (m,)
    bad = [k for k, p in zip(names, raw) if not (math.isnan(p) or 0.0 <= p <= 1.0)]
    if bad:
        raise LorasumError(f"p-value of '{bad[0]}' must be between 0 and 1, got {pvalues[bad[0]]!r}")
    m = len(names)
    filled = np.where(np.isnan(raw), 1.0, raw)
    order = np.argsort(filled, kind="stable")  # (m,)
    steps = np.minimum(1.0, (m - np.arange(m)) * filled[order])  # (m,) (m − j + 1)·p₍ⱼ₎ for j = 1..m
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(steps)
    return {k: (math.nan if math.isnan(p) else float(a)) for k, p, a in zip(names, raw, adjusted)}


# --- checked input -----------------------------------------------------------------------------------------------

def _checked(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float], what: str = "x"
             ) -> tuple[list[Pair], np.ndarray, np.ndarray]:
    """Pair keys and x, y as float arrays; lengths, finiteness and repeated pairs refused in one line."""
    try:
        xa, ya = np.asarray(x, float).reshape(-1), np.asarray(y, float).reshape(-1)
    except (TypeError, ValueError):
        raise LorasumError(f"{what} and y must be sequences of numbers, one per pair") from None
    if not len(pairs) == len(xa) == len(ya):
        raise LorasumError(f"pairs, {what} and y differ in length: {len(pairs)}, {len(xa)}, {len(ya)}; give one "
                           "value per pair")
    for name, v in ((what, xa), ("y", ya)):
        if not np.isfinite(v).all():
            i = int(np.flatnonzero(~np.isfinite(v))[0])
            raise LorasumError(f"{name} of pair {tuple(pairs[i])} is {v[i]}; every value must be a finite number "
                               "(drop the pair or recompute it)")
    return pair_keys(pairs), xa, ya


# --- leave one domain out ----------------------------------------------------------------------------------------

def ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of y ~ x; None with fewer than MIN_FIT_PAIRS points or no spread in x."""
    if len(x) < MIN_FIT_PAIRS:
        return None
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if not sxx > 1e-12 * float(x @ x) + 1e-300:  # no spread relative to the scale of x
        return None
    slope = float(dx @ (y - y.mean())) / sxx
    return slope, float(y.mean()) - slope * float(x.mean())


def lodo_predictions(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float]) -> dict:
    """Leave-one-domain-out predictions of y from x, and of the mean baseline, for every (domain, pair) held out.

    For each domain d (sorted): fit y = slope·x + intercept by OLS on the pairs without d, predict each pair that
    holds d. A pair (a, b) is held out twice, in a's fold and in b's (a self-pair (d, d) once), and both
    predictions are kept: each is an honest forecast for a domain the fit never saw. A fold whose training pairs
    are fewer than MIN_FIT_PAIRS or have no spread in x is skipped (listed in "skipped").

    Returns: {"rows": [{"domain", "pair", "y", "predicted", "baseline"}], "skipped": [domain], "n_domains"}.
    """
    keys, xa, ya = _checked(pairs, x, y)
    domains = sorted({d for k in keys for d in k})
    rows, skipped = [], []
    for d in domains:
        held = np.array([d in k for k in keys])  # (n,)
        fit = ols(xa[~held], ya[~held])
        if fit is None:
            skipped.append(d)
            continue
        slope, intercept = fit
        mean = float(ya[~held].mean())
        rows += [{"domain": d, "pair": keys[i], "y": float(ya[i]), "predicted": slope * float(xa[i]) + intercept,
                  "baseline": mean} for i in np.flatnonzero(held)]
    return {"rows": rows, "skipped": skipped, "n_domains": len(domains)}


def lodo_errors(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float]) -> list[float]:
    """|y − ŷ| of every held-out (domain, pair) prediction, in `lodo_predictions`' order (a pair appears once per
    member domain whose fold could be fitted)."""
    return [abs(r["y"] - r["predicted"]) for r in lodo_predictions(pairs, x, y)["rows"]]


def lodo_summary(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float]) -> dict:
    """LODO mean absolute error of the OLS fit vs the training-mean baseline on the same held-out predictions.

    Returns: {"mae", "baseline_mae", "beats_baseline" (mae < baseline_mae), "n_predictions", "n_domains",
    "skipped"}; the MAEs are NaN (and beats_baseline False) when no fold could be fitted.
    """
    out = lodo_predictions(pairs, x, y)
    rows = out["rows"]
    mae = float(np.mean([abs(r["y"] - r["predicted"]) for r in rows])) if rows else math.nan
    base = float(np.mean([abs(r["y"] - r["baseline"]) for r in rows])) if rows else math.nan
    return {"mae": mae, "baseline_mae": base, "beats_baseline": bool(mae < base), "n_predictions": len(rows),
            "n_domains": out["n_domains"], "skipped": out["skipped"]}


# --- ranking -----------------------------------------------------------------------------------------------------

def verdict(n: int, p_holm: float, lodo: dict, min_pairs: int, alpha: float) -> str:
    """The module docstring's rule: too few pairs, else predicts / ranks only / no evidence."""
    if n < min_pairs:
        return f"too few pairs (n<{min_pairs})"
    if not p_holm < alpha:  # also false for NaN
        return "no evidence"
    return "predicts" if lodo["beats_baseline"] else "ranks only"


def _group_rhos(keys: list[Pair], xa: np.ndarray, ya: np.ndarray, groups: Mapping | None) -> dict:
    """{label: {"n", "rho"}}: Spearman ρ among the pairs of each group (ρ is NaN under 2 pairs or no spread)."""
    if groups is None:
        return {}
    label = {pair_key(k): str(g) for k, g in groups.items()}
    if unlabelled := [k for k in keys if k not in label]:
        raise LorasumError(f"pair {unlabelled[0]} has no group (groups must label every pair, e.g. 'within' or "
                           "'across')")
    out = {}
    for g in sorted({label[k] for k in keys}):
        sel = np.array([label[k] == g for k in keys])
        out[g] = {"n": int(sel.sum()), "rho": spearman(xa[sel], ya[sel])}
    return out


def _test(keys: list[Pair], xa: np.ndarray, ya: np.ndarray, seed: int) -> tuple[float, str]:
    """Two-sided permutation p of Spearman's ρ (Mantel when the pair set is closed), and the test's name."""
    if closed_under_relabelling(keys):
        return mantel_test(keys, xa, ya, seed=seed)["p"], "mantel"
    return pair_permutation_test(keys, xa, ya, seed=seed)["p"], "pair permutation"


def _row_order(row: dict) -> tuple:
    rank = VERDICTS.index(row["verdict"]) if row["verdict"] in VERDICTS else len(VERDICTS)
    p = row["p_holm"]
    return (rank, math.inf if math.isnan(p) else p, -abs(row["rho"]) if not math.isnan(row["rho"]) else 0.0,
            row["name"])


def rank_predictors(pairs: Sequence[Sequence[str]], predictors: Mapping[str, Sequence[float]], y: Sequence[float],
                    groups: Mapping | None = None, seed: int = 0, min_pairs: int = 8, alpha: float = 0.05
                    ) -> list[dict]:
    """Every predictor's ρ, permutation p, Holm-adjusted p, LODO MAE vs the mean baseline, ρ per group and
    verdict (the module docstring's rule), best first: by verdict, then adjusted p, then |ρ|, then name.

    Args: pairs (n domain pairs); predictors {name: n values}; y (n measured costs); groups {pair: label} (every
    pair labelled, e.g. "within"/"across" a parent domain) or None. Returns one dict per predictor: name, n, rho,
    p, p_holm, tested (m, the predictors Holm corrects over), test, lodo_mae, baseline_mae, lodo_predictions,
    groups {label: {n, rho}}, verdict. Under min_pairs no p is computed (p and p_holm NaN, tested 0).
    """
    if not predictors:
        raise LorasumError("no predictors to rank; give at least one {name: values}")
    if not 0 < alpha < 1:
        raise LorasumError(f"must be between 0 and 1, got {alpha}", key="alpha")
    checked = {name: _checked(pairs, x, y, what=f"predictor '{name}'") for name, x in predictors.items()}
    n = len(pairs)
    tested = n >= min_pairs
    rows, pvals = [], {}
    for name, (keys, xa, ya) in checked.items():
        p, test = _test(keys, xa, ya, seed) if tested else (math.nan, "none")
        pvals[name] = p
        lodo = lodo_summary(keys, xa, ya)
        rows.append({"name": name, "n": n, "rho": spearman(xa, ya), "p": p, "test": test, "lodo": lodo,
                     "groups": _group_rhos(keys, xa, ya, groups)})
    adjusted = holm(pvals) if tested else {k: math.nan for k in pvals}
    for row in rows:
        lodo = row.pop("lodo")
        row.update(p_holm=adjusted[row["name"]], tested=len(rows) if tested else 0, lodo_mae=lodo["mae"],
                   baseline_mae=lodo["baseline_mae"], lodo_predictions=lodo["n_predictions"],
                   verdict=verdict(n, adjusted[row["name"]], lodo, min_pairs, alpha))
    return sorted(rows, key=_row_order)


# --- the forecast ------------------------------------------------------------------------------------------------

def fit_forecast(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float], level: float = 0.9
                 ) -> dict:
    """OLS y = slope·x + intercept on every pair, with an interval from the LODO residuals.

    The interval is [ŷ + q_lo, ŷ + q_hi], q the (1 − level)/2 and (1 + level)/2 quantiles (numpy's linear rule)
    of the signed LODO residuals y − ŷ: how far forecasts for unseen domains fell from the truth.
    Returns: {"slope", "intercept", "n", "level", "q_lo", "q_hi", "lodo_mae", "baseline_mae", "x_min", "x_max"}.
    """
    if not 0 < level < 1:
        raise LorasumError(f"must be between 0 and 1, got {level}", key="level")
    keys, xa, ya = _checked(pairs, x, y)
    fit = ols(xa, ya)
    if fit is None:
        raise LorasumError(f"cannot fit a forecast on {len(keys)} pairs: it needs at least {MIN_FIT_PAIRS} pairs "
                           "with different predictor values")
    rows = lodo_predictions(keys, xa, ya)["rows"]
    if not rows:
        raise LorasumError(f"cannot fit a forecast on {len(keys)} pairs: no leave-one-domain-out fold has "
                           f"{MIN_FIT_PAIRS} training pairs with different predictor values; add domains")
    resid = np.array([r["y"] - r["predicted"] for r in rows])  # (k,)
    q_lo, q_hi = np.quantile(resid, [(1 - level) / 2, (1 + level) / 2])
    return {"slope": fit[0], "intercept": fit[1], "n": len(keys), "level": level, "q_lo": float(q_lo),
            "q_hi": float(q_hi), "lodo_mae": float(np.abs(resid).mean()),
            "baseline_mae": float(np.mean([abs(r["y"] - r["baseline"]) for r in rows])),
            "x_min": float(xa.min()), "x_max": float(xa.max())}


def forecast(fit: Mapping, x_new: float) -> tuple[float, float, float]:
    """(ŷ, lo, hi) = (slope·x + intercept, ŷ + q_lo, ŷ + q_hi) from a `fit_forecast` result."""
    missing = [k for k in ("slope", "intercept", "q_lo", "q_hi") if k not in fit]
    if missing:
        raise LorasumError(f"the forecast fit lacks '{missing[0]}'; fit one with fit_forecast first")
    x = float(x_new)
    if not math.isfinite(x):
        raise LorasumError(f"cannot forecast from a predictor value of {x}; it must be a finite number")
    pct = float(fit["slope"]) * x + float(fit["intercept"])
    return pct, pct + float(fit["q_lo"]), pct + float(fit["q_hi"])
