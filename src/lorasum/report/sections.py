"""The report's sections, built from what results.json carries (never from the study's code): each a function of
the results in SECTIONS, in reading order (the answer, the main tables, the other figures, then the detail),
returning Sections of typed blocks (see blocks.py).

Adding a section is one function and one line in SECTIONS.
"""

from __future__ import annotations

from . import paper
from .blocks import Figures, Note, Paragraph, Section, Table
from .detail import L2P1_NEEDS, absent as _absent, per_layer_sections, weight_space_section
from .figures import available, figure_text
from .methods import method_tables
from .ordering import by_domain, model_order
from .forecast import forecast_section
from .repair import repair_section
from .routing import cost_section, prompt_table, routing_table
from .overview import HEADLINE, answer_section
from .science import init_section, references_section, table1_section, unlearning_sweep_section
from .text import ci as _ci, num as _num, pct as _pct
from .tuning import tuning_blocks

CHANGE_KEY = ("%Δ = (composed − merged)/merged perplexity: above 0 worse than merged, below 0 better (in report.html "
              "red or green where the whole interval is on that side of 0, grey where it includes 0)")


def _base(d: str) -> str:
    return d.split("[")[0]


def _best_label(bs: dict) -> str:
    return "best single" if bs.get("chosen_on") == "validation" else "best single (oracle: chosen on test)"


def _baselines(comps: list[dict], cfg: dict, ci: str) -> list:
    """Every baseline of the rows: the mean and the best single block, then any other composition."""
    return _mean_and_best(comps, cfg, ci) + _other_compositions(comps, ci) + method_tables(comps, ci)


def _other_compositions(comps: list[dict], ci: str) -> list:
    """Compositions beyond the mean and the best single block (any `baseline` composition of the grid's registry):
    perplexity and %Δ vs merged, a column pair each."""
    names = sorted({n for c in comps for n, b in c.get("baselines", {}).items()
                    if n not in ("mean", "best_single") and "method" not in b})  # merge methods: method_tables
    if not names:
        return []
    heads = ["combination", "ppl merged"] + [h for n in names for h in (f"ppl {n}", f"%Δ {n} vs merged")]
    rows = [[" + ".join(c["subset"]), _ci(c["merged"])]
            + [x for n in names for x in ((_ci(c["baselines"][n]["perplexity"]), _pct(c["baselines"][n]["pct_change"]))
                                          if n in c.get("baselines", {}) else ("", ""))] for c in comps]
    return [Table(heads, rows, f"Other compositions against the merged-data block: pooled test perplexity ({ci}); "
                               f"{CHANGE_KEY}.")]


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
                     f"Baselines against the merged-data block: the mean of the blocks (weights 1/k) and the best "
                     f"single block ({chosen}); pooled test perplexity ({ci}); {CHANGE_KEY}.")]


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
    table = Table(["combination", "ppl merged", "ppl summed", "macro merged / summed", "RMS cos",
                   *(("random null", "same-domain ceiling") if refs else ()), "%Δ summed",
                   "paper: merged / summed / RMS / %Δ"], rows,
                  f"Each pair: pooled test perplexity (exp ΣNLL/Σtokens over its test sets) of the block trained on "
                  f"its merged data and of the sum of its two fundamentals ({ci}), macro = mean of the per-domain "
                  f"perplexities, the RMS of their per-layer cosines; {CHANGE_KEY}; last column: {paper.LABEL}.")
    return _with_reference(blocks, table, matched, paper.table3_reference) + _beside(r, pairs, ci)


def _beside(r: dict, comps: list[dict], ci: str) -> list:
    """What follows Table 3 or 4: the routers (oracle, prompt, Arrow), then the baselines and merge methods."""
    return routing_table(r, comps, ci) + prompt_table(r, comps, ci) + _baselines(comps, r["config"], ci)


def _with_reference(blocks: list, table, matched: bool, reference) -> list:
    """The blocks, then the table, then the paper's own table where no row matched the paper's domains."""
    return [*blocks, table, *(() if matched else (reference(),))]


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
    table = Table(["combination", "ppl merged", "ppl composed", "macro merged / composed", "RMS cos", "%Δ",
                   "paper: merged / summed / RMS / %Δ"], rows,
                  f"The three-domain sum and each level-2 block + the remaining fundamental against the block "
                  f"trained on all three domains' merged data ({ci}); RMS between the two parts (for the sum: over "
                  f"all pairs of its blocks); {CHANGE_KEY}; last column: {paper.LABEL}.")
    return _with_reference(blocks, table, matched, paper.table4_reference) + _beside(r, triples, ci)


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
    return [Table(["removed", "model", "ppl on removed domain", "ppl on the others (pooled)"], rows,
                  "Per removed domain: test perplexity on it and on the other domains, from the base model to the "
                  "all-domain block before and after subtracting the domain's block, beside the block trained "
                  f"without it, which removal should match ({ci}); last row: the in-place removal's error.")]


def _ci_label(r: dict) -> str:
    seeds = r["config"]["seeds"]
    return (f"in brackets: {int(100 * r['config']['ci_level'])}% bootstrap CI over test examples"
            + (" and seeds" if len(seeds) > 1 else "") + ", paired for %Δ")


