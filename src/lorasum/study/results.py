"""Assemble results.json from a run's artifacts: the paper's tables, statistics, findings and provenance.

Everything here is recomputed from the cached artifacts (per-example NLL, similarity files), deterministically,
so an interrupted-and-resumed run gives a byte-identical results.json. Wall times live in timings.json.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_json
from ..provenance import provenance
from ..stats import Scores, bootstrap_ppl, linear_fit, paired_pct_change
from .config import ExperimentConfig
from .findings import findings
from .grid import COMPOSITIONS, adapter
from .jobs import artifact_path


def _load(spec: dict) -> dict:
    return json.loads(artifact_path(spec).read_text(encoding="utf-8"))


class _Scores:
    """Per-example NLL of (model, domain, seed) from the eval artifacts, stacked into stats.Scores."""

    def __init__(self, cfg: ExperimentConfig, plan: dict):
        self.cfg, self.plan = cfg, plan
        self._cache: dict = {}

    def raw(self, model: str, domain: str, seed: int, split: str = "test") -> dict:
        key = (model, domain, seed) if split == "test" else (model, domain, seed, split)
        if key not in self._cache:
            self._cache[key] = _load(self.plan["evals"][key])
        return self._cache[key]

    def scores(self, model: str, domains: list[str], split: str = "test") -> Scores:
        nll = np.array([np.concatenate([self.raw(model, d, s, split)["nll"] for d in domains])
                        for s in self.cfg.seeds])
        first = self.cfg.seeds[0]
        tokens = np.concatenate([self.raw(model, d, first, split)["tokens"] for d in domains]).astype(float)
        strata = np.concatenate([np.full(len(self.raw(model, d, first, split)["nll"]), i)
                                 for i, d in enumerate(domains)])
        return Scores(nll, tokens, strata)

    def point_ppl(self, model: str, domains: list[str], split: str = "test") -> float:
        """Pooled perplexity, mean over seeds, without an interval (for choosing, not for reporting)."""
        s = self.scores(model, domains, split)
        return float(np.exp(s.nll.sum(1) / s.tokens.sum()).mean())


def _mean_layers(per_seed: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}


def _rms(values) -> float:
    v = list(values)
    return math.sqrt(sum(x * x for x in v) / len(v)) if v else float("nan")


def assemble(cfg: ExperimentConfig, plan: dict, run_dir: str | Path) -> dict:
    S = _Scores(cfg, plan)
    B, level, bseed = cfg.bootstrap_samples, cfg.ci_level, cfg.bootstrap_seed
    seeds, domains, catalog = cfg.seeds, cfg.domains, plan["models"]

    def ppl(model: str, doms: list[str]) -> dict:
        return bootstrap_ppl(S.scores(model, doms), B, level, bseed)

    def pct(a: str, b: str, doms: list[str]) -> dict:
        return paired_pct_change(S.scores(a, doms), S.scores(b, doms), B, level, bseed)

    def sim(*what) -> dict:
        per_seed = [_load(plan["sims"][(*what, s)]) for s in seeds]
        return {"layers": _mean_layers([p["layers"] for p in per_seed]),
                "rms": float(np.mean([p["rms"] for p in per_seed])), "rms_per_seed": [p["rms"] for p in per_seed],
                "norm_a": _mean_layers([p["norm_a"] for p in per_seed]),
                "norm_b": _mean_layers([p["norm_b"] for p in per_seed])}

    # per-domain perplexity matrix: every model x every domain, plus pooled over all domains
    matrix = {m: {**{d: ppl(m, [d]) for d in domains}, "pooled": ppl(m, domains)} for m in catalog.models}

    pairs = {f"{x}|{y}": sim("pair", (x, y)) for x, y in itertools.combinations(domains, 2)}

    def macro(model: str, doms: list[str]) -> float:
        """Macro mean over the subset's domains of the per-domain perplexities (beside the pooled figure)."""
        return float(np.mean([matrix[model][d]["mean"] for d in doms]))

    def versus_merged(model: str, merged: str, doms: list[str]) -> dict:
        return {"perplexity": ppl(model, doms), "macro": macro(model, doms), "pct_change": pct(model, merged, doms)}

    compositions = []
    for k in range(2, cfg.level + 1):
        for s in itertools.combinations(domains, k):
            doms = list(s)
            merged = adapter(s).name
            pair_sims = [pairs[f"{x}|{y}"] for x, y in itertools.combinations(s, 2)]
            row = {"subset": doms, "level": k, "merged": ppl(merged, doms),
                   "merged_macro": macro(merged, doms),
                   "rms": _rms(c for p in pair_sims for c in p["layers"].values()),
                   "rms_per_seed": [_rms(c for x, y in itertools.combinations(s, 2)
                                         for c in _load(plan["sims"][("pair", (x, y), seed)])["layers"].values())
                                    for seed in seeds]}
            summed = catalog.find("sum", s)
            if summed is not None:
                row["summed"] = ppl(summed.name, doms)
                row["summed_macro"] = macro(summed.name, doms)
                row["pct_change"] = pct(summed.name, merged, doms)
            baselines = {}
            for comp in COMPOSITIONS.values():
                for m in comp.per_subset(s) if comp.baseline else []:
                    if m.name in catalog.models:
                        baselines[comp.name] = versus_merged(m.name, merged, doms)
            if "best_single" in cfg.compositions:
                # chosen on the pooled *validation* perplexity of the subset, then reported on test
                val = {d: S.point_ppl(adapter([d]).name, doms, "validation") for d in s}
                best = min(s, key=lambda d: val[d])
                baselines["best_single"] = {"block": best, "chosen_on": "validation", "validation_perplexity": val,
                                            **versus_merged(adapter([best]).name, merged, doms)}
            row["baselines"] = baselines
            if k >= 3:
                row["block_vs_rest"] = {}
                for d in s:
                    bvr = sim("block_vs_rest", s, d)
                    row["block_vs_rest"][d] = {"rms": bvr["rms"], "layers": bvr["layers"]}
            ws = sim("weight", s)
            row["weight_space"] = {
                "layers": {n: {"cos": c, "norm_ratio": ws["norm_a"][n] / ws["norm_b"][n] if ws["norm_b"][n] else None}
                           for n, c in ws["layers"].items()},
                "mean_cos": float(np.mean(list(ws["layers"].values()))), "rms": ws["rms"],
                "norm_ratio": math.sqrt(sum(v * v for v in ws["norm_a"].values()))
                / math.sqrt(sum(v * v for v in ws["norm_b"].values())),
            }
            l2p1 = [catalog.find("level2_plus_one", s, added=d) for d in s]
            if any(l2p1):
                row["level2_plus_one"] = {}
                for d, m in zip(s, l2p1):
                    t5 = sim("level2_plus_one", s, d)
                    row["level2_plus_one"][d] = {"level2": m.terms[0][0], **versus_merged(m.name, merged, doms),
                                                 "rms": t5["rms"], "layers": t5["layers"]}
            compositions.append(row)

    unlearning = []
    full = adapter(domains).name
    for m in catalog.of("unlearn"):
        d, others = m.removed, list(m.subset)
        without = adapter(others).name
        checks = [_load(plan["checks"][(d, s)]) for s in seeds]
        row = {"removed": d, "others": others, "without_model": without,
               "removed_domain": {k: ppl(mm, [d]) for k, mm in (("base", "base"), ("before", full),
                                                                 ("after", m.name), ("without", without))},
               "other_domains": {k: ppl(mm, others) for k, mm in (("base", "base"), ("before", full),
                                                                   ("after", m.name), ("without", without))},
               "inplace_check": {"rel_error_weights": max(c["rel_error_weights"] for c in checks),
                                 "rel_error_delta": max(c["rel_error_delta"] for c in checks)}}
        unlearning.append(row)

    fundamentals = {d: matrix[adapter([d]).name][d]["mean"] for d in domains}
    recipe = {d: {"base": matrix["base"][d]["mean"], "adapter": fundamentals[d],
                  "ratio": fundamentals[d] / matrix["base"][d]["mean"]} for d in domains}
    recipe_check = {"max_ppl_ratio": cfg.max_ppl_ratio, "domains": recipe,
                    "passed": None if cfg.max_ppl_ratio is None
                    else all(v["ratio"] <= cfg.max_ppl_ratio for v in recipe.values())}

    fit = _fit(compositions, level)
    out = {
        "schema": "lorasum.results/1",
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "models": {name: m.as_dict() for name, m in catalog.models.items()},
        "perplexity": matrix,
        "pairs": pairs,
        "compositions": compositions,
        "unlearning": unlearning,
        "recipe_check": recipe_check,
        "fit": fit,
        "data": _data_section(cfg, plan),
        "provenance": {k: v for k, v in provenance().items() if k != "torch_threads"},
    }
    if plan.get("tuning"):  # how the hyperparameters were tuned (per_partition: confounded)
        out["tuning"] = plan["tuning"]
    out["findings"] = findings(out)
    atomic_write_json(Path(run_dir) / "results.json", _clean(out))
    return _clean(out)


