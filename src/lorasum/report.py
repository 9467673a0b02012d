"""report.md and a self-contained report.html (figures embedded) from results.json alone.

`lorasum report RUN_DIR` re-renders without recomputing anything.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import LorasumError
from .figures import FIGURES, split_layer
from .files import atomic_write_bytes, atomic_write_text
from .findings import findings_paragraph

# The paper's published values (GPT-2 small, their data), shown beside ours and labelled as the paper's.
PAPER_TABLE3 = {frozenset({"math", "medicine"}): (482.87, 438.94, 0.0514, -9.10),
                frozenset({"math", "finance"}): (93.83, 98.09, 0.0583, 4.54),
                frozenset({"finance", "medicine"}): (205.62, 262.29, 0.0708, 27.56)}
PAPER_TABLE4 = {"sum": (127.76, 191.28, None, 49.67), "math": (127.76, 238.52, 0.0714, 86.60),
                "medicine": (127.76, 194.12, 0.0824, 51.94), "finance": (127.76, 260.35, 0.0872, 103.76)}
PAPER_FIT = "y = 1883.89x − 105.68"


def _ci(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['mean'])} [{fmt.format(x['ci'][0])}, {fmt.format(x['ci'][1])}]"


def _pct(x: dict) -> str:
    return f"{x['mean']:+.1f}% [{x['ci'][0]:+.1f}, {x['ci'][1]:+.1f}]"


def _base(d: str) -> str:
    return d.split("[")[0]


def _layer_table(layers: dict) -> tuple[list[str], list[list[str]]]:
    """Per-layer values as rows = block index, columns = module (the paper's Table 2 layout)."""
    kinds = sorted({split_layer(n)[1] for n in layers}, key=lambda k: ("mlp" in k or "down" in k, k))
    idx = sorted({split_layer(n)[0] for n in layers})
    cell = {split_layer(n): v for n, v in layers.items()}
    return ["layer", *kinds], [[str(i), *(f"{cell[(i, k)]:.4f}" if (i, k) in cell else "" for k in kinds)] for i in idx]


def sections(r: dict) -> list[tuple[str, list]]:
    """(heading, blocks) where a block is a paragraph string or a (headers, rows, caption) table."""
    cfg, out = r["config"], []
    seeds = cfg["seeds"]
    ci = (f"[{int(100 * cfg['ci_level'])}% bootstrap CI over test examples" + (" and seeds" if len(seeds) > 1 else "")
          + "; paired for %Δ]")
    out.append(("Findings", [findings_paragraph(r["findings"]),
                             "Rules: 'summed ≈ merged' only where the %Δ CI lies within ±10%; a RMS relation only where "
                             "the slope CI excludes 0; unlearning 'restores' only where perplexity after removal lies "
                             "within the CI of the model trained without that domain."]))
    if r.get("tuning"):  # issue 5: tuning section; per-partition tuning confounds merged vs summed
        from .tune_report import report_blocks

        if r["tuning"]["confounded"]:
            out[-1][1].append("Caution: hyperparameters were tuned per partition (tune: per_partition), so every "
                              "merged-vs-summed comparison above is confounded by tuning.")
        out.append(("Tuning", report_blocks(r)))
    pairs = [c for c in r["compositions"] if c["level"] == 2]
    rows = []
    for c in pairs:
        paper = PAPER_TABLE3.get(frozenset(_base(d) for d in c["subset"]))
        base = c.get("baselines", {})
        rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(c["summed"]) if "summed" in c else "",
                     f"{c['rms']:.4f}", _pct(c["pct_change"]) if "pct_change" in c else "",
                     _pct(base["mean"]["pct_change"]) if "mean" in base else "",
                     f"{base['best_single']['block']}: {_pct(base['best_single']['pct_change'])}" if "best_single" in base else "",
                     f"{paper[0]:.2f} / {paper[1]:.2f} / {paper[2]:.4f} / {paper[3]:+.2f}%" if paper else "—"])
    out.append(("Table 3 — pairs: merged-data vs summed fundamentals", [
        (["combination", "ppl merged", "ppl summed", "RMS cos", "%Δ summed", "%Δ mean (1/k)", "%Δ best single",
          "paper: merged / summed / RMS / %Δ"], rows,
         f"Pooled test perplexity (exp ΣNLL/Σtokens over the pair's test sets), {ci}. %Δ = (summed − merged)/merged."
         " Paper's values: GPT-2 small, their data.")]))
    triples = [c for c in r["compositions"] if c["level"] == 3]
    if triples:
        rows = []
        for c in triples:
            paper_ok = {_base(d) for d in c["subset"]} == {"math", "medicine", "finance"}
            p = PAPER_TABLE4["sum"] if paper_ok else None
            rows.append([" + ".join(c["subset"]), _ci(c["merged"]), _ci(c["summed"]) if "summed" in c else "",
                         f"{c['rms']:.4f} (all pairs)", _pct(c["pct_change"]) if "pct_change" in c else "",
                         f"{p[0]:.2f} / {p[1]:.2f} / — / {p[3]:+.2f}%" if p else "—"])
            for d, l2 in c.get("level2_plus_one", {}).items():
                p = PAPER_TABLE4.get(_base(d)) if paper_ok else None
                rows.append([f"({l2['level2']}) + {d}", _ci(c["merged"]), _ci(l2["perplexity"]), f"{l2['rms']:.4f}",
                             _pct(l2["pct_change"]), f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.4f} / {p[3]:+.2f}%" if p else "—"])
        out.append(("Table 4 — three-domain compositions", [
            (["combination", "ppl merged", "ppl composed", "RMS cos", "%Δ", "paper: merged / summed / RMS / %Δ"], rows,
             f"{ci}. RMS for a level-2 block + fundamental is between the two parts.")]))
    blocks = []
    for name, p in r["pairs"].items():
        h, rows = _layer_table(p["layers"])
        blocks.append((h, rows, f"Cosine per layer, {name.replace('|', ' vs ')} (RMS {p['rms']:.4f})"))
    out.append(("Table 2 — per-layer cosine similarity of fundamental blocks", blocks))
    blocks = []
    for c in triples:
        for d, l2 in c.get("level2_plus_one", {}).items():
            h, rows = _layer_table(l2["layers"])
            blocks.append((h, rows, f"({l2['level2']}) block vs {d} block (RMS {l2['rms']:.4f})"))
    if blocks:
        out.append(("Table 5 — per-layer cosine, level-2 block vs remaining fundamental", blocks))
    doms = cfg["domains"]
    rows = [[m, *(_ci(v[d]) for d in doms), _ci(v["pooled"])] for m, v in r["perplexity"].items()]
    out.append(("Perplexity of every model on every domain", [(["model", *doms, "pooled"], rows, ci)]))
    if r["unlearning"]:
        rows = []
        for u in r["unlearning"]:
            for label, key in (("base", "base"), ("all domains (before)", "before"), ("after removal", "after"),
                               (f"trained without ({u['without_model']})", "without")):
                rows.append([u["removed"], label, _ci(u["removed_domain"][key]), _ci(u["other_domains"][key])])
            rows.append([u["removed"], "in-place check: rel. error vs direct sum",
                         f"{u['inplace_check']['rel_error_weights']:.1e} (weights)",
                         f"{u['inplace_check']['rel_error_delta']:.1e} (delta)"])
        out.append(("Unlearning — all-domain block minus one fundamental", [
            (["removed", "model", "ppl on removed domain", "ppl on the others (pooled)"], rows, ci)]))
    rows = [[" + ".join(c["subset"]), f"{c['weight_space']['mean_cos']:.4f}", f"{c['weight_space']['rms']:.4f}",
             f"{c['weight_space']['norm_ratio']:.3f}"] for c in r["compositions"]]
    out.append(("Weight space — Σ fundamentals vs the merged-data block", [
        (["subset", "mean cos(Σ, merged)", "RMS cos", "‖Σ‖/‖merged‖"], rows,
         "Per-layer cosine between the summed deltas and the delta trained on merged data; norm ratio over all layers.")]))
    fit = r["fit"]
    fit_txt = (f"Fit over {fit['n']} (pair, seed) points: y = {fit['slope']:.2f}x {fit['intercept']:+.2f}, "
               f"r² {fit['r2']:.3f}" + (f", slope CI [{fit['slope_ci'][0]:.1f}, {fit['slope_ci'][1]:.1f}]"
                                        if fit.get("slope_ci") else ", too few points for a slope CI")
               if fit.get("slope") is not None else "Too few points for a fit.")
    out.append(("Figures", [fit_txt + f" Paper (GPT-2 small): {PAPER_FIT}.", "FIGURES"]))
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
            elif isinstance(b, str) and b.startswith("FIGURES:"):  # a section's own figures (tuning)
                lines += [f"![{n}](figures/{n}.png)" for n in b[8:].split(",") if n] + [""]
            elif isinstance(b, str):
                lines += [b, ""]
            else:
                h, rows, cap = b
                lines += ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
                lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
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
             ".cap{color:#555;font-size:12px;margin-top:0}img{max-width:100%}figure{margin:1em 0}")
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
