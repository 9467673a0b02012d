"""Assemble results.json from a run's artifacts: the paper's tables, statistics, findings and provenance.

Everything here is recomputed from the cached artifacts (per-example NLL, similarity files), deterministically,
so an interrupted-and-resumed run gives a byte-identical results.json. Wall times live in timings.json.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from ..delta.peft_format import load_adapter
from ..files import atomic_write_json, content_digest, read_json
from ..lm.data import parse_spec
from ..provenance import provenance
from ..relation import relation
from ..stats import bootstrap_ppl, linear_fit, paired_pct_change
from .config import ExperimentConfig
from .findings import claims, findings
from .grid import COMPOSITIONS, adapter, eval_domains
from .jobs import artifact_path
from .methods import method_rows
from .scores import RunScores, load
from .unlearning import unlearning_rows

SCHEMA = "lorasum.results/2"


def _mean_layers(per_seed: list[dict]) -> dict:
    return {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}


def _rms(values) -> float:
    v = list(values)
    return math.sqrt(sum(x * x for x in v) / len(v)) if v else float("nan")


def mode_body(cfg: ExperimentConfig, plan: dict) -> dict:
    """One init mode's grid: the perplexity matrix, pairs with their references, compositions, unlearning, the
    recipe check and the fit."""
    S = RunScores(cfg, plan)
    B, level, bseed = cfg.bootstrap_samples, cfg.ci_level, cfg.bootstrap_seed
    seeds, domains, catalog = cfg.seeds, cfg.domains, plan["models"]

    def ppl(model: str, doms: list[str]) -> dict:
        return bootstrap_ppl(S.scores(model, doms), B, level, bseed)

    def pct(a: str, b: str, doms: list[str]) -> dict:
        return paired_pct_change(S.scores(a, doms), S.scores(b, doms), B, level, bseed)

    def sim(*what) -> dict:
        per_seed = [load(plan["sims"][(*what, s)]) for s in seeds]
        out = {"layers": _mean_layers([p["layers"] for p in per_seed]),
               "rms": float(np.mean([p["rms"] for p in per_seed])), "rms_per_seed": [p["rms"] for p in per_seed],
               "norm_a": _mean_layers([p["norm_a"] for p in per_seed]),
               "norm_b": _mean_layers([p["norm_b"] for p in per_seed])}
        if "factors" in per_seed[0]:  # single adapters on both sides: their A and B subspace similarity
            out["factors"] = {k: float(np.mean([p["factors"][f"mean_{k}"] for p in per_seed])) for k in ("A", "B")}
        if "null" in per_seed[0]:
            out["null"] = per_seed[0]["null"]  # depends on shapes alone
        return out

    # per-domain perplexity matrix: every model on each domain it was evaluated on (eval_scope), and pooled over
    # all domains where it was evaluated on all of them
    best_single = "best_single" in cfg.compositions
    matrix = {}
    for name, m in catalog.models.items():
        doms = eval_domains(m, domains, cfg.eval_scope, best_single, bool(catalog.of("unlearn")))
        matrix[name] = {**{d: ppl(name, [d]) for d in doms}, **({"pooled": ppl(name, domains)} if doms == domains
                                                                else {})}

    pairs = {f"{x}|{y}": {"domains": [x, y], **sim("pair", (x, y))} for x, y in itertools.combinations(domains, 2)}
    references = {d: ref for d in domains if (ref := _references(cfg, plan, d))}
    for p in pairs.values():  # the pair's same-domain ceiling: the mean of its two domains' (see _references)
        ceil = [_ceiling(references.get(d, {})) for d in p["domains"]]
        p["ceiling"] = float(np.mean(ceil)) if None not in ceil else None

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
                                         for c in load(plan["sims"][("pair", (x, y), seed)])["layers"].values())
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
            methods, choice = method_rows(cfg, plan, S, s, lambda m: versus_merged(m, merged, doms), pct, baselines)
            baselines.update(methods)
            if choice is not None:
                row["method_choice"] = choice
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

    unlearning = unlearning_rows(cfg, plan, S, ppl)

    fundamentals = {d: matrix[adapter([d]).name][d]["mean"] for d in domains}
    recipe = {d: {"base": matrix["base"][d]["mean"], "adapter": fundamentals[d],
                  "ratio": fundamentals[d] / matrix["base"][d]["mean"]} for d in domains}
    recipe_check = {"max_ppl_ratio": cfg.max_ppl_ratio, "domains": recipe,
                    "passed": None if cfg.max_ppl_ratio is None
                    else all(v["ratio"] <= cfg.max_ppl_ratio for v in recipe.values())}

    return {
        "models": {name: m.as_dict() for name, m in catalog.models.items()},
        "perplexity": matrix,
        "pairs": pairs,
        "references": references,
        "compositions": compositions,
        "unlearning": unlearning,
        "recipe_check": recipe_check,
        "fit": _fit(compositions, level, cfg.bootstrap_seed),
    }


def _ceiling(ref: dict) -> float | None:
    """A domain's ceiling: the second-sample reference, which has the same init relation as the pairs in either
    mode; the two-seed one only where there is no second sample (in shared mode its A differs, unlike the pairs')."""
    return ref.get("split", ref.get("seeds"))


def _references(cfg: ExperimentConfig, plan: dict, d: str) -> dict:
    """Same-domain ceilings of domain `d`: a disjoint second sample of its training records (RMS mean over seeds)
    and, with two or more seeds, the fundamental trained with two seeds."""
    out = {}
    if ("ceiling", d, cfg.seeds[0]) in plan["sims"]:
        out["split"] = float(np.mean([load(plan["sims"][("ceiling", d, s)])["rms"] for s in cfg.seeds]))
    if ("seeds", d, cfg.seeds[0]) in plan["sims"]:
        out["seeds"] = load(plan["sims"][("seeds", d, cfg.seeds[0])])["rms"]
    return out


def assemble(cfg: ExperimentConfig, plans: dict[str, dict], run_dir: str | Path, tuning: dict | None = None) -> dict:
    """results.json: the primary init mode's grid at the top level, the other modes beside it for comparison,
    Table 1, data statistics, findings, the claims and provenance."""
    modes = list(plans)
    bodies = {m: mode_body(cfg, plans[m]) for m in modes}
    primary = plans[modes[0]]
    out = {
        "schema": SCHEMA,
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        **bodies[modes[0]],
        "init": {"modes": modes, "primary": modes[0]},
        "init_comparison": _init_comparison(bodies) if len(modes) > 1 else None,
        "table1": _table1(cfg, primary),
        "data": _data_section(cfg, primary),
        "provenance": {k: v for k, v in provenance(cfg.device).items() if k != "torch_threads"},
    }
    if tuning:  # how the hyperparameters were tuned (per_partition: confounded)
        out["tuning"] = tuning
    out["findings"] = findings(out)
    out["claims"] = claims(out)
    out = _clean(out)
    out["digest"] = content_digest(out)  # `lorasum report` renders only what lorasum wrote
    atomic_write_json(Path(run_dir) / "results.json", out)
    return out


def _init_comparison(bodies: dict[str, dict]) -> dict:
    """Per pair and per init mode: RMS, the A and B subspace similarities and %Δ summed vs merged."""
    rows = {}
    for mode, b in bodies.items():
        pct = {"|".join(c["subset"]): c.get("pct_change") for c in b["compositions"] if c["level"] == 2}
        for pair, p in b["pairs"].items():
            rows.setdefault(pair, {})[mode] = {"rms": p["rms"], "factors": p.get("factors"),
                                               "pct_change": pct.get(pair)}
    return {"modes": list(bodies), "pairs": rows}


def _table1(cfg: ExperimentConfig, plan: dict) -> dict:
    """The paper's Table 1: three sample layers of the first fundamental block (name, A/B shapes, first values)."""
    d = cfg.domains[0]
    a = load_adapter(artifact_path(plan["train"][(d, cfg.seeds[0])]))
    names = sorted(a.layers)
    picks = [names[0], names[len(names) // 2], names[-1]]
    rows = [{"layer": n, "A_shape": list(a.layers[n].A.shape), "B_shape": list(a.layers[n].B.shape),
             "A_first": [float(v) for v in a.layers[n].A[0, :3]], "B_first": [float(v) for v in a.layers[n].B[0, :3]],
             "scale": a.layers[n].scale} for n in dict.fromkeys(picks)]
    return {"adapter": adapter([d]).name, "seed": cfg.seeds[0], "layers": rows}


def _fit(compositions: list[dict], level: float, seed: int = 0) -> dict:
    """RMS -> %Δ least squares over pairs: one point per pair, (mean RMS, mean %Δ) over seeds, so n = pairs.

    Seeds of one pair share its data and are not independent draws of the relation; fitting them as separate
    points would narrow the slope's interval. The per-seed points are kept for the scatter. `relation` is the test
    that decides the claim (lorasum.relation: ≥ 8 pairs, domain-label permutations, domain bootstrap), within each
    group too when pairs fall within one parent domain and across parents.
    """
    rows = [c for c in compositions if c["level"] == 2 and "pct_change" in c]
    points = [[float(np.mean(c["rms_per_seed"])), c["pct_change"]["mean"]] for c in rows]
    per_seed = [[x, y] for c in rows for x, y in zip(c["rms_per_seed"], c["pct_change"]["per_seed"])]
    pairs = [tuple(c["subset"]) for c in rows]
    parents = {d: parse_spec(d)[0] for p in pairs for d in p}
    groups = {p: "within one parent domain" if parents[p[0]] == parents[p[1]] else "across parent domains"
              for p in pairs}
    rel = relation(pairs, [p[0] for p in points], [p[1] for p in points],
                   groups if len(set(groups.values())) > 1 else None, level=level, seed=seed)
    return {**linear_fit([p[0] for p in points], [p[1] for p in points], level), "points": points,
            "pairs": ["|".join(c["subset"]) for c in rows], "points_per_seed": per_seed, "level": level,
            "relation": rel, "groups": [groups[p] for p in pairs]}


def _data_section(cfg: ExperimentConfig, plan: dict) -> dict:
    """Split sizes (from the training metadata) and truncation statistics per domain (a cached job)."""
    meta = {}
    for d in cfg.domains:
        lj = read_json(artifact_path(plan["train"][(d, cfg.seeds[0])]) / "lorasum.json", "adapter metadata",
                       "rerun the experiment: it removes the damaged adapter and trains it again")
        meta[d] = lj["data"]["domains"][0]
    return {"domains": meta, "stats": load(plan["data_stats"])["rows"]}


def _clean(obj):
    """Floats rounded to 12 significant digits (stable text), NaN/inf -> None (valid JSON)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


