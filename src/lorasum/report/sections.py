"""The report's sections, built from what results.json carries (never from the study's code): each a function of
the results in SECTIONS, in reading order, returning Sections of typed blocks (see blocks.py).

Adding a section is one function and one line in SECTIONS.
"""

from __future__ import annotations

from . import paper
from .blocks import Figures, Note, Paragraph, Section, Table
from .figures import available, kind_key, split_layer
from .ordering import by_domain, model_order, pair_order
from .science import claims_section, init_section, references_section, table1_section, unlearning_sweep_section
from .tuning import tuning_blocks


L2P1_NEEDS = "a level-2 block + fundamental needs a subset of 3 domains"


def _ci(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['mean'])} [{fmt.format(x['ci'][0])}, {fmt.format(x['ci'][1])}]"


def _pct(x: dict) -> str:
    return f"{x['mean']:+.1f}% [{x['ci'][0]:+.1f}, {x['ci'][1]:+.1f}]"


def _num(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _base(d: str) -> str:
    return d.split("[")[0]


def _layer_table(layers: dict, fmt=lambda v: f"{v:.4f}") -> tuple[list[str], list[list[str]]]:
    """Per-layer values as rows = block index, columns = module (the paper's Table 2 layout)."""
    kinds = sorted({split_layer(n)[1] for n in layers}, key=kind_key)
    idx = sorted({split_layer(n)[0] for n in layers})
    cell = {split_layer(n): v for n, v in layers.items()}
    return ["layer", *kinds], [[str(i), *(fmt(cell[(i, k)]) if (i, k) in cell else "" for k in kinds)] for i in idx]


def _absent(cfg: dict, need: int, composition: str | None, what: str) -> Note | None:
    """Why rows formed for subsets of `need` domains (if `composition` is asked for) are missing, or None.

    `what` says in a few words why they need that many domains."""
    n = len(cfg["domains"])
    level = cfg.get("max_level") or n
    if n < need:
        return Note(f"not applicable: {n} domains ({what}).")
    if composition and composition not in cfg["compositions"]:
        return Note(f"skipped: '{composition}' is not in compositions.")
    if level < need:
        return Note(f"skipped: max_level {level} < {need} domains ({what}).")
    return None


def _best_label(bs: dict) -> str:
    return "best single" if bs.get("chosen_on") == "validation" else "best single (oracle: chosen on test)"


def _baselines(comps: list[dict], cfg: dict, ci: str) -> list:
    """Every baseline of the rows: the mean and the best single block, then any other composition."""
    return _mean_and_best(comps, cfg, ci) + _other_compositions(comps, ci)


def _other_compositions(comps: list[dict], ci: str) -> list:
    """Compositions beyond the mean and the best single block (any `baseline` composition of the grid's registry):
    perplexity and %Δ vs merged, a column pair each."""
    names = sorted({n for c in comps for n in c.get("baselines", {}) if n not in ("mean", "best_single")})
    if not names:
        return []
    heads = ["combination", "ppl merged"] + [h for n in names for h in (f"ppl {n}", f"%Δ {n} vs merged")]
    rows = [[" + ".join(c["subset"]), _ci(c["merged"])]
            + [x for n in names for x in ((_ci(c["baselines"][n]["perplexity"]), _pct(c["baselines"][n]["pct_change"]))
                                          if n in c.get("baselines", {}) else ("", ""))] for c in comps]
    return [Table(heads, rows, f"Other compositions. Pooled test perplexity, {ci}.")]


def _mean_and_best(comps: list[dict], cfg: dict, ci: str) -> list:
    """Mean of the blocks (1/k) and the best single block, each with its perplexity and %Δ vs merged."""
    notes = [Note(f"{name} baseline skipped: '{c}' is not in compositions.")
             for c, name in (("mean", "mean (1/k)"), ("best_single", "best-single")) if c not in cfg["compositions"]]
    rows = []
    for c in comps:
        b = c.get("baselines", {})
        m, bs = b.get("mean"), b.get("best_single")
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]),
                     _ci(m["perplexity"]) if m else "", _pct(m["pct_change"]) if m else "",
                     bs["block"] if bs else "",
                     _ci(bs["perplexity"]) if bs else "", _pct(bs["pct_change"]) if bs else ""])
    if not rows or len(notes) == 2:
        return notes
    single = [c["baselines"]["best_single"] for c in comps if "best_single" in c.get("baselines", {})]
    oracle = any(bs.get("chosen_on") != "validation" for bs in single)
    chosen = ("oracle: chosen on the test set it is reported on, which flatters it" if oracle else
              "chosen per subset by the lowest pooled validation perplexity (mean over seeds), reported on test")
    label = _best_label({"chosen_on": "test" if oracle else "validation"})
    return notes + [Table(["combination", "ppl merged", "ppl mean (1/k)", "%Δ mean vs merged", f"{label}: block",
                      f"ppl {label}", "%Δ best single vs merged"], rows,
                     f"Baselines. Best single block: {chosen}. Pooled test perplexity, {ci}.")]


