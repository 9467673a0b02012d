"""Ranking predictors of the summing cost: Holm by hand, leave-one-domain-out fits by hand and against numpy's
polyfit, the verdict rule (a perfect line predicts, noise does not, under 8 pairs no verdict), the forecast
interval, and one-line refusals of bad input."""

import itertools
import math

import numpy as np
import pytest

from lorasum.errors import LorasumError
from lorasum.forecast import (fit_forecast, forecast, holm, lodo_errors, lodo_predictions, lodo_summary,
                              rank_predictors, verdict)

# Four domains, six pairs (hand example): x and y per pair.
HAND = {("A", "B"): (1, 2), ("A", "C"): (2, 4), ("A", "D"): (3, 5), ("B", "C"): (4, 9), ("B", "D"): (5, 10),
        ("C", "D"): (6, 11)}


def _hand():
    pairs = list(HAND)
    return pairs, [HAND[p][0] for p in pairs], [HAND[p][1] for p in pairs]


def _line(domains=5, slope=3.0, intercept=2.0, seed=0):
    pairs = list(itertools.combinations([f"d{i}" for i in range(domains)], 2))
    x = np.random.default_rng(seed).permutation(len(pairs)).astype(float) / 10  # distinct values
    return pairs, x, slope * x + intercept


# --- Holm --------------------------------------------------------------------------------------------------------

def test_holm_by_hand():
    # sorted: a 0.01 → 4·0.01 = 0.04; c 0.03 → 3·0.03 = 0.09; b 0.04 → 2·0.04 = 0.08, raised to 0.09 (monotone);
    # d 0.2 → 1·0.2 = 0.2
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.2})
    assert got == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.2})
    # capped at 1: 2·0.6 = 1.2 → 1, then 0.7 → max(1, 0.7) = 1
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}
    # a NaN p counts in m (3), sorts last and stays NaN: 3·0.01, 2·0.02
    got = holm({"u": 0.01, "v": math.nan, "w": 0.02})
    assert got["u"] == pytest.approx(0.03) and got["w"] == pytest.approx(0.04) and math.isnan(got["v"])
    assert holm({}) == {}
    with pytest.raises(LorasumError, match="between 0 and 1"):
        holm({"a": 1.5})


# --- leave one domain out ----------------------------------------------------------------------------------------

def test_lodo_by_hand():
    pairs, x, y = _hand()
    rows = lodo_predictions(pairs, x, y)["rows"]
    by = {(r["domain"], r["pair"]): r for r in rows}
    assert len(rows) == 12  # every pair held out twice, once per member domain
    # fold A trains on BC, BD, CD: (4, 9), (5, 10), (6, 11) lie on y = x + 5; mean y = 10
    for pair, want in ((("A", "B"), 6), (("A", "C"), 7), (("A", "D"), 8)):
        assert by["A", pair]["predicted"] == pytest.approx(want)
        assert by["A", pair]["baseline"] == pytest.approx(10)
    # fold B trains on AC, AD, CD: (2, 4), (3, 5), (6, 11); x̄ = 11/3, ȳ = 20/3, Sxy = 141/9, Sxx = 78/9:
    # slope 47/26, intercept 20/3 − 47/26·11/3 = 1/26
    for pair, xv in ((("A", "B"), 1), (("B", "C"), 4), (("B", "D"), 5)):
        assert by["B", pair]["predicted"] == pytest.approx(47 / 26 * xv + 1 / 26)
        assert by["B", pair]["baseline"] == pytest.approx(20 / 3)
    # folds C and D against numpy's least squares
    for d in ("C", "D"):
        train = [p for p in pairs if d not in p]
        slope, icpt = np.polyfit([HAND[p][0] for p in train], [HAND[p][1] for p in train], 1)
        for p in pairs:
            if d in p:
                assert by[d, p]["predicted"] == pytest.approx(slope * HAND[p][0] + icpt)
    errs = lodo_errors(pairs, x, y)
    assert errs == pytest.approx([abs(r["y"] - r["predicted"]) for r in rows])
    assert errs[:3] == pytest.approx([4, 3, 3])  # fold A: |2 − 6|, |4 − 7|, |5 − 8|
    s = lodo_summary(pairs, x, y)
    assert s["mae"] == pytest.approx(np.mean(errs))
    assert s["baseline_mae"] == pytest.approx(np.mean([abs(r["y"] - r["baseline"]) for r in rows]))
    assert s["n_predictions"] == 12 and s["n_domains"] == 4 and s["skipped"] == []


def test_lodo_skips_folds_too_small_to_fit():
    # three domains: each fold has one training pair, too few for a line
    s = lodo_summary([("a", "b"), ("a", "c"), ("b", "c")], [1, 2, 3], [1, 2, 4])
    assert s["skipped"] == ["a", "b", "c"] and s["n_predictions"] == 0 and math.isnan(s["mae"])
    assert not s["beats_baseline"]


# --- ranking and the verdict rule --------------------------------------------------------------------------------

