"""Does RMS cosine similarity predict the %Δ perplexity of summing two adapters? Tests that respect the pair design.

The points are domain pairs (a, b) with x = RMS and y = %Δ. Pairs that share a domain are not independent, so
ordinary p-values and pair bootstraps overstate the evidence. Here the p-value of Spearman's ρ comes from
permuting *domain labels* (a Mantel test: a relabelling π maps pair (a, b) to (π(a), π(b)), so dependence between
pairs that share a domain is kept), and the slope's interval from a bootstrap that resamples *domains* (a pair
is drawn as often as both its domains together: weight m_a·m_b).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import LorasumError

TIE = 1e-12  # permuted statistics within this of the observed one count as "at least as extreme"
_CELLS = 2_000_000  # elements per block of permuted index rows (bounds memory for large pair sets)

Pair = tuple[str, str]


# --- Spearman ----------------------------------------------------------------------------------------------------

def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata's default)."""
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0  # average rank of each distinct value
    return avg[inv.reshape(-1)]


def _centred_ranks(v: np.ndarray) -> np.ndarray:
    r = ranks(v)
    return r - r.mean()


def _corr(cx: np.ndarray, cy: np.ndarray) -> float:
    """Pearson correlation of already-centred vectors; nan when either is constant (ρ is undefined then)."""
    den = math.sqrt(float(cx @ cx) * float(cy @ cy))
    return float(cx @ cy) / den if den > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of average ranks (nan when x or y is constant)."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise LorasumError(f"spearman needs two equally long 1-d sequences, got shapes {xa.shape} and {ya.shape}")
    if len(xa) < 2:
        return math.nan
    return _corr(_centred_ranks(xa), _centred_ranks(ya))


# --- pairs -------------------------------------------------------------------------------------------------------

def pair_key(pair: Sequence[str]) -> Pair:
    """Pairs are unordered: (a, b) and (b, a) are the same pair."""
    if len(pair) != 2:
        raise LorasumError(f"a pair names two domains, got {tuple(pair)!r}")
    a, b = str(pair[0]), str(pair[1])
    return (a, b) if a <= b else (b, a)


def pair_keys(pairs: Sequence[Sequence[str]]) -> list[Pair]:
    """Each pair's key, refusing a pair given twice (in either order): one value per pair, seeds averaged first."""
    keys = [pair_key(p) for p in pairs]
    seen: set[Pair] = set()
    for k in keys:
        if k in seen:
            raise LorasumError(f"pair {k} appears twice (pairs are unordered); give one value per pair, e.g. the "
                               "mean over seeds")
        seen.add(k)
    return keys