def _table3(r: dict, ci: str) -> list:
    cfg, blocks, rows, matched = r["config"], [], [], False
    if "sum" not in cfg["compositions"]:
        blocks.append(Note("summed rows skipped: 'sum' is not in compositions."))
    pairs = [c for c in r["compositions"] if c["level"] == 2]
    refs = any("null" in p for p in r["pairs"].values())  # schema 2: the RMS's reference scales beside it
    for c in pairs:
        ref = paper.TABLE3.get(frozenset(_base(d) for d in c["subset"]))
        matched |= ref is not None
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(c["summed"]) if "summed" in c else "",
                     f"{_num(c.get('merged_macro'))} / {_num(c.get('summed_macro'))}",
                     f"{r['pairs'].get('|'.join(c['subset']), c)['rms']:.4f}",
                     *(_rms_refs(r, c["subset"]) if refs else ()),
                     _pct(c["pct_change"]) if "pct_change" in c else "", paper.cell(ref)])
    blocks.append(Table(["combination", "ppl merged", "ppl summed", "macro merged / summed", "RMS cos",
                         *(("random null", "same-domain ceiling") if refs else ()), "%Δ summed",
                    "paper: merged / summed / RMS / %Δ"], rows,
                   f"Pooled test perplexity (exp ΣNLL/Σtokens over the pair's test sets), {ci}; macro = mean of the "
                   "per-domain perplexities. %Δ = (summed − merged)/merged. Last column: " + paper.LABEL + "."))
    if not matched:
        blocks.append(paper.table3_reference())
    return blocks + _baselines(pairs, cfg, ci)


def _rms_refs(r: dict, domains: list[str]) -> tuple[str, str]:
    """The random-null RMS of a pair and its same-domain ceiling (see the References section)."""
    p = r["pairs"].get("|".join(domains), {})
    null, ceil = p.get("null"), p.get("ceiling")
    return (f"{null['mean']:.4f}" if null else "", f"{ceil:.4f}" if ceil is not None else "")


