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

from .config import ExperimentConfig
from .files import atomic_write_json
from .findings import findings
from .jobs import artifact_path
from .stats import Scores, bootstrap_ppl, linear_fit, paired_pct_change


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
    from .provenance import provenance

    S = _Scores(cfg, plan)
    B, level, bseed = cfg.bootstrap_samples, cfg.ci_level, cfg.bootstrap_seed
    seeds, domains, models = cfg.seeds, cfg.domains, plan["models"]

    def ppl(model: str, doms: list[str]) -> dict:
        return bootstrap_ppl(S.scores(model, doms), B, level, bseed)

    def pct(a: str, b: str, doms: list[str]) -> dict:
        return paired_pct_change(S.scores(a, doms), S.scores(b, doms), B, level, bseed)

    def sim(label: str) -> dict:
        per_seed = [_load(plan["sims"][(label, s)]) for s in seeds]
        return {"layers": _mean_layers([p["layers"] for p in per_seed]),
                "rms": float(np.mean([p["rms"] for p in per_seed])), "rms_per_seed": [p["rms"] for p in per_seed],
                "norm_a": _mean_layers([p["norm_a"] for p in per_seed]),
                "norm_b": _mean_layers([p["norm_b"] for p in per_seed])}

    # per-domain perplexity matrix: every model x every domain, plus pooled over all domains
    matrix = {m: {**{d: ppl(m, [d]) for d in domains}, "pooled": ppl(m, domains)} for m in models}

    pairs = {f"{x}|{y}": sim(f"pair[{x}|{y}]") for x, y in itertools.combinations(domains, 2)}
    def macro(model: str, doms: list[str]) -> float:
        """Macro mean over the subset's domains of the per-domain perplexities (beside the pooled figure)."""
        return float(np.mean([matrix[model][d]["mean"] for d in doms]))

    compositions = []
    for k in range(2, cfg.level + 1):
        for s in itertools.combinations(domains, k):
            part, doms = "+".join(s), list(s)
            merged = f"adapter[{part}]"
            pair_sims = [pairs[f"{x}|{y}"] for x, y in itertools.combinations(s, 2)]
            row = {"subset": doms, "level": k, "merged": ppl(merged, doms),
                   "merged_macro": macro(merged, doms),
                   "rms": _rms(c for p in pair_sims for c in p["layers"].values()),
                   "rms_per_seed": [_rms(c for x, y in itertools.combinations(s, 2)
                                         for c in _load(plan["sims"][(f"pair[{x}|{y}]", seed)])["layers"].values())
                                    for seed in seeds]}
            if f"sum[{part}]" in models:
                row["summed"] = ppl(f"sum[{part}]", doms)
                row["summed_macro"] = macro(f"sum[{part}]", doms)
                row["pct_change"] = pct(f"sum[{part}]", merged, doms)
            baselines = {}
            if f"mean[{part}]" in models:
                baselines["mean"] = {"perplexity": ppl(f"mean[{part}]", doms), "macro": macro(f"mean[{part}]", doms),
                                     "pct_change": pct(f"mean[{part}]", merged, doms)}
            if "best_single" in cfg.compositions:
                # chosen on the pooled *validation* perplexity of the subset, then reported on test
                val = {d: S.point_ppl(f"adapter[{d}]", doms, "validation") for d in s}
                best = min(s, key=lambda d: val[d])
                baselines["best_single"] = {"block": best, "chosen_on": "validation", "validation_perplexity": val,
                                            "perplexity": ppl(f"adapter[{best}]", doms),
                                            "macro": macro(f"adapter[{best}]", doms),
                                            "pct_change": pct(f"adapter[{best}]", merged, doms)}
            row["baselines"] = baselines
            if k >= 3:
                row["block_vs_rest"] = {}
                for d in s:
                    bvr = sim(f"block_vs_rest[{part}|{d}]")
                    row["block_vs_rest"][d] = {"rms": bvr["rms"], "layers": bvr["layers"]}
            ws = sim(f"weight[{part}]")
            row["weight_space"] = {
                "layers": {n: {"cos": c, "norm_ratio": ws["norm_a"][n] / ws["norm_b"][n] if ws["norm_b"][n] else None}
                           for n, c in ws["layers"].items()},
                "mean_cos": float(np.mean(list(ws["layers"].values()))), "rms": ws["rms"],
                "norm_ratio": math.sqrt(sum(v * v for v in ws["norm_a"].values()))
                / math.sqrt(sum(v * v for v in ws["norm_b"].values())),
            }
            if k == 3 and "level2_plus_one" in cfg.compositions:
                row["level2_plus_one"] = {}
                for d in s:
                    pair = "+".join(x for x in s if x != d)
                    name = f"level2+1[{pair}|{d}]"
                    t5 = sim(name)
                    row["level2_plus_one"][d] = {"level2": pair, "perplexity": ppl(name, doms),
                                                 "macro": macro(name, doms),
                                                 "pct_change": pct(name, merged, doms), "rms": t5["rms"],
                                                 "layers": t5["layers"]}
            compositions.append(row)

    unlearning = []
    full = "+".join(domains)
    for d in domains:
        name = f"unlearn[{full}-{d}]"
        if name not in models:
            break
        others = [x for x in domains if x != d]
        without = f"adapter[{'+'.join(others)}]"
        checks = [_load(plan["checks"][(d, s)]) for s in seeds]
        row = {"removed": d, "others": others, "without_model": without,
               "removed_domain": {m: ppl(mm, [d]) for m, mm in (("base", "base"), ("before", f"adapter[{full}]"),
                                                                 ("after", name), ("without", without))},
               "other_domains": {m: ppl(mm, others) for m, mm in (("base", "base"), ("before", f"adapter[{full}]"),
                                                                   ("after", name), ("without", without))},
               "inplace_check": {"rel_error_weights": max(c["rel_error_weights"] for c in checks),
                                 "rel_error_delta": max(c["rel_error_delta"] for c in checks)}}
        unlearning.append(row)

    recipe = {d: {"base": matrix["base"][d]["mean"], "adapter": matrix[f"adapter[{d}]"][d]["mean"],
                  "ratio": matrix[f"adapter[{d}]"][d]["mean"] / matrix["base"][d]["mean"]} for d in domains}
    recipe_check = {"max_ppl_ratio": cfg.max_ppl_ratio, "domains": recipe,
                    "passed": None if cfg.max_ppl_ratio is None
                    else all(v["ratio"] <= cfg.max_ppl_ratio for v in recipe.values())}

    fit = _fit(compositions, level)
    out = {
        "schema": "lorasum.results/1",
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "models": {m: {k: v for k, v in spec.items()} for m, spec in models.items()},
        "perplexity": matrix,
        "pairs": pairs,
        "compositions": compositions,
        "unlearning": unlearning,
        "recipe_check": recipe_check,
        "fit": fit,
        "data": _data_section(cfg, plan),
        "provenance": {k: v for k, v in provenance().items() if k != "torch_threads"},
    }
    if plan.get("tuning"):  # issue 5: how the hyperparameters were tuned (per_partition: confounded)
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
    for (part, seed), spec in plan["train"].items():
        if "+" not in part and seed == cfg.seeds[0]:
            lj = json.loads((artifact_path(spec) / "lorasum.json").read_text(encoding="utf-8"))
            meta[part] = lj["data"]["domains"][0]
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