def _fit(compositions: list[dict], level: float) -> dict:
    """RMS -> %Δ least squares over pairs: one point per pair, (mean RMS, mean %Δ) over seeds, so n = pairs.

    Seeds of one pair share its data and are not independent draws of the relation; fitting them as separate
    points would narrow the slope's interval. The per-seed points are kept for the scatter.
    """
    rows = [c for c in compositions if c["level"] == 2 and "pct_change" in c]
    points = [[float(np.mean(c["rms_per_seed"])), c["pct_change"]["mean"]] for c in rows]
    per_seed = [[x, y] for c in rows for x, y in zip(c["rms_per_seed"], c["pct_change"]["per_seed"])]
    return {**linear_fit([p[0] for p in points], [p[1] for p in points], level), "points": points,
            "pairs": ["|".join(c["subset"]) for c in rows], "points_per_seed": per_seed, "level": level}


def _data_section(cfg: ExperimentConfig, plan: dict) -> dict:
    """Split sizes (from the training metadata) and truncation statistics per domain (a cached job)."""
    meta = {}
    for d in cfg.domains:
        lj = json.loads((artifact_path(plan["train"][(d, cfg.seeds[0])]) / "lorasum.json").read_text(encoding="utf-8"))
        meta[d] = lj["data"]["domains"][0]
    return {"domains": meta, "stats": _load(plan["data_stats"])["rows"]}


def _clean(obj):
    """Floats rounded to 12 significant digits (stable text), NaN/inf -> None (valid JSON)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
