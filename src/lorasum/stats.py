"""Statistics: paired bootstrap CIs of perplexity and % change, and the paper's RMS -> %Δppl least-squares fit.

Pairing: both models are scored on the *same* resampled test examples (from per-example NLL), so the interval
reflects the difference between models, not the spread of the test set. Resampling is stratified by domain (a
pooled test set keeps its domain mix), and with several seeds the seeds are resampled too (hierarchical bootstrap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as st


@dataclass(frozen=True)
class Scores:
    """Per-example summed NLL of one model: (seeds, examples), with the shared token counts (examples,)."""

    nll: np.ndarray  # (S, n)
    tokens: np.ndarray  # (n,)
    strata: np.ndarray  # (n,) domain index of each example, for stratified resampling


def perplexity(nll_sum: np.ndarray, tokens: np.ndarray | float) -> np.ndarray:
    return np.exp(nll_sum / tokens)


def pct_change(summed: np.ndarray, merged: np.ndarray) -> np.ndarray:
    """% change in perplexity = (summed - merged) / merged * 100 (paper, Table 3)."""
    return (summed - merged) / merged * 100.0


def resample_weights(strata: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, n) counts of each example in B stratified bootstrap resamples."""
    n = len(strata)
    w = np.zeros((samples, n))
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        draws = rng.integers(0, len(idx), size=(samples, len(idx)))
        np.add.at(w, (np.arange(samples)[:, None], idx[draws]), 1.0)
    return w


def _seed_draws(n_seeds: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """(B, S) counts of each seed in B resamples of the seeds (all ones when there is one seed)."""
    if n_seeds == 1:
        return np.ones((samples, 1))
    draws = rng.integers(0, n_seeds, size=(samples, n_seeds))
    return np.stack([np.bincount(d, minlength=n_seeds) for d in draws]).astype(float)


def interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ppl(a: Scores, samples: int, level: float, seed: int) -> dict:
    """Perplexity (mean over seeds) with a bootstrap CI over examples (and seeds)."""
    rng = np.random.default_rng(seed)
    w = resample_weights(a.strata, samples, rng)  # (B, n)
    sw = _seed_draws(a.nll.shape[0], samples, rng)  # (B, S)
    per_seed = perplexity(a.nll.sum(1), a.tokens.sum())  # (S,)
    boot = perplexity(w @ a.nll.T, (w @ a.tokens)[:, None])  # (B, S)
    boot = (boot * sw).sum(1) / sw.sum(1)
    return {"mean": float(per_seed.mean()), "ci": interval(boot, level), "per_seed": per_seed.tolist()}


def paired_pct_change(summed: Scores, merged: Scores, samples: int, level: float, seed: int) -> dict:
    """%Δ perplexity of `summed` vs `merged`: per seed, mean, and paired bootstrap CI."""
    if summed.nll.shape != merged.nll.shape:
        raise ValueError(f"paired scores differ in shape: {summed.nll.shape} vs {merged.nll.shape}")
    rng = np.random.default_rng(seed)
    w = resample_weights(summed.strata, samples, rng)  # (B, n)
    sw = _seed_draws(summed.nll.shape[0], samples, rng)  # (B, S)
    tok = summed.tokens.sum()
    per_seed = pct_change(perplexity(summed.nll.sum(1), tok), perplexity(merged.nll.sum(1), tok))  # (S,)
    btok = (w @ summed.tokens)[:, None]  # (B, 1)
    boot = pct_change(perplexity(w @ summed.nll.T, btok), perplexity(w @ merged.nll.T, btok))  # (B, S)
    boot = (boot * sw).sum(1) / sw.sum(1)
    return {"mean": float(per_seed.mean()), "ci": interval(boot, level), "per_seed": per_seed.tolist()}


def linear_fit(x: list[float], y: list[float], level: float = 0.95) -> dict:
    """Least squares y = slope·x + intercept with r² and a t-interval for the slope (needs >= 3 points)."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    n = len(xa)
    out: dict = {"n": n, "slope": None, "intercept": None, "r2": None, "slope_ci": None}
    if n < 2 or np.ptp(xa) == 0:
        return out
    xm, ym = xa.mean(), ya.mean()
    sxx = float(((xa - xm) ** 2).sum())
    slope = float(((xa - xm) * (ya - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = ya - (slope * xa + intercept)
    sst = float(((ya - ym) ** 2).sum())
    out.update(slope=slope, intercept=intercept, r2=1.0 - float((resid ** 2).sum()) / sst if sst > 0 else 1.0)
    if n >= 3:
        se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / sxx)
        t = float(st.t.ppf((1 + level) / 2, n - 2))
        out["slope_ci"] = [slope - t * se, slope + t * se]
        out["slope_se"] = se
    return out


def fit_band(fit: dict, xs: np.ndarray, x: list[float], level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise confidence band of the fitted mean line at `xs` (for the RMS vs %Δ figure)."""
    xa = np.asarray(x, float)
    n = len(xa)
    yhat = fit["slope"] * xs + fit["intercept"]
    if n < 3 or fit.get("slope_se") is None:
        return yhat, yhat
    sxx = float(((xa - xa.mean()) ** 2).sum())
    s = fit["slope_se"] * math.sqrt(sxx)  # residual standard error
    t = float(st.t.ppf((1 + level) / 2, n - 2))
    half = t * s * np.sqrt(1 / n + (xs - xa.mean()) ** 2 / sxx)
    return yhat - half, yhat + half