def findings_table(items: list[dict]) -> Table:
    """Every verdict by subject: claim, subject, verdict (a badge), evidence."""
    return Table(["claim", "subject", "verdict", "evidence"],
                 [[f["claim"], f["subject"], f["verdict"], f["evidence"]] for f in items],
                 "Every verdict behind the claims, one row per pair, composition or removed domain; green agrees with "
                 "the paper's claim, red contradicts it, grey decides nothing.", verdicts=2, style="findings")


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
            f"only where perplexity after removal lies within the CI of the model trained without that domain; the "
            f"oracle router 'reaches' the merged block only where its %Δ CI includes or lies below 0; a cost is "
            f"'interference' only where the composition's %Δ CI vs the oracle router lies above 0, and lands on a "
            f"domain only where its %Δ CI vs that domain's own block lies above 0. "
            f"Every perplexity CI covers {cover}.")


def findings_section(r: dict) -> list[Section]:
    return [Section("Findings — every verdict by subject", [findings_table(r["findings"]), Paragraph(_rules(r))])]


def tuning_section(r: dict) -> list[Section]:
    return [Section("Tuning", tuning_blocks(r))] if r.get("tuning") else []


def tables_3_4(r: dict) -> list[Section]:
    ci = _ci_label(r)
    return [Section("Table 3 — pairs: merged-data vs summed fundamentals", _table3(r, ci)),
            Section("Table 4 — three-domain compositions", _table4(r, ci))]


def perplexity_matrix(r: dict) -> list[Section]:
    doms = r["config"]["domains"]
    cell = lambda row, k: _ci(row[k]) if k in row else ""  # noqa: E731  (eval_scope own leaves cells out)
    order = model_order(r)
    rows = [[m, *(cell(r["perplexity"][m], d) for d in doms), cell(r["perplexity"][m], "pooled")] for m in order]
    pooled = {m: r["perplexity"][m]["pooled"]["mean"] for m in order if "pooled" in r["perplexity"][m]}
    best = min(pooled, key=pooled.get) if pooled else None
    summary = f"{len(rows)} models × {len(doms)} domains" + (
        f"; lowest pooled perplexity {_num(pooled[best])} ({best})" if best else "")
    return [Section("Perplexity of every model on every domain", [Table(
        ["model", *doms, "pooled"], rows, f"Test perplexity of each model (rows, in the grid's order) on each domain "
                                          f"and pooled over all of them; lower is better ({_ci_label(r)}).")],
        summary=summary)]


def unlearning_section(r: dict) -> list[Section]:
    return [Section("Unlearning — all-domain block minus one fundamental", _unlearning(r, _ci_label(r)))]


def figures_section(r: dict) -> list[Section]:
    """The figures after the headline one (which leads the report)."""
    names = tuple(n for n in available(r) if n not in (HEADLINE, "forecast"))  # forecast: beside its table
    texts = [figure_text(r, n) for n in names]
    return [Section("Figures", [Figures(names, tuple(a for a, _ in texts), tuple(c for _, c in texts))])]


def data_section(r: dict) -> list[Section]:
    stats = r["data"].get("stats") or []
    rows = [[s["domain"], s["split"], str(s["records"]), str(s["tokens"]), f"{100 * s['truncated_share']:.1f}%",
             f"{100 * s['answer_token_share']:.1f}%", str(s["answer_cut_off"])] for s in stats]
    length = r["config"]["train"]["max_length"]
    cut = sum(s["answer_cut_off"] for s in stats)
    split = {sp: sum(s["records"] for s in stats if s["split"] == sp) for sp in ("train", "validation", "test")}
    summary = (f"{len({s['domain'] for s in stats})} domains; " + ", ".join(f"{n} {sp}" for sp, n in split.items())
               + f" records; {cut} answers cut off at {length} tokens") if stats else "no data statistics"
    return [Section("Data", [Table(["domain", "split", "records", "tokens", "truncated", "answer tokens",
                                    "answer cut off"], rows,
                                   f"Records and tokens per domain and split after caps, at max length {length}: the "
                                   "share of records truncated, of tokens in answers, and answers cut off entirely.")],
                    summary=summary)]


def _shown(key: str, value) -> str:
    """A provenance value as text; an absent one says what its absence means."""
    if value is not None:
        return str(value)
    return {"cuda": "no CUDA (a CPU-only torch)", "git_revision": "not a git checkout"}.get(key, "not installed")


def provenance_section(r: dict) -> list[Section]:
    cfg, prov = r["config"], r["provenance"]
    rows = ([[k, _shown(k, v)] for k, v in sorted(prov.items())]
            + [["config hash", r["config_hash"]], ["model", cfg["model"]], ["seeds", ", ".join(map(str, cfg["seeds"]))]]
            + ([["tuning", f"{r['tuning']['mode']}, {r['tuning']['trials']} trials"
                 + (" (confounded)" if r["tuning"]["confounded"] else "")]] if r.get("tuning") else []))
    summary = ", ".join(f"{k} {str(prov[k])[:12]}" for k in ("lorasum", "git_revision", "torch", "device") if k in prov)
    return [Section("Provenance", [Table(["item", "value"], rows, "The versions, revision and config this run was "
                                                                   "made with, to reproduce it.")],
                    summary=summary or "no provenance")]


SECTIONS = {
    "claims": answer_section,
    "tables_3_4": tables_3_4,
    "figures": figures_section,
    "cost_by_domain": cost_section,
    "repair": repair_section,
    "forecast": forecast_section,
    "findings": findings_section,
    "tuning": tuning_section,
    "init": init_section,
    "references": references_section,
    "unlearning": unlearning_section,
    "unlearning_sweep": unlearning_sweep_section,
    "perplexity": perplexity_matrix,
    "per_layer": per_layer_sections,
    "weight_space": weight_space_section,
    "table1": table1_section,
    "data": data_section,
    "provenance": provenance_section,
}


def sections(r: dict) -> list[Section]:
    """The report's sections in reading order."""
    return [s for build in SECTIONS.values() for s in build(r)]