def _table4(r: dict, ci: str) -> list:
    cfg = r["config"]
    triples = [c for c in r["compositions"] if c["level"] == 3]
    absent = _absent(cfg, 3, None, "the table compares subsets of 3 domains")
    if absent:
        return [absent, paper.table4_reference()]
    blocks = [n for n in (_absent(cfg, 3, "level2_plus_one", L2P1_NEEDS),) if n]
    if "sum" not in cfg["compositions"]:
        blocks.append(Note("summed rows skipped: 'sum' is not in compositions."))
    rows, matched = [], False
    for c in triples:
        ok = {_base(d) for d in c["subset"]} == paper.TABLE4_DOMAINS
        matched |= ok
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(c["summed"]) if "summed" in c else "",
                     f"{_num(c.get('merged_macro'))} / {_num(c.get('summed_macro'))}", f"{c['rms']:.4f} (all pairs)",
                     _pct(c["pct_change"]) if "pct_change" in c else "",
                     paper.cell(paper.TABLE4["sum"] if ok else None)])
        l2p1 = c.get("level2_plus_one", {})
        for d in by_domain(r, l2p1):
            l2 = l2p1[d]
            rows.append([f"({l2['level2']}) + {d}", _ci(c["merged"]), _ci(l2["perplexity"]),
                         f"{_num(c.get('merged_macro'))} / {_num(l2.get('macro'))}", f"{l2['rms']:.4f}",
                         _pct(l2["pct_change"]), paper.cell(paper.TABLE4.get(_base(d)) if ok else None)])
    blocks.append(Table(["combination", "ppl merged", "ppl composed", "macro merged / composed", "RMS cos", "%Δ",
                    "paper: merged / summed / RMS / %Δ"], rows,
                   f"{ci}. RMS for a level-2 block + fundamental is between the two parts; for the sum, over all "
                   f"pairs of its blocks. Last column: {paper.LABEL}."))
    if not matched:
        blocks.append(paper.table4_reference())
    return blocks + _baselines(triples, cfg, ci)


def _per_layer_sections(r: dict) -> list[Section]:
    """Table 2 (pairs), each block vs the sum of the others, Table 5 (level-2 block vs remaining fundamental)."""
    cfg, out, blocks = r["config"], [], []
    for name in pair_order(r):
        p = r["pairs"][name]
        h, rows = _layer_table(p["layers"])
        label = " vs ".join(p["domains"]) if "domains" in p else name.replace("|", " vs ")
        blocks.append(Table(h, rows, f"Cosine per layer, {label} (RMS {p['rms']:.4f})"))
    out.append(Section("Table 2 — per-layer cosine similarity of fundamental blocks", blocks))
    triples = [c for c in r["compositions"] if c["level"] >= 3]
    blocks = [n for n in (_absent(cfg, 3, None, "each block vs the other two needs a subset of 3 domains"),) if n]
    for c in triples:
        bvr = c.get("block_vs_rest", {})
        for d in by_domain(r, bvr):
            v = bvr[d]
            if isinstance(v, dict):
                h, rows = _layer_table(v["layers"])
                rest = " + ".join(x for x in c["subset"] if x != d)
                blocks.append(Table(h, rows, f"{d} block vs the sum ({rest}) (RMS {v['rms']:.4f}); RMS over all block "
                                        f"pairs of {' + '.join(c['subset'])}: {c['rms']:.4f}"))
            else:  # results.json written before per-layer cosines were kept
                blocks.append(Note(f"{d} block vs the sum of the others: RMS {v:.4f} (no per-layer values)."))
    out.append(Section("Each fundamental block vs the sum of the others", blocks))
    blocks = [n for n in (_absent(cfg, 3, "level2_plus_one", L2P1_NEEDS),) if n]
    for c in [c for c in triples if c["level"] == 3]:
        l2p1 = c.get("level2_plus_one", {})
        for d in by_domain(r, l2p1):
            h, rows = _layer_table(l2p1[d]["layers"])
            null = next((p["null"]["mean"] for p in r["pairs"].values() if "null" in p), None)
            ref = (r.get("references") or {}).get(d, {})
            ceil = ref.get("split", ref.get("seeds"))
            blocks.append(Table(h, rows, f"({l2p1[d]['level2']}) block vs {d} block (RMS {l2p1[d]['rms']:.4f}"
                                + ("" if null is None else f"; random null of these shapes {null:.4f}")
                                + ("" if ceil is None else f"; {d}'s same-domain ceiling {ceil:.4f}") + ")"))
    out.append(Section("Table 5 — per-layer cosine, level-2 block vs remaining fundamental", blocks))
    return out


