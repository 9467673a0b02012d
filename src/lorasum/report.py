"""report.md and a self-contained report.html (figures embedded) from results.json alone.

`lorasum report RUN_DIR` re-renders without recomputing anything.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from . import paper
from .errors import LorasumError
from .figures import FIGURES, kind_key, split_layer
from .files import atomic_write_bytes, atomic_write_text
from .findings import findings_paragraph
from .ordering import by_domain, model_order, pair_order


L2P1_NEEDS = "a level-2 block + fundamental needs a subset of 3 domains"


class Note(str):
    """A one-line remark under a heading (why a table is absent or incomplete); rendered in italics."""


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
    return notes + [(["combination", "ppl merged", "ppl mean (1/k)", "%Δ mean vs merged", f"{label}: block",
                      f"ppl {label}", "%Δ best single vs merged"], rows,
                     f"Baselines. Best single block: {chosen}. Pooled test perplexity, {ci}.")]


def _table3(r: dict, ci: str) -> list:
    cfg, blocks, rows, matched = r["config"], [], [], False
    if "sum" not in cfg["compositions"]:
        blocks.append(Note("summed rows skipped: 'sum' is not in compositions."))
    pairs = [c for c in r["compositions"] if c["level"] == 2]
    for c in pairs:
        ref = paper.TABLE3.get(frozenset(_base(d) for d in c["subset"]))
        matched |= ref is not None
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(c["summed"]) if "summed" in c else "",
                     f"{_num(c.get('merged_macro'))} / {_num(c.get('summed_macro'))}", f"{c['rms']:.4f}",
                     _pct(c["pct_change"]) if "pct_change" in c else "", paper.cell(ref)])
    blocks.append((["combination", "ppl merged", "ppl summed", "macro merged / summed", "RMS cos", "%Δ summed",
                    "paper: merged / summed / RMS / %Δ"], rows,
                   f"Pooled test perplexity (exp ΣNLL/Σtokens over the pair's test sets), {ci}; macro = mean of the "
                   "per-domain perplexities. %Δ = (summed − merged)/merged. Last column: " + paper.LABEL + "."))
    if not matched:
        blocks.append(paper.table3_reference())
    return blocks + _baselines(pairs, cfg, ci)


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
    blocks.append((["combination", "ppl merged", "ppl composed", "macro merged / composed", "RMS cos", "%Δ",
                    "paper: merged / summed / RMS / %Δ"], rows,
                   f"{ci}. RMS for a level-2 block + fundamental is between the two parts; for the sum, over all "
                   f"pairs of its blocks. Last column: {paper.LABEL}."))
    if not matched:
        blocks.append(paper.table4_reference())
    return blocks + _baselines(triples, cfg, ci)


def _per_layer_sections(r: dict) -> list[tuple[str, list]]:
    """Table 2 (pairs), each block vs the sum of the others, Table 5 (level-2 block vs remaining fundamental)."""
    cfg, out, blocks = r["config"], [], []
    for name in pair_order(r):
        p = r["pairs"][name]
        h, rows = _layer_table(p["layers"])
        blocks.append((h, rows, f"Cosine per layer, {name.replace('|', ' vs ')} (RMS {p['rms']:.4f})"))
    out.append(("Table 2 — per-layer cosine similarity of fundamental blocks", blocks))
    triples = [c for c in r["compositions"] if c["level"] >= 3]
    blocks = [n for n in (_absent(cfg, 3, None, "each block vs the other two needs a subset of 3 domains"),) if n]
    for c in triples:
        bvr = c.get("block_vs_rest", {})
        for d in by_domain(r, bvr):
            v = bvr[d]
            if isinstance(v, dict):
                h, rows = _layer_table(v["layers"])
                rest = " + ".join(x for x in c["subset"] if x != d)
                blocks.append((h, rows, f"{d} block vs the sum ({rest}) (RMS {v['rms']:.4f}); RMS over all block "
                                        f"pairs of {' + '.join(c['subset'])}: {c['rms']:.4f}"))
            else:  # results.json written before per-layer cosines were kept
                blocks.append(Note(f"{d} block vs the sum of the others: RMS {v:.4f} (no per-layer values)."))
    out.append(("Each fundamental block vs the sum of the others", blocks))
    blocks = [n for n in (_absent(cfg, 3, "level2_plus_one", L2P1_NEEDS),) if n]
    for c in [c for c in triples if c["level"] == 3]:
        l2p1 = c.get("level2_plus_one", {})
        for d in by_domain(r, l2p1):
            h, rows = _layer_table(l2p1[d]["layers"])
            blocks.append((h, rows, f"({l2p1[d]['level2']}) block vs {d} block (RMS {l2p1[d]['rms']:.4f})"))
    out.append(("Table 5 — per-layer cosine, level-2 block vs remaining fundamental", blocks))
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
    return [(["removed", "model", "ppl on removed domain", "ppl on the others (pooled)"], rows, ci)]


def _weight_space(r: dict) -> list:
    rows = [[" + ".join(c["subset"]), f"{c['weight_space']['mean_cos']:.4f}", f"{c['weight_space']['rms']:.4f}",
             f"{c['weight_space']['norm_ratio']:.3f}"] for c in r["compositions"]]
    blocks: list = [(["subset", "mean cos(Σ, merged)", "RMS cos", "‖Σ‖/‖merged‖"], rows,
                     "Summary: cosine between the summed deltas and the delta trained on merged data (mean and RMS "
                     "over layers); norm ratio over all layers.")]
    for c in r["compositions"]:
        h, rows = _layer_table(c["weight_space"]["layers"],
                               lambda v: f"{v['cos']:.3f} / {_num(v.get('norm_ratio'))}")
        blocks.append((h, rows, f"{' + '.join(c['subset'])}: per layer, cos(Σ blocks, merged block) / "
                                "‖Σ‖/‖merged‖"))
    return blocks


def sections(r: dict) -> list[tuple[str, list]]:
    """(heading, blocks) where a block is a paragraph string, a Note or a (headers, rows, caption) table."""
    cfg, out = r["config"], []
    seeds = cfg["seeds"]
    ci = (f"[{int(100 * cfg['ci_level'])}% bootstrap CI over test examples" + (" and seeds" if len(seeds) > 1 else "")
          + "; paired for %Δ]")
    out.append(("Findings", [findings_paragraph(r["findings"]),
                             "Rules: 'summed ≈ merged' only where the %Δ CI lies within ±10%; a RMS relation only "
                             "where the slope CI (fit over pairs, each the mean over seeds) excludes 0; unlearning "
                             "'restores' only where perplexity after removal lies within the CI of the model trained "
                             "without that domain."]))
    if r.get("tuning"):  # issue 5: tuning section; per-partition tuning confounds merged vs summed
        from .tune_report import report_blocks

        if r["tuning"]["confounded"]:
            out[-1][1].append("Caution: hyperparameters were tuned per partition (tune: per_partition), so every "
                              "merged-vs-summed comparison above is confounded by tuning.")
        out.append(("Tuning", report_blocks(r)))
    out.append(("Table 3 — pairs: merged-data vs summed fundamentals", _table3(r, ci)))
    out.append(("Table 4 — three-domain compositions", _table4(r, ci)))
    out += _per_layer_sections(r)
    doms = cfg["domains"]
    rows = [[m, *(_ci(r["perplexity"][m][d]) for d in doms), _ci(r["perplexity"][m]["pooled"])]
            for m in model_order(r)]
    out.append(("Perplexity of every model on every domain", [(["model", *doms, "pooled"], rows, ci)]))
    out.append(("Unlearning — all-domain block minus one fundamental", _unlearning(r, ci)))
    out.append(("Weight space — Σ fundamentals vs the merged-data block", _weight_space(r)))
    fit = r["fit"]
    unit = "pairs (each the mean over seeds)" if len(seeds) > 1 else "pairs"
    if fit.get("slope") is None:
        fit_txt = "Too few points for a fit."
    else:
        fit_txt = (f"Fit over {fit['n']} {unit}: y = {fit['slope']:.2f}x {fit['intercept']:+.2f}, r² {fit['r2']:.3f}"
                   + (f", slope CI [{fit['slope_ci'][0]:.1f}, {fit['slope_ci'][1]:.1f}]." if fit.get("slope_ci")
                      else ", too few points for a slope CI."))
    out.append(("Figures", [fit_txt + f" Paper (GPT-2 small, their data): {paper.FIT}.", "FIGURES"]))
    stats = r["data"].get("stats") or []
    rows = [[s["domain"], s["split"], str(s["records"]), str(s["tokens"]), f"{100 * s['truncated_share']:.1f}%",
             f"{100 * s['answer_token_share']:.1f}%", str(s["answer_cut_off"])] for s in stats]
    out.append(("Data", [(["domain", "split", "records", "tokens", "truncated", "answer tokens", "answer cut off"],
                          rows, f"After caps, at max length {cfg['train']['max_length']}.")]))
    prov = r["provenance"]
    out.append(("Provenance", [(["item", "value"], [[k, str(v)] for k, v in sorted(prov.items())] +
                                [["config hash", r["config_hash"]], ["model", cfg["model"]],
                                 ["seeds", ", ".join(map(str, seeds))]] +
                                ([["tuning", f"{r['tuning']['mode']}, {r['tuning']['trials']} trials"
                                   + (" (confounded)" if r["tuning"]["confounded"] else "")]]
                                 if r.get("tuning") else []), "")]))
    return out


def render_md(r: dict) -> str:
    lines = ["# lorasum experiment report", ""]
    for head, blocks in sections(r):
        lines += [f"## {head}", ""]
        for b in blocks:
            if b == "FIGURES":
                lines += [f"![{n}](figures/{n}.png)" for n in FIGURES] + [""]
            elif isinstance(b, Note):
                lines += [f"*{b}*", ""]
            elif isinstance(b, str) and b.startswith("FIGURES:"):  # a section's own figures (tuning)
                lines += [f"![{n}](figures/{n}.png)" for n in b[8:].split(",") if n] + [""]
            elif isinstance(b, str):
                lines += [b, ""]
            else:
                h, rows, cap = b
                lines += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
                lines += ([f"*{cap}*"] if cap else []) + [""]
    return "\n".join(lines)


def render_html(r: dict, pngs: dict[str, bytes]) -> str:
    e = html.escape
    body = []
    for head, blocks in sections(r):
        body.append(f"<h2>{e(head)}</h2>")
        for b in blocks:
            if isinstance(b, str) and b.startswith("FIGURES"):  # the report's figures, or a section's own
                names = list(FIGURES) if b == "FIGURES" else [n for n in b[8:].split(",") if n]
                body += [f'<figure><img alt="{n}" src="data:image/png;base64,{base64.b64encode(pngs[n]).decode()}">'
                         f"<figcaption>{e(n.replace('_', ' '))}</figcaption></figure>" for n in names]
            elif isinstance(b, Note):
                body.append(f"<p class=note>{e(b)}</p>")
            elif isinstance(b, str):
                body.append(f"<p>{e(b).replace('**', '')}</p>")
            else:
                h, rows, cap = b
                body.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in h) + "</tr></thead><tbody>"
                            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
                            + "</tbody></table>" + (f"<p class=cap>{e(cap)}</p>" if cap else ""))
    style = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             ".cap{color:#555;font-size:12px;margin-top:0}.note{color:#8a5a00;font-style:italic}"
             "img{max-width:100%}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>lorasum report</title><style>{style}</style>"
            f"</head><body><h1>lorasum experiment report</h1>{''.join(body)}</body></html>\n")


RESULTS_KEYS = ("schema", "config", "models", "perplexity", "pairs", "compositions", "unlearning", "recipe_check",
                "fit", "data", "provenance", "findings")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0]


def read_results(run_dir: Path) -> dict:
    """RUN_DIR/results.json, refused in one line when it is missing, unreadable or not a lorasum results file."""
    path = run_dir / "results.json"
    if not path.is_file():
        raise LorasumError(f"{path} not found; run `lorasum experiment --out {run_dir}` first")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorasumError(f"{path} is not a lorasum results file ({type(e).__name__}); regenerate it with "
                           f"`lorasum experiment --config {run_dir / 'config.json'} --out {run_dir}`") from None
    if not isinstance(results, dict):
        what = f"a JSON {type(results).__name__}, not an object"
    else:
        missing = [k for k in RESULTS_KEYS if k not in results]
        ok_schema = str(results.get("schema")).startswith("lorasum.results/")
        what = f"missing {', '.join(missing)}" if missing else "" if ok_schema else f"schema {results['schema']!r}"
    if what:
        raise LorasumError(f"{path} is not a lorasum results file ({what}); "
                           f"regenerate it with `lorasum experiment --config {run_dir / 'config.json'} "
                           f"--out {run_dir}`")
    return results


def write_report(run_dir: str | Path, results: dict | None = None) -> Path:
    """Write figures/*.png, report.md and report.html from results.json (atomic writes).

    Everything is rendered before the first file is written, so a damaged results.json changes nothing.
    """
    run_dir = Path(run_dir)
    from_file = results is None
    if from_file:
        results = read_results(run_dir)
    try:
        pngs = {name: fn(results) for name, fn in FIGURES.items()}
        if results.get("tuning"):
            from .tune_report import report_pngs

            pngs.update(report_pngs(results))
        md, html = render_md(results), render_html(results, pngs)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if not from_file:
            raise
        raise LorasumError(f"{run_dir / 'results.json'} is not a lorasum results file ({type(e).__name__}: {_first_line(e)}); "
                           f"regenerate it with `lorasum experiment --config {run_dir / 'config.json'} "
                           f"--out {run_dir}`") from None
    for name, png in pngs.items():
        atomic_write_bytes(run_dir / "figures" / f"{name}.png", png)
    atomic_write_text(run_dir / "report.md", md)
    atomic_write_text(run_dir / "report.html", html)
    return run_dir / "report.html"