def test_perfect_line_predicts_and_noise_does_not():
    pairs, x, y = _line(domains=5)  # 10 pairs
    noise = np.random.default_rng(7).normal(size=len(pairs))
    rows = rank_predictors(pairs, {"noise": noise, "perfect": x}, y, seed=0)
    assert [r["name"] for r in rows] == ["perfect", "noise"]  # best first
    best, worst = rows
    assert best["rho"] == pytest.approx(1.0) and best["test"] == "mantel" and best["tested"] == 2
    assert best["p_holm"] == pytest.approx(min(1.0, 2 * best["p"])) and best["p_holm"] < 0.05
    assert best["lodo_mae"] == pytest.approx(0, abs=1e-9) and best["baseline_mae"] > 0
    assert best["verdict"] == "predicts"
    assert worst["verdict"] == "no evidence" and worst["p_holm"] >= 0.05


def test_too_few_pairs_gives_no_verdict():
    pairs, x, y = _hand()  # 6 pairs
    (row,) = rank_predictors(pairs, {"x": x}, y)
    assert row["verdict"] == "too few pairs (n<8)"
    assert math.isnan(row["p"]) and math.isnan(row["p_holm"]) and row["tested"] == 0
    assert row["rho"] == pytest.approx(1.0)  # described, never tested


def test_verdict_rule():
    beats, loses = {"beats_baseline": True}, {"beats_baseline": False}
    assert verdict(10, 0.01, beats, 8, 0.05) == "predicts"
    assert verdict(10, 0.01, loses, 8, 0.05) == "ranks only"
    assert verdict(10, 0.2, beats, 8, 0.05) == "no evidence"
    assert verdict(10, math.nan, beats, 8, 0.05) == "no evidence"
    assert verdict(7, 0.0001, beats, 8, 0.05) == "too few pairs (n<8)"


def test_groups_and_constant_predictor():
    pairs, x, y = _line(domains=5)
    groups = {p: ("within" if p[0] == "d0" else "across") for p in pairs}
    rows = rank_predictors(pairs, {"x": x, "flat": np.ones(len(pairs))}, y, groups=groups)
    by = {r["name"]: r for r in rows}
    assert by["x"]["groups"]["within"]["n"] == 4 and by["x"]["groups"]["across"]["n"] == 6
    assert by["x"]["groups"]["within"]["rho"] == pytest.approx(1.0)
    assert math.isnan(by["flat"]["rho"]) and by["flat"]["verdict"] == "no evidence"
    with pytest.raises(LorasumError, match="has no group"):
        rank_predictors(pairs, {"x": x}, y, groups={pairs[0]: "within"})


# --- the forecast ------------------------------------------------------------------------------------------------

def test_forecast_of_a_line_and_its_interval():
    pairs, x, y = _line(domains=5)
    fit = fit_forecast(pairs, x, y)
    assert fit["slope"] == pytest.approx(3.0) and fit["intercept"] == pytest.approx(2.0)
    assert forecast(fit, 10.0) == pytest.approx((32.0, 32.0, 32.0), abs=1e-9)
    pairs, x, y = _hand()
    fit = fit_forecast(pairs, x, y, level=0.5)
    slope, icpt = np.polyfit(x, y, 1)
    resid = [r["y"] - r["predicted"] for r in lodo_predictions(pairs, x, y)["rows"]]
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(icpt)
    assert (fit["q_lo"], fit["q_hi"]) == pytest.approx(tuple(np.quantile(resid, [0.25, 0.75])))
    pct, lo, hi = forecast(fit, 3.5)
    assert pct == pytest.approx(slope * 3.5 + icpt)
    assert (lo, hi) == pytest.approx((pct + fit["q_lo"], pct + fit["q_hi"]))


# --- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: rank_predictors([("a", "b"), ("a", "c")], {"x": [1.0]}, [1.0, 2.0]),
    lambda: rank_predictors([("a", "b"), ("a", "c")], {"x": [1.0, math.nan]}, [1.0, 2.0]),
    lambda: rank_predictors([("a", "b"), ("a", "c")], {"x": [1.0, 2.0]}, [1.0, math.inf]),
    lambda: rank_predictors([("a", "b"), ("b", "a")], {"x": [1.0, 2.0]}, [1.0, 2.0]),
    lambda: rank_predictors([("a", "b")], {}, [1.0]),
    lambda: lodo_errors([("a", "b"), ("a", "c")], [1.0, 2.0, 3.0], [1.0, 2.0]),
    lambda: lodo_summary([("a", "b")], ["fast"], [1.0]),
    lambda: fit_forecast([("a", "b"), ("a", "c")], [1.0, math.nan], [1.0, 2.0]),
    lambda: fit_forecast([("a", "b"), ("a", "c"), ("b", "c")], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),
    lambda: forecast({"slope": 1.0}, 2.0),
    lambda: forecast({"slope": 1.0, "intercept": 0.0, "q_lo": 0.0, "q_hi": 0.0}, math.nan),
])
def test_bad_input_is_one_line(call):
    with pytest.raises(LorasumError) as e:
        call()
    assert "\n" not in str(e.value) and str(e.value)