def _unlearning(r: dict, ci: str) -> list:
    n = len(r["config"]["domains"])
    absent = _absent(r["config"], n, "unlearning", f"unlearning subtracts from the block trained on all {n} domains")
    if absent or not r["unlearning"]:
        return [absent or Note("no unlearning rows.")]
    rows = []
    for u in r["unlearning"]:
        for label, key in (("base", "base"), ("all domains (before)", "before"), ("after removal", "after"),
                           (f"trained without ({u['without_model']})", "without")):
            rows.append([u["removed"], label, _ci(u["removed_domain"][key]), _ci(u["other_domains"][key])])
        rows.append([u["removed"], "in-place check: rel. error vs direct sum",
                     f"{u['inplace_check']['rel_error_weights']:.1e} (weights)",
                     f"{u['inplace_check']['rel_error_delta']:.1e} (delta)"])
    return [Table(["removed", "model", "ppl on removed domain", "ppl on the others (pooled)"], rows, ci)]


def _weight_space(r: dict) -> list:
    rows = [[" + ".join(c["subset"]), f"{c['weight_space']['mean_cos']:.4f}", f"{c['weight_space']['rms']:.4f}",
             f"{c['weight_space']['norm_ratio']:.3f}"] for c in r["compositions"]]
    blocks: list = [Table(["subset", "mean cos(Σ, merged)", "RMS cos", "‖Σ‖/‖merged‖"], rows,
                     "Summary: cosine between the summed deltas and the delta trained on merged data (mean and RMS "
                     "over layers); norm ratio over all layers.")]
    for c in r["compositions"]:
        h, rows = _layer_table(c["weight_space"]["layers"],
                               lambda v: f"{v['cos']:.3f} / {_num(v.get('norm_ratio'))}")
        blocks.append(Table(h, rows, f"{' + '.join(c['subset'])}: per layer, cos(Σ blocks, merged block) / "
                                "‖Σ‖/‖merged‖"))
    return blocks


def _ci_label(r: dict) -> str:
    seeds = r["config"]["seeds"]
    return (f"[{int(100 * r['config']['ci_level'])}% bootstrap CI over test examples"
            + (" and seeds" if len(seeds) > 1 else "") + "; paired for %Δ]")


def findings_paragraph(items: list[dict]) -> str:
    """Every verdict as `claim — subject: **verdict** (evidence).`, in one paragraph."""
    return " ".join(f"{f['claim']} — {f['subject']}: **{f['verdict']}** ({f['evidence']})." for f in items)


def _rules(r: dict) -> str:
    if r.get("schema", "").endswith("/1"):
        return ("Rules: 'summed ≈ merged' only where the %Δ CI lies within ±10%; a RMS relation only where the slope "
                "CI (fit over pairs, each the mean over seeds) excludes 0; unlearning 'restores' only where perplexity "
                "after removal lies within the CI of the model trained without that domain.")
    seeds = len(r["config"]["seeds"])
    cover = ("test examples only (one training seed: seed-to-seed variance is not in them)" if seeds == 1 else
             f"test examples and {seeds} training seeds" + (" (with 2 seeds the seed variance is barely "
                                                          "estimated)" if seeds == 2 else ""))
    return ("Rules: 'summed ≈ merged' only where the %Δ CI lies within ±10%; the RMS → %Δ relation is tested only "
            "with at least 8 distinct pairs, by Spearman's ρ with a permutation test over domain labels and an OLS "
            "slope whose CI resamples domains (pairs sharing a domain are not independent); 'near-orthogonal' only "
            "where a pair's RMS is closer to the random null than to the same-domain ceiling; unlearning 'restores' "
            f"only where perplexity after removal lies within the CI of the model trained without that domain. "
            f"Every perplexity CI covers {cover}.")


def findings_section(r: dict) -> list[Section]:
    blocks: list = [Paragraph(findings_paragraph(r["findings"])),
                    Paragraph(_rules(r))]
    if r.get("tuning") and r["tuning"]["confounded"]:  # per-partition tuning confounds merged vs summed
        blocks.append(Paragraph("Caution: hyperparameters were tuned per partition (tune: per_partition), so every "
                                "merged-vs-summed comparison above is confounded by tuning."))
    return [Section("Findings", blocks)]


