"""Statistics (paired bootstrap, least-squares fit) against hand-worked numbers and scipy; findings rules."""

import math

import numpy as np
import pytest
from scipy import stats as st

from lorasum.study.findings import findings, rms_verdict, summed_verdict, unlearning_verdict
from lorasum.stats import Scores, bootstrap_ppl, linear_fit, paired_pct_change, resample_weights


def _scores(nll, tokens, strata=None):
    nll = np.atleast_2d(np.asarray(nll, float))
    tokens = np.asarray(tokens, float)
    return Scores(nll, tokens, np.zeros(len(tokens), int) if strata is None else np.asarray(strata))


def test_bootstrap_ppl_point_estimate_is_token_weighted():
    s = _scores([2.0, 6.0, 1.0], [2, 3, 1])
    r = bootstrap_ppl(s, 500, 0.95, 0)
    assert r["mean"] == pytest.approx(math.exp(9.0 / 6.0))
    assert r["ci"][0] <= r["mean"] <= r["ci"][1]


def test_paired_pct_change_is_exact_for_a_constant_per_token_shift():
    """summed NLL = merged NLL + c per token: every resample has ppl ratio exp(c), so the CI collapses to it."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 60, size=40).astype(float)
    merged = rng.uniform(1, 3, size=40) * tokens
    c = 0.05
    r = paired_pct_change(_scores(merged + c * tokens, tokens), _scores(merged, tokens), 300, 0.95, 0)
    want = (math.exp(c) - 1) * 100
    assert r["mean"] == pytest.approx(want)
    assert r["ci"][0] == pytest.approx(want) and r["ci"][1] == pytest.approx(want)


def test_paired_interval_is_narrower_than_unpaired_spread():
    """Pairing removes the example-to-example spread that both models share."""
    rng = np.random.default_rng(2)
    tokens = np.full(200, 30.0)
    hardness = rng.uniform(1, 4, size=200) * tokens
    a = hardness + rng.normal(0, 0.5, 200)
    b = hardness + rng.normal(0, 0.5, 200) + 0.02 * tokens
    r = paired_pct_change(_scores(b, tokens), _scores(a, tokens), 1000, 0.95, 0)
    pa, pb = bootstrap_ppl(_scores(a, tokens), 1000, 0.95, 0), bootstrap_ppl(_scores(b, tokens), 1000, 0.95, 0)
    unpaired_width = ((pb["ci"][1] - pb["ci"][0]) + (pa["ci"][1] - pa["ci"][0])) / pa["mean"] * 100
    assert r["ci"][1] - r["ci"][0] < unpaired_width / 3
    assert r["ci"][0] > 0  # b is worse on every example


def test_seeds_are_averaged_and_resampled():
    tokens = np.full(20, 10.0)
    merged = np.vstack([np.full(20, 20.0), np.full(20, 20.0)])
    summed = np.vstack([np.full(20, 21.0), np.full(20, 23.0)])  # +0.1 and +0.3 nats/token
    r = paired_pct_change(_scores(summed, tokens), _scores(merged, tokens), 400, 0.95, 0)
    per_seed = [(math.exp(0.1) - 1) * 100, (math.exp(0.3) - 1) * 100]
    assert r["per_seed"] == pytest.approx(per_seed)
    assert r["mean"] == pytest.approx(np.mean(per_seed))
    assert r["ci"][0] == pytest.approx(per_seed[0]) and r["ci"][1] == pytest.approx(per_seed[1])


def test_resampling_is_stratified_by_domain():
    strata = np.array([0] * 5 + [1] * 3)
    w = resample_weights(strata, 50, np.random.default_rng(0))
    assert np.all(w[:, :5].sum(1) == 5) and np.all(w[:, 5:].sum(1) == 3)


def test_linear_fit_matches_scipy_linregress():
    x = [0.05, 0.06, 0.07, 0.09, 0.11]
    y = [-9.0, 4.5, 27.0, 30.0, 60.0]
    fit = linear_fit(x, y, 0.95)
    ref = st.linregress(x, y)
    assert fit["slope"] == pytest.approx(ref.slope) and fit["intercept"] == pytest.approx(ref.intercept)
    assert fit["r2"] == pytest.approx(ref.rvalue ** 2)
    t = st.t.ppf(0.975, len(x) - 2)
    assert fit["slope_ci"] == pytest.approx([ref.slope - t * ref.stderr, ref.slope + t * ref.stderr])


def test_linear_fit_reproduces_the_papers_line_from_its_three_points():
    fit = linear_fit([0.0514, 0.0583, 0.0708], [-9.10, 4.54, 27.56])
    assert fit["slope"] == pytest.approx(1883.89, rel=2e-3) and fit["intercept"] == pytest.approx(-105.68, rel=2e-3)


def test_linear_fit_with_too_few_points_has_no_interval():
    assert linear_fit([0.1], [1.0])["slope"] is None
    assert linear_fit([0.1, 0.2], [1.0, 2.0])["slope_ci"] is None


@pytest.mark.parametrize("ci,verdict", [((-9.9, 9.9), "summed ≈ merged"), ((-5, 10.5), "inconclusive"),
                                        ((10.1, 30), "summed worse than merged"),
                                        ((-40, -12), "summed better than merged"), ((-12, 3), "inconclusive")])
def test_summed_verdict(ci, verdict):
    assert summed_verdict(ci) == verdict


def test_rms_verdict_follows_the_relation_test_and_refuses_small_samples():
    assert rms_verdict({"relation": {"decidable": True, "verdict": "positive relation"}}) == "positive relation"
    assert rms_verdict({"relation": {"decidable": True, "verdict": "no detectable relation"}}) == \
        "no detectable relation"
    # a slope CI that excludes 0 on 3 pairs decides nothing: the relation needs >= 8 pairs
    assert rms_verdict({"slope_ci": [10, 3000], "relation": {"decidable": False, "n": 3}}) == "inconclusive"
    assert rms_verdict({"slope_ci": None}) == "inconclusive"


def test_unlearning_verdict():
    assert unlearning_verdict(10.0, (9.5, 10.5)) == "restores"
    assert unlearning_verdict(11.0, (9.5, 10.5)) == "does not restore"


def _synthetic(pct_ci, slope_ci, after):
    pc = {"mean": sum(pct_ci) / 2, "ci": list(pct_ci), "per_seed": [sum(pct_ci) / 2]}
    ppl = lambda m, lo, hi: {"mean": m, "ci": [lo, hi]}  # noqa: E731
    decided = slope_ci[0] > 0
    relation = {"decidable": True, "n": 10, "verdict": "positive relation" if decided else "no detectable relation",
                "spearman": {"rho": 0.8 if decided else 0.1, "p": 0.001 if decided else 0.6, "n_domains": 5},
                "ols": {"slope": 100.0, "ci": list(slope_ci)}}
    return {
        "compositions": [{"subset": ["a", "b"], "pct_change": pc}],
        "fit": {"n": 10, "slope": 100.0, "intercept": 0.0, "r2": 0.5, "slope_ci": list(slope_ci),
                "relation": relation},
        "unlearning": [{"removed": "a", "removed_domain": {"after": ppl(after, after, after),
                                                          "without": ppl(20.0, 19.0, 21.0)}}],
    }


def test_findings_flip_each_verdict_on_synthetic_results():
    good = {f["claim"]: f["verdict"] for f in findings(_synthetic((-4, 6), (50, 150), 20.5))}
    bad = {f["claim"]: f["verdict"] for f in findings(_synthetic((-4, 16), (-50, 150), 25.0))}
    assert good == {"summed vs merged": "summed ≈ merged", "RMS similarity predicts %Δ perplexity":
                    "positive relation", "unlearning by subtraction (λ = 1)": "restores"}
    assert bad == {"summed vs merged": "inconclusive", "RMS similarity predicts %Δ perplexity":
                   "no detectable relation", "unlearning by subtraction (λ = 1)": "does not restore"}


def test_recipe_check_verdict_flips():
    ok = {"recipe_check": {"max_ppl_ratio": 0.8, "passed": True, "domains": {"a": {"ratio": 0.5}}}}
    bad = {"recipe_check": {"max_ppl_ratio": 0.8, "passed": False, "domains": {"a": {"ratio": 0.9}}}}
    assert findings(ok)[0]["verdict"] == "passed"
    assert findings(bad)[0]["verdict"].startswith("FAILED")
    assert not any(f["claim"].startswith("recipe") for f in findings({"recipe_check": {"passed": None}}))


def test_rms_fit_has_one_point_per_pair_not_per_seed():
    """Seeds of a pair are not independent draws: the fit uses per-pair means (n = pairs), the slope CI follows
    from those means, and the per-seed points are kept apart for the scatter."""
    from lorasum.study.units.fit import fit as _fit

    rms = {"a|b": [0.050, 0.052, 0.054], "a|c": [0.060, 0.061, 0.059], "b|c": [0.070, 0.072, 0.071],
           "b|d": [0.080, 0.079, 0.083]}
    pct = {"a|b": [-9.0, -7.0, -8.0], "a|c": [5.0, 3.0, 4.0], "b|c": [27.0, 30.0, 24.0], "b|d": [30.0, 35.0, 28.0]}
    comps = [{"level": 2, "subset": k.split("|"), "rms_per_seed": v,
              "pct_change": {"mean": float(np.mean(pct[k])), "per_seed": pct[k]}} for k, v in rms.items()]
    comps.append({"level": 3, "subset": ["a", "b", "c"], "rms_per_seed": [0.1] * 3,
                  "pct_change": {"mean": 50.0, "per_seed": [50.0] * 3}})  # triples are not fit points
    fit = _fit(comps, 0.95)
    means_x, means_y = [np.mean(v) for v in rms.values()], [np.mean(v) for v in pct.values()]
    ref = linear_fit(means_x, means_y, 0.95)
    assert fit["n"] == 4 and fit["pairs"] == list(rms) and len(fit["points_per_seed"]) == 12
    assert fit["slope"] == pytest.approx(ref["slope"]) and fit["slope_ci"] == pytest.approx(ref["slope_ci"])
    naive = linear_fit([x for v in rms.values() for x in v], [y for v in pct.values() for y in v], 0.95)
    assert naive["slope_ci"][1] - naive["slope_ci"][0] < fit["slope_ci"][1] - fit["slope_ci"][0]


def _ci(lo: float, hi: float) -> dict:
    return {"mean": (lo + hi) / 2, "ci": [lo, hi], "per_seed": [(lo + hi) / 2]}


@pytest.mark.parametrize("ci, starts", [((1.0, 3.0), "even the oracle router is worse"),
                                        ((-1.0, 3.0), "the oracle router reaches"),
                                        ((-3.0, -1.0), "the oracle router beats")])
def test_oracle_verdict_follows_the_ci_of_its_change_vs_merged(ci, starts):
    from lorasum.study.findings import oracle_verdict
    assert oracle_verdict(ci).startswith(starts)


def test_cost_verdict_places_interference_only_where_the_cis_decide():
    from lorasum.study.findings import cost_verdict

    def cost(vs_oracle, a, b):
        return {"vs_oracle": _ci(*vs_oracle), "domains": {"a": {"vs_own": _ci(*a)}, "b": {"vs_own": _ci(*b)}}}

    assert cost_verdict(cost((-1, 2), (1, 2), (1, 2))).startswith("no interference detected")
    assert cost_verdict(cost((-3, -1), (1, 2), (1, 2))).startswith("no interference: better than the oracle")
    assert cost_verdict(cost((1, 2), (1, 2), (-1, 2))) == "interference on a"
    assert cost_verdict(cost((1, 2), (-1, 2), (0.5, 2))) == "interference on b"
    assert cost_verdict(cost((1, 2), (1, 2), (0.5, 2))) == "interference spread over a, b"
    assert cost_verdict(cost((1, 2), (-1, 2), (-1, 2))) == "interference, on no single domain decidably"