def _prepare(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float]
             ) -> tuple[list[Pair], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Checked pair keys, sorted domains, (n, 2) domain indices of each pair, and x, y as float arrays."""
    xa, ya = np.asarray(x, float).reshape(-1), np.asarray(y, float).reshape(-1)
    if not len(pairs) == len(xa) == len(ya):
        raise LorasumError(f"pairs, x and y differ in length: {len(pairs)}, {len(xa)}, {len(ya)}")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise LorasumError("x and y must be finite numbers (a pair with a missing RMS or %Δ cannot be tested)")
    keys = pair_keys(pairs)
    domains = sorted({d for k in keys for d in k})
    at = {d: i for i, d in enumerate(domains)}
    ab = np.array([[at[a], at[b]] for a, b in keys], dtype=np.int64).reshape(-1, 2)  # (n, 2)
    return keys, domains, ab, xa, ya


def missing_pairs(keys: Sequence[Pair], domains: Sequence[str]) -> list[Pair]:
    """Pairs that relabelling the domains can produce but that are not given (empty when the set is closed).

    Under all relabellings the orbits of unordered pairs are: every pair of two distinct domains, and every
    self-pair (a, a). A closed set is a union of orbits, so it holds all of an orbit as soon as it holds one.
    """
    have = set(keys)
    need: list[Pair] = []
    if any(a != b for a, b in have):
        need += list(itertools.combinations(sorted(domains), 2))
    if any(a == b for a, b in have):
        need += [(d, d) for d in sorted(domains)]
    return [k for k in need if k not in have]


def closed_under_relabelling(pairs: Sequence[Sequence[str]]) -> bool:
    keys = [pair_key(p) for p in pairs]
    return not missing_pairs(keys, sorted({d for k in keys for d in k}))


# --- permutation tests -------------------------------------------------------------------------------------------

def _blocks(items: int, total: int | None, samples: int, rng: np.random.Generator, width: int
            ) -> Iterator[np.ndarray]:
    """Permutations of range(items) in row blocks: all of them in order (total given) or `samples` random ones."""
    rows = max(1, _CELLS // max(width, 1))
    if total is not None:
        it = itertools.permutations(range(items))
        while block := list(itertools.islice(it, rows)):
            yield np.array(block, dtype=np.int64).reshape(len(block), items)
        return
    done = 0
    while done < samples:
        k = min(rows, samples - done)
        yield rng.permuted(np.tile(np.arange(items), (k, 1)), axis=1)  # (k, items)
        done += k


def _permutation_p(cx: np.ndarray, cy: np.ndarray, items: int, index, max_exact: int, samples: int, seed: int
                   ) -> tuple[float, float, int, bool]:
    """ρ and its two-sided permutation p; `index` maps a block of permutations of `items` to (P, n) y indices."""
    if samples < 1:
        raise LorasumError(f"must be at least 1, got {samples}", key="samples")
    rho = _corr(cx, cy)
    total = math.factorial(items)
    exact = total <= max_exact
    if math.isnan(rho):
        return rho, math.nan, total if exact else samples, exact
    den = math.sqrt(float(cx @ cx) * float(cy @ cy))
    rng = np.random.default_rng(seed)
    count = 0
    for perms in _blocks(items, total if exact else None, samples, rng, len(cx)):
        star = cy[index(perms)] @ cx / den  # (P,)
        count += int((np.abs(star) >= abs(rho) - TIE).sum())
    if exact:
        return rho, count / total, total, True
    return rho, (1 + count) / (1 + samples), samples, False


def mantel_test(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float], max_exact: int = 40320,
                samples: int = 10000, seed: int = 0) -> dict:
    """Spearman's ρ of x vs y over domain pairs, with a two-sided p from permuting domain labels.

    A relabelling π sends pair (a, b) to (π(a), π(b)); y is read at the relabelled pair while x stays, so pairs
    that share a domain keep sharing one. Exact over all D! relabellings when D! <= max_exact (the identity
    included, so p >= 1/D!), else `samples` random ones with p = (1 + #{|ρ*| >= |ρ|}) / (1 + samples).
    """
    keys, domains, ab, xa, ya = _prepare(pairs, x, y)
    missing = missing_pairs(keys, domains)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LorasumError(f"the pairs are not closed under relabelling of their {len(domains)} domains: pair "
                           f"{missing[0]} is missing{more}; the Mantel test needs every pair of the domains")
    d = len(domains)
    lookup = np.full((d, d), -1, dtype=np.int64)  # (D, D) pair index of each (unordered) domain pair
    lookup[ab[:, 0], ab[:, 1]] = np.arange(len(keys))
    lookup[ab[:, 1], ab[:, 0]] = np.arange(len(keys))

    def index(perms: np.ndarray) -> np.ndarray:  # (P, D) -> (P, n)
        return lookup[perms[:, ab[:, 0]], perms[:, ab[:, 1]]]

    rho, p, count, exact = _permutation_p(_centred_ranks(xa), _centred_ranks(ya), d, index, max_exact, samples,
                                          seed)
    return {"rho": rho, "p": p, "n_pairs": len(keys), "n_domains": d, "permutations": count, "exact": exact}


def pair_permutation_test(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float],
                          max_exact: int = 40320, samples: int = 10000, seed: int = 0) -> dict:
    """Spearman's ρ with a two-sided p from permuting y over the pairs, as if pairs were independent.

    The fallback for pair sets that relabelling does not map onto themselves (e.g. the pairs across two
    families); pairs sharing a domain are not independent, so this p can be optimistic.
    """
    keys, domains, _, xa, ya = _prepare(pairs, x, y)
    n = len(keys)
    rho, p, count, exact = _permutation_p(_centred_ranks(xa), _centred_ranks(ya), n, lambda perms: perms,
                                          max_exact, samples, seed)
    return {"rho": rho, "p": p, "n_pairs": n, "n_domains": len(domains), "permutations": count, "exact": exact}


# --- domain bootstrap of the slope -------------------------------------------------------------------------------

def pair_weights(ab: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Weight of each pair in a domain resample: m_a·m_b, the times both its domains were drawn (0 if one wasn't).

    ab: (n, 2) domain indices of the pairs; m: (D,) or (B, D) multiplicities; returns (n,) or (B, n).
    """
    m = np.asarray(m, float)
    return m[..., ab[:, 0]] * m[..., ab[:, 1]]


def weighted_slopes(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least-squares slope and intercept of y ~ x for each row of w (B, n), and which rows are usable.

    A row is unusable (nan) with fewer than 3 pairs of positive weight or no spread in x among them.
    """
    w = np.atleast_2d(np.asarray(w, float))  # (B, n)
    sw = w.sum(1)  # (B,)
    ok = ((w > 0).sum(1) >= 3) & (sw > 0)
    safe = np.where(sw > 0, sw, 1.0)
    xm, ym = w @ x / safe, w @ y / safe  # (B,)
    dx = x[None, :] - xm[:, None]  # (B, n)
    sxx = (w * dx ** 2).sum(1)
    sxy = (w * dx * (y[None, :] - ym[:, None])).sum(1)
    ok &= sxx > 1e-12 * (w * x[None, :] ** 2).sum(1) + 1e-300  # no x spread (relative to the scale of x)
    slope = np.where(ok, sxy / np.where(ok, sxx, 1.0), np.nan)
    return slope, np.where(ok, ym - slope * xm, np.nan), ok


def resample_slope(ab: np.ndarray, m: np.ndarray, x: np.ndarray, y: np.ndarray) -> float | None:
    """One bootstrap draw: the weighted OLS slope for domain multiplicities m (D,); None when it is skipped."""
    slope, _, ok = weighted_slopes(np.asarray(x, float), np.asarray(y, float), pair_weights(ab, m)[None, :])
    return float(slope[0]) if ok[0] else None


def domain_bootstrap_slope(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float],
                           samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """OLS slope of y ~ x with a percentile CI from resampling domains (not pairs) with replacement.

    Draws with fewer than 3 weighted pairs or no x spread are skipped and counted; the CI is nan when none is left.
    """
    if not 0 < level < 1:
        raise LorasumError(f"must be between 0 and 1, got {level}", key="level")
    if samples < 1:
        raise LorasumError(f"must be at least 1, got {samples}", key="samples")
    keys, domains, ab, xa, ya = _prepare(pairs, x, y)
    d = len(domains)
    slope, intercept, _ = weighted_slopes(xa, ya, np.ones((1, len(keys))))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, d, size=(samples, d))  # (B, D) domains drawn
    m = np.zeros((samples, d))
    np.add.at(m, (np.arange(samples)[:, None], draws), 1.0)  # (B, D) multiplicities
    rows = max(1, _CELLS // max(len(keys), 1))
    boot = np.concatenate([weighted_slopes(xa, ya, pair_weights(ab, m[i:i + rows]))[0]
                           for i in range(0, samples, rows)])  # (B,)
    good = boot[~np.isnan(boot)]
    lo, hi = np.quantile(good, [(1 - level) / 2, (1 + level) / 2]) if len(good) else (math.nan, math.nan)
    return {"slope": float(slope[0]), "intercept": float(intercept[0]), "ci": [float(lo), float(hi)],
            "level": level, "samples": samples, "skipped": int(samples - len(good)), "n_pairs": len(keys),
            "n_domains": d}


# --- report summary ----------------------------------------------------------------------------------------------

MANTEL = "Mantel (domain labels permuted)"
PAIR_PERM = ("pair permutation (the pairs are not closed under relabelling their domains, so labels cannot be "
             "permuted; pairs sharing a domain are treated as independent and p may be optimistic)")


def verdict(rho: float, p: float, ci: Sequence[float], alpha: float) -> str:
    """Positive/negative only when p < alpha AND the slope CI excludes 0 on the side of ρ's sign."""
    if not p < alpha:  # also false for nan
        return "no detectable relation"
    lo, hi = ci
    if rho > 0 and lo > 0:
        return "positive relation"
    if rho < 0 and hi < 0:
        return "negative relation"
    return "no detectable relation"


def _relation(keys: list[Pair], xa: np.ndarray, ya: np.ndarray, min_pairs: int, level: float, seed: int,
              permutation_samples: int, bootstrap_samples: int, max_exact: int) -> dict:
    n = len(set(keys))
    if n < min_pairs:
        return {"n": n, "decidable": False,
                "reason": f"too few pairs (n = {n}) to test the RMS → %Δ relation; at least {min_pairs} needed"}
    closed = closed_under_relabelling(keys)
    test = mantel_test if closed else pair_permutation_test
    sp = test(keys, xa, ya, max_exact=max_exact, samples=permutation_samples, seed=seed)
    sp["test"] = MANTEL if closed else PAIR_PERM
    ols = domain_bootstrap_slope(keys, xa, ya, samples=bootstrap_samples, level=level, seed=seed)
    alpha = 1 - level
    how = ("Mantel permutation p" if closed else "pair permutation p") + f" < {alpha:.3g} (two-sided, " + (
        "domain labels permuted" if closed else "pairs permuted") + f") and the domain-bootstrap slope " \
        f"{level:.3g} CI excludes 0; sign from ρ"
    return {"n": n, "decidable": True, "spearman": sp, "ols": ols,
            "verdict": verdict(sp["rho"], sp["p"], ols["ci"], alpha), "rule": how}


def relation(pairs: Sequence[Sequence[str]], x: Sequence[float], y: Sequence[float],
             groups: dict[tuple, str] | None = None, min_pairs: int = 8, level: float = 0.95, seed: int = 0,
             permutation_samples: int = 10000, bootstrap_samples: int = 2000, max_exact: int = 40320) -> dict:
    """Report-ready verdict on RMS (x) → %Δ (y) over domain pairs, overall and per group of pairs.

    Mantel p for ρ and a domain-bootstrap CI for the slope must agree before a relation is called. A pair set
    that relabelling does not map onto itself (an incomplete set, or a group such as "across") falls back to a
    plain pair permutation test, named in spearman["test"]. `groups` maps every pair (either order) to a label.
    """
    if not 0 < level < 1:
        raise LorasumError(f"must be between 0 and 1, got {level}", key="level")
    keys = [pair_key(p) for p in pairs]
    xa, ya = np.asarray(x, float).reshape(-1), np.asarray(y, float).reshape(-1)
    if not len(keys) == len(xa) == len(ya):
        raise LorasumError(f"pairs, x and y differ in length: {len(keys)}, {len(xa)}, {len(ya)}")
    opts = dict(min_pairs=min_pairs, level=level, seed=seed, permutation_samples=permutation_samples,
                bootstrap_samples=bootstrap_samples, max_exact=max_exact)
    out = _relation(keys, xa, ya, **opts)
    if groups is None or not out["decidable"]:
        return out
    label = {pair_key(k): g for k, g in groups.items()}
    if stray := sorted(set(label) - set(keys)):
        raise LorasumError(f"groups names pair {stray[0]}, which is not among the pairs")
    if unlabelled := [k for k in keys if k not in label]:
        raise LorasumError(f"pair {unlabelled[0]} has no group (groups must label every pair)")
    out["groups"] = {}
    for g in sorted(set(label.values())):
        sel = np.array([label[k] == g for k in keys])
        out["groups"][g] = _relation([k for k, s in zip(keys, sel) if s], xa[sel], ya[sel], **opts)
    return out