def tuning_section(r: dict) -> list[Section]:
    return [Section("Tuning", tuning_blocks(r))] if r.get("tuning") else []


def tables_3_4(r: dict) -> list[Section]:
    ci = _ci_label(r)
    return [Section("Table 3 — pairs: merged-data vs summed fundamentals", _table3(r, ci)),
            Section("Table 4 — three-domain compositions", _table4(r, ci))]


def perplexity_matrix(r: dict) -> list[Section]:
    doms = r["config"]["domains"]
    cell = lambda row, k: _ci(row[k]) if k in row else ""  # noqa: E731  (eval_scope own leaves cells out)
    rows = [[m, *(cell(r["perplexity"][m], d) for d in doms), cell(r["perplexity"][m], "pooled")]
            for m in model_order(r)]
    return [Section("Perplexity of every model on every domain", [Table(["model", *doms, "pooled"], rows,
                                                                         _ci_label(r))])]


def unlearning_section(r: dict) -> list[Section]:
    return [Section("Unlearning — all-domain block minus one fundamental", _unlearning(r, _ci_label(r)))]


def weight_space_section(r: dict) -> list[Section]:
    return [Section("Weight space — Σ fundamentals vs the merged-data block", _weight_space(r))]


def figures_section(r: dict) -> list[Section]:
    fit = r["fit"]
    unit = "pairs (each the mean over seeds)" if len(r["config"]["seeds"]) > 1 else "pairs"
    if fit.get("slope") is None:
        fit_txt = "Too few points for a fit."
    else:
        fit_txt = (f"Fit over {fit['n']} {unit}: y = {fit['slope']:.2f}x {fit['intercept']:+.2f}, r² {fit['r2']:.3f}"
                   + (f", slope CI [{fit['slope_ci'][0]:.1f}, {fit['slope_ci'][1]:.1f}]." if fit.get("slope_ci")
                      else ", too few points for a slope CI."))
    return [Section("Figures", [Paragraph(fit_txt + f" Paper (GPT-2 small, their data): {paper.FIT}."),
                                Figures(tuple(available(r)))])]


def data_section(r: dict) -> list[Section]:
    stats = r["data"].get("stats") or []
    rows = [[s["domain"], s["split"], str(s["records"]), str(s["tokens"]), f"{100 * s['truncated_share']:.1f}%",
             f"{100 * s['answer_token_share']:.1f}%", str(s["answer_cut_off"])] for s in stats]
    return [Section("Data", [Table(["domain", "split", "records", "tokens", "truncated", "answer tokens",
                                    "answer cut off"], rows,
                                   f"After caps, at max length {r['config']['train']['max_length']}.")])]


def provenance_section(r: dict) -> list[Section]:
    cfg, prov = r["config"], r["provenance"]
    rows = ([[k, str(v)] for k, v in sorted(prov.items())]
            + [["config hash", r["config_hash"]], ["model", cfg["model"]], ["seeds", ", ".join(map(str, cfg["seeds"]))]]
            + ([["tuning", f"{r['tuning']['mode']}, {r['tuning']['trials']} trials"
                 + (" (confounded)" if r["tuning"]["confounded"] else "")]] if r.get("tuning") else []))
    return [Section("Provenance", [Table(["item", "value"], rows, "")])]


SECTIONS = {
    "claims": claims_section,
    "findings": findings_section,
    "tuning": tuning_section,
    "init": init_section,
    "references": references_section,
    "tables_3_4": tables_3_4,
    "unlearning_sweep": unlearning_sweep_section,
    "per_layer": _per_layer_sections,
    "perplexity": perplexity_matrix,
    "unlearning": unlearning_section,
    "weight_space": weight_space_section,
    "table1": table1_section,
    "figures": figures_section,
    "data": data_section,
    "provenance": provenance_section,
}


def sections(r: dict) -> list[Section]:
    """The report's sections in reading order."""
    return [s for build in SECTIONS.values() for s in build(r)]
