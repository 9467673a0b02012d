"""The order of a report's rows, derived from the config and the model kinds, never from a dict's key order.

results.json is written with sorted keys, so after a reload its mappings come back alphabetical; the renderer
orders models, pairs and per-domain entries with these functions so that the report rendered during the run and
`lorasum report RUN_DIR` give the same bytes.
"""

from __future__ import annotations

import itertools

_KIND_RANK = {"base": 0, "adapter": 1, "sum": 2, "mean": 3, "level2_plus_one": 4, "unlearn": 5}


def domain_index(results: dict) -> dict[str, int]:
    return {d: i for i, d in enumerate(results["config"]["domains"])}


def model_order(results: dict, names=None) -> list[str]:
    """Model names in the grid's order: base; trained blocks by level, then subset (config order of domains);
    per subset its sum, mean and level-2 + fundamental models; unlearning models by removed domain.
    Names outside the catalog go last, alphabetically."""
    idx = domain_index(results)
    n = len(idx)
    models = results.get("models", {})
    names = list(results["perplexity"] if names is None else names)

    def key(name: str):
        m = models.get(name)
        if m is None or m.get("kind") not in _KIND_RANK:
            return (9, 0, (), 0, 0, name)
        kind = m["kind"]
        sub = tuple(idx.get(d, n) for d in m.get("subset", []))
        if kind in ("base", "adapter"):
            return (_KIND_RANK[kind], len(sub), sub, 0, 0, name)
        if kind == "unlearn":
            return (5, 0, (), 0, idx.get(m.get("removed"), n), name)
        last = m["terms"][-1][0] if m.get("terms") else ""
        return (2, len(sub), sub, _KIND_RANK[kind], idx.get(last, n), name)

    return sorted(names, key=key)


def find_model(results: dict, kind: str, subset) -> str | None:
    """The name of the model of `kind` judged on `subset` (in the config's order of domains), from results.json's
    model catalog; None if the run has none."""
    want = list(subset)
    return next((n for n, m in results.get("models", {}).items() if m.get("kind") == kind and m.get("subset") == want
                 and "removed" not in m), None)


def pair_order(results: dict, keys=None) -> list[str]:
    """`a|b` keys of fundamental pairs in the order of itertools.combinations over the config's domains."""
    keys = list(results["pairs"] if keys is None else keys)
    doms = results["config"]["domains"]
    want = [f"{x}|{y}" for x, y in itertools.combinations(doms, 2)]
    return [k for k in want if k in keys] + sorted(k for k in keys if k not in want)


def by_domain(results: dict, keys) -> list[str]:
    """Domain-keyed entries (e.g. level2_plus_one, block_vs_rest) in the config's order of domains."""
    idx = domain_index(results)
    return sorted(keys, key=lambda d: (idx.get(d, len(idx)), d))


def partition_order(results: dict, keys) -> list[str]:
    """Partitions (`a+b`) as the grid trains them: by level, then the config's order of domains."""
    idx = domain_index(results)

    def key(part: str):
        sub = tuple(idx.get(d, len(idx)) for d in part.split("+"))
        return (len(sub), sub, part)

    return sorted(keys, key=key)
