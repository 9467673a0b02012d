"""RMS → %Δ relation over domain pairs: Spearman vs scipy, the Mantel test vs a brute-force enumeration, the
domain bootstrap vs numpy weighted least squares, and the report verdicts (incl. a between-cluster fake slope)."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as st

from lorasum.errors import LorasumError
from lorasum.relation import (domain_bootstrap_slope, mantel_test, pair_permutation_test, pair_weights, relation,
                              resample_slope, spearman, verdict)


def _all_pairs(domains):
    return list(itertools.combinations(domains, 2))


def _brute_mantel(pairs, x, y):
    """Two-sided p over every relabelling, written from the definition: ρ recomputed with scipy each time."""
    domains = sorted({d for p in pairs for d in p})
    y_at = {frozenset(p): v for p, v in zip(pairs, y)}
    rho = st.spearmanr(x, y).statistic
    hits = total = 0
    for perm in itertools.permutations(domains):
        pi = dict(zip(domains, perm))
        y_star = [y_at[frozenset((pi[a], pi[b]))] for a, b in pairs]
        hits += abs(st.spearmanr(x, y_star).statistic) >= abs(rho) - 1e-12
        total += 1
    return rho, hits / total, total


# --- spearman ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, size=30).astype(float)  # many ties
    y = np.round(x + rng.normal(0, 2, size=30))
    assert spearman(x, y) == pytest.approx(st.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(30)))


# --- Mantel test -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_mantel_on_four_domains_matches_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    pairs = _all_pairs("abcd")
    x, y = rng.normal(size=6), rng.normal(size=6)
    shuffled = [(b, a) if i % 2 else (a, b) for i, (a, b) in enumerate(pairs)]  # either order names a pair
    r = mantel_test(shuffled, x, y)
    rho, p, total = _brute_mantel(pairs, x, y)
    assert r["permutations"] == total == 24 and r["exact"] is True
    assert r["n_pairs"] == 6 and r["n_domains"] == 4
    assert r["rho"] == pytest.approx(rho, abs=1e-12)
    assert r["p"] == pytest.approx(p, abs=1e-12)


def test_mantel_structure_invariant_construction_vs_monotone_one():
    """4 domains: the 6 pairs fall into 3 perfect matchings ({ab, cd}, {ac, bd}, {ad, bc}) that relabelling only
    shuffles. x and y both a function of the matching give ρ = 1, yet 4 relabellings keep every matching (ρ* = 1)
    and 4 reverse the order (ρ* = -1): p = 8/24, nothing to see. y a strictly monotone function of distinct x
    also gives ρ = 1, but only the identity reproduces it: p = 1/24."""
    pairs = _all_pairs("abcd")
    matching = {("a", "b"): 0, ("c", "d"): 0, ("a", "c"): 1, ("b", "d"): 1, ("a", "d"): 2, ("b", "c"): 2}
    x = np.array([matching[p] for p in pairs], float)
    y = 10.0 * x + 1.0
    r = mantel_test(pairs, x, y)
    assert r["rho"] == pytest.approx(1.0)
    assert r["p"] == pytest.approx(8 / 24) == _brute_mantel(pairs, x, y)[1]

    x = np.array([0.3, 0.1, 0.7, 0.2, 0.9, 0.5])
    y = x ** 3 + 2.0
    r = mantel_test(pairs, x, y)
    assert r["rho"] == pytest.approx(1.0)
    assert r["p"] == pytest.approx(1 / 24) == _brute_mantel(pairs, x, y)[1]


def test_mantel_random_relabellings_beyond_max_exact():
    rng = np.random.default_rng(3)
    pairs = _all_pairs("abcde")
    x, y = rng.normal(size=10), rng.normal(size=10)
    exact = mantel_test(pairs, x, y)
    mc = mantel_test(pairs, x, y, max_exact=100, samples=3000, seed=1)  # 5! = 120 > 100
    assert mc["exact"] is False and mc["permutations"] == 3000 and exact["permutations"] == 120
    assert mc["rho"] == exact["rho"]
    assert mc["p"] == pytest.approx(exact["p"], abs=0.03)
    assert mc["p"] >= 1 / 3001
    assert mc == mantel_test(pairs, x, y, max_exact=100, samples=3000, seed=1)  # seeded


def test_mantel_rejects_a_pair_set_not_closed_under_relabelling():
    pairs = _all_pairs("abcd")
    pairs.remove(("b", "d"))
    with pytest.raises(LorasumError, match=r"\('b', 'd'\)"):
        mantel_test(pairs, np.arange(5.0), np.arange(5.0))
    with pytest.raises(LorasumError, match="twice"):
        mantel_test([("a", "b"), ("b", "a"), ("a", "c")], [1, 2, 3], [1, 2, 3])


def _eight_domains(rng):
    pairs = _all_pairs([f"d{i}" for i in range(8)])
    return pairs, rng.uniform(0.0, 1.0, size=len(pairs))


def test_eight_domains_strong_relation_is_detected():
    pairs, x = _eight_domains(np.random.default_rng(0))
    y = 3.0 * x + np.random.default_rng(1).normal(0, 0.1, size=len(x))
    r = relation(pairs, x, y, bootstrap_samples=400)
    assert r["spearman"]["exact"] and r["spearman"]["permutations"] == 40320
    assert r["spearman"]["p"] < 0.001
    assert r["ols"]["ci"][0] > 0
    assert r["verdict"] == "positive relation"
    assert relation(pairs, x, -y, bootstrap_samples=400)["verdict"] == "negative relation"


def test_eight_domains_independent_y_is_mostly_no_relation():
    none = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        pairs, x = _eight_domains(rng)
        y = rng.normal(size=len(x))
        none += relation(pairs, x, y, bootstrap_samples=200, seed=seed)["verdict"] == "no detectable relation"
    assert none >= 17


# --- domain bootstrap --------------------------------------------------------------------------------------------

def test_bootstrap_point_slope_equals_polyfit_and_is_seeded():
    pairs, x = _eight_domains(np.random.default_rng(4))
    y = 1.5 * x - 2 + np.random.default_rng(5).normal(0, 0.3, size=len(x))
    r = domain_bootstrap_slope(pairs, x, y, samples=300, seed=7)
    slope, intercept = np.polyfit(x, y, 1)
    assert r["slope"] == pytest.approx(slope, abs=1e-10) and r["intercept"] == pytest.approx(intercept, abs=1e-10)
    assert set(r) == {"slope", "intercept", "ci", "level", "samples", "skipped", "n_pairs", "n_domains"}
    assert (r["n_pairs"], r["n_domains"], r["samples"], r["level"]) == (28, 8, 300, 0.95)
    assert r == domain_bootstrap_slope(pairs, x, y, samples=300, seed=7)
    assert r["ci"] != domain_bootstrap_slope(pairs, x, y, samples=300, seed=8)["ci"]


def test_resample_weights_are_products_of_domain_multiplicities():
    domains = ["a", "b", "c", "d", "e"]
    pairs = _all_pairs(domains)
    ab = np.array([[domains.index(a), domains.index(b)] for a, b in pairs])
    m = np.array([2, 0, 1, 3, 1])  # b left out, d drawn three times
    expect = {("a", "c"): 2, ("a", "d"): 6, ("a", "e"): 2, ("c", "d"): 3, ("c", "e"): 1, ("d", "e"): 3}
    w = pair_weights(ab, m)
    assert w.tolist() == [expect.get(p, 0) for p in pairs]

    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=10), rng.normal(size=10)
    # numpy weighted least squares: polyfit weights multiply residuals, so pass sqrt(w)
    ref = np.polyfit(x[w > 0], y[w > 0], 1, w=np.sqrt(w[w > 0]))[0]
    design = np.column_stack([x, np.ones(10)]) * np.sqrt(w)[:, None]
    ref2 = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)[0][0]
    assert resample_slope(ab, m, x, y) == pytest.approx(ref, abs=1e-10) == ref2
    assert resample_slope(ab, np.array([4, 1, 0, 0, 0]), x, y) is None  # one weighted pair
    assert resample_slope(ab, np.array([1, 1, 1, 0, 0]), np.ones(10), y) is None  # no x spread
    sub = ab[[0, 1, 9]]  # pairs (a, b), (a, c), (d, e) of an incomplete set: m below weights exactly two of them
    assert resample_slope(sub, np.array([1, 1, 1, 0, 0]), x[:3], y[:3]) is None
    assert resample_slope(sub, np.array([1, 1, 1, 1, 1]), x[:3], y[:3]) == pytest.approx(np.polyfit(x[:3], y[:3], 1)[0])


def test_bootstrap_skips_draws_with_under_three_pairs_at_the_expected_rate():
    """3 domains, 3 pairs: a draw is usable only when all three domains are drawn, with probability 3!/3³ = 2/9."""
    r = domain_bootstrap_slope(_all_pairs("abc"), [0.1, 0.5, 0.9], [1.0, 2.0, 2.5], samples=3000, seed=0)
    assert r["skipped"] / 3000 == pytest.approx(7 / 9, abs=0.03)
    assert r["ci"][0] == pytest.approx(r["slope"]) and r["ci"][1] == pytest.approx(r["slope"])  # every draw = all


def test_bootstrap_ci_covers_the_true_slope():
    """y = 2x + domain effects + noise over 8 domains: the domain-bootstrap 95% CI covers 2 in most data sets."""
    covered = 0
    for rep in range(10):
        rng = np.random.default_rng(200 + rep)
        pairs, x = _eight_domains(rng)
        u = dict(zip([f"d{i}" for i in range(8)], rng.normal(0, 0.2, size=8)))
        y = 2.0 * x + np.array([u[a] + u[b] for a, b in pairs]) + rng.normal(0, 0.2, size=len(x))
        lo, hi = domain_bootstrap_slope(pairs, x, y, samples=300, seed=rep)["ci"]
        covered += lo <= 2.0 <= hi
    assert covered >= 8


# --- relation ----------------------------------------------------------------------------------------------------

def test_relation_with_too_few_pairs_is_undecidable():
    r = relation(_all_pairs("abc"), [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert r == {"n": 3, "decidable": False,
                 "reason": "too few pairs (n = 3) to test the RMS → %Δ relation; at least 8 needed"}


def test_verdict_needs_both_the_test_and_the_slope_ci_on_the_side_of_rho():
    assert verdict(0.6, 0.01, [0.5, 2.0], 0.05) == "positive relation"
    assert verdict(-0.6, 0.01, [-2.0, -0.5], 0.05) == "negative relation"
    assert verdict(0.6, 0.01, [-0.5, 2.0], 0.05) == "no detectable relation"  # CI holds 0
    assert verdict(0.6, 0.01, [-2.0, -0.5], 0.05) == "no detectable relation"  # slope and ρ disagree
    assert verdict(0.6, 0.05, [0.5, 2.0], 0.05) == "no detectable relation"  # p not below alpha
    assert verdict(math.nan, math.nan, [math.nan, math.nan], 0.05) == "no detectable relation"


def test_a_significant_rho_with_an_outlier_driven_slope_is_not_called_a_relation():
    """y = x except that the top-RMS pair has %Δ = -50: ranks agree (ρ ≈ 0.79, p tiny) but the slope CI holds 0."""
    rng = np.random.default_rng(0)
    pairs, x = _eight_domains(rng)
    y = x.copy()
    y[np.argmax(x)] = -50.0
    r = relation(pairs, x, y, bootstrap_samples=400)
    assert r["spearman"]["rho"] > 0.7 and r["spearman"]["p"] < 0.001
    assert r["ols"]["slope"] < 0 and r["ols"]["ci"][0] < 0 < r["ols"]["ci"][1]
    assert r["verdict"] == "no detectable relation"


def test_relation_shape_and_rule():
    pairs, x = _eight_domains(np.random.default_rng(0))
    r = relation(pairs, x, x ** 2, bootstrap_samples=100)
    assert set(r) == {"n", "decidable", "spearman", "ols", "verdict", "rule"}
    assert set(r["spearman"]) == {"rho", "p", "n_pairs", "n_domains", "permutations", "exact", "test"}
    assert r["n"] == 28 and r["decidable"] is True
    assert r["rule"] == ("Mantel permutation p < 0.05 (two-sided, domain labels permuted) and the domain-bootstrap "
                         "slope 0.95 CI excludes 0; sign from ρ")


def test_groups_reveal_a_slope_made_only_by_cluster_offsets():
    """Two parent domains with 5 sub-domains each. Within-parent pairs sit at high RMS and high %Δ, across pairs
    at low RMS and low %Δ; inside each group y is unrelated to x. Overall: a relation; in every group: none."""
    rng = np.random.default_rng(15)  # a data set whose groups are clearly null (p > 0.25), not by a CI's luck
    med, law = [f"med{i}" for i in range(5)], [f"law{i}" for i in range(5)]
    pairs = _all_pairs(med + law)
    groups = {p: ("within med" if p[0] in med and p[1] in med else
                  "within law" if p[0] in law and p[1] in law else "across") for p in pairs}
    within = np.array([groups[p] != "across" for p in pairs])
    x = np.where(within, 0.5, 0.1) + rng.uniform(-0.05, 0.05, size=len(pairs))
    y = np.where(within, 8.0, 1.0) + rng.normal(0, 1.0, size=len(pairs))
    r = relation(pairs, x, y, groups={(b, a): g for (a, b), g in groups.items()}, permutation_samples=2000,
                 bootstrap_samples=400)
    assert r["spearman"]["exact"] is False  # 10! relabellings: sampled
    assert r["spearman"]["p"] < 0.01 and r["ols"]["ci"][0] > 0
    assert r["verdict"] == "positive relation"
    g = r["groups"]
    assert set(g) == {"within med", "within law", "across"}
    assert (g["within med"]["n"], g["within law"]["n"], g["across"]["n"]) == (10, 10, 25)
    assert g["within med"]["verdict"] == g["within law"]["verdict"] == "no detectable relation"
    assert g["across"]["verdict"] == "no detectable relation"
    assert min(v["spearman"]["p"] for v in g.values()) > 0.1
    assert g["within med"]["spearman"]["test"].startswith("Mantel")
    assert g["within med"]["spearman"]["permutations"] == 120  # exact over the 5 sub-domains
    assert g["across"]["spearman"]["test"].startswith("pair permutation")  # not closed under relabelling
    assert "pair permutation p" in g["across"]["rule"]


def test_pair_permutation_test_matches_brute_force_on_small_sets():
    rng = np.random.default_rng(9)
    pairs = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "x")]
    x, y = rng.normal(size=5), rng.normal(size=5)
    rho = st.spearmanr(x, y).statistic
    p = np.mean([abs(st.spearmanr(x, y[list(q)]).statistic) >= abs(rho) - 1e-12
                 for q in itertools.permutations(range(5))])
    r = pair_permutation_test(pairs, x, y)
    assert r["exact"] and r["permutations"] == 120
    assert r["p"] == pytest.approx(p, abs=1e-12)


def test_groups_must_label_every_pair():
    pairs, x = _eight_domains(np.random.default_rng(0))
    groups = {p: "g" for p in pairs[1:]}
    with pytest.raises(LorasumError, match="no group"):
        relation(pairs, x, x, groups=groups, bootstrap_samples=50)
