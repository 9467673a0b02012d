"""Write docs/evidence.md from two finished runs: `--preset evidence` and a `quick` run with both init modes; and
(`--baselines RUN`) write or replace its merge-methods section from a `--preset baselines` run.

    python scripts/evidence_doc.py runs/evidence runs/quick-modes --out docs/evidence.md
    python scripts/evidence_doc.py --baselines runs/baselines --out docs/evidence.md

Only aggregates go in (no records of the data); the figures are copied beside it under docs/evidence/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def _ci(x: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(x['mean'])} [{fmt.format(x['ci'][0])}, {fmt.format(x['ci'][1])}]"


def _pct(x: dict) -> str:
    return f"{x['mean']:+.1f}% [{x['ci'][0]:+.1f}, {x['ci'][1]:+.1f}]"


def _minutes(run: Path) -> str:
    t = json.loads((run / "timings.json").read_text())
    return f"{sum(v['wall_s'] for v in t.values() if isinstance(v, dict)) / 60:.1f} min of jobs"


def _label(d: str) -> str:
    """A sub-domain spec shortened for a table cell, its `|` escaped for markdown."""
    return (d if len(d) < 40 else d[:37] + "…]").replace("|", "\\|")


METHODS_HEADING = "## Which merge method? (baselines preset, 3 domains)"


def methods_section(run: Path, figs: Path, wall: str) -> list[str]:
    """Per subset: every composition ranked by validation perplexity, with test perplexity and %Δ vs merged (CIs),
    and the chosen one's paired %Δ vs the exact sum."""
    r = json.loads((run / "results.json").read_text())
    if (run / "figures" / "method_ranking.png").is_file():
        shutil.copyfile(run / "figures" / "method_ranking.png", figs / "baselines_method_ranking.png")
    when = wall or _minutes(run)
    L = [METHODS_HEADING, "",
         f"Run: `lorasum experiment --preset baselines --data-dir ../shared/data --out runs/baselines` ({when}; git "
         f"revision {r['provenance'].get('git_revision')}). Each method's hyperparameter (density, "
         "λ) and the weights of `weight_search` were chosen per subset on the validation split; the test split only "
         "reports. %Δ is against the block trained on the subset's merged data (positive: worse); `vs sum` is the "
         "paired %Δ of the method chosen on validation against the exact naive sum.", ""]
    chosen = [c for c in r["compositions"] if c.get("method_choice")]
    beaten = [c for c in chosen if c["method_choice"]["vs_sum"]["ci"][1] < 0]
    if chosen:
        gains = sorted(-c["method_choice"]["vs_sum"]["mean"] for c in chosen)
        names = sorted({c["method_choice"]["best"] for c in chosen})
        L += [f"In {len(beaten)} of {len(chosen)} subsets the method chosen on validation ({', '.join(names)}) beat "
              f"the exact naive sum on test, with the paired CI below 0: perplexity lower by {gains[0]:.1f}% to "
              f"{gains[-1]:.1f}%. The exact, unscaled sum of deltas is the paper's method; on this model and data it is "
              "not the best way to combine the blocks, and no method reaches the block trained on the merged data "
              "(every %Δ vs merged is above 0 with its CI).", ""]
    for c in chosen:
        mc = c["method_choice"]
        L += [f"**{' + '.join(c['subset'])}** — merged-data block {_ci(c['merged'])}; chosen on validation: "
              f"`{mc['best_model']}`, vs the exact sum {_pct(mc['vs_sum'])}", "",
              "| composition | validation ppl | test ppl | %Δ vs merged |", "|---|---|---|---|"]
        rows = {"sum": {"perplexity": c["summed"], "pct_change": c["pct_change"]}, **c.get("baselines", {})}
        for name, val in sorted(mc["validation_perplexity"].items(), key=lambda kv: kv[1]):
            row = rows.get(name, {})
            label = row.get("model", name).split("[")[0] if isinstance(row.get("model"), str) else name
            test = _ci(row["perplexity"]) if "perplexity" in row else ""
            pct = _pct(row["pct_change"]) if "pct_change" in row else ""
            L.append(f"| {label} | {val:.2f} | {test} | {pct} |")
        L.append("")
    L += ["![methods ranked per subset](evidence/baselines_method_ranking.png)", ""]
    return L


def write_methods(run: Path, out: Path, wall: str) -> None:
    """Replace (or append) the merge-methods section of an existing evidence.md."""
    figs = out.parent / "evidence"
    figs.mkdir(parents=True, exist_ok=True)
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    head, _, rest = text.partition(METHODS_HEADING)
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    out.write_text(head.rstrip() + "\n\n" + "\n".join(methods_section(run, figs, wall)) + tail, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("evidence", nargs="?")
    ap.add_argument("modes", nargs="?")
    ap.add_argument("--baselines", default=None, help="a --preset baselines run: write only its section")
    ap.add_argument("--baselines-wall", default="", help="measured wall time of the baselines run, as text")
    ap.add_argument("--out", default="docs/evidence.md")
    ap.add_argument("--wall", default="", help="measured wall time of the evidence run, as text")
    ap.add_argument("--modes-wall", default="", help="measured wall time of the quick two-mode run, as text")
    a = ap.parse_args()
    if a.baselines:
        write_methods(Path(a.baselines), Path(a.out), a.baselines_wall)
        return
    ev, qm, out = Path(a.evidence), Path(a.modes), Path(a.out)
    r, q = (json.loads((p / "results.json").read_text()) for p in (ev, qm))
    figs = out.parent / "evidence"
    figs.mkdir(parents=True, exist_ok=True)
    for src, name in ((ev / "figures" / "rms_vs_pct_change.png", "evidence_rms_vs_pct_change.png"),
                      (ev / "figures" / "cosine_heatmap.png", "evidence_cosine_heatmap.png"),
                      (qm / "figures" / "unlearning_curve.png", "quick_unlearning_curve.png"),
                      (qm / "figures" / "rms_vs_pct_change.png", "quick_rms_vs_pct_change.png")):
        if src.is_file():
            shutil.copyfile(src, figs / name)
    L = ["# Evidence: does RMS similarity predict the harm of summing LoRA adapters?", ""]
    cfg = r["config"]
    L += [f"Runs: `lorasum experiment --preset evidence --data-dir ../shared/data --out runs/evidence` "
          f"({a.wall or _minutes(ev)} on 2 idle CPU cores) and `lorasum experiment --preset quick --config "
          f"modes.yaml --data-dir ../shared/data --out runs/quick-modes` with `modes.yaml` = "
          f"`init_modes: [independent, shared]` ({a.modes_wall or _minutes(qm)}). Model "
          f"{cfg['model']}, {len(cfg['domains'])} sub-domains, seeds {cfg['seeds']}, {cfg['max_train']} training / "
          f"{cfg['max_test']} test records per sub-domain, init `{r['init']['primary']}`; git revision "
          f"{r['provenance'].get('git_revision')}. Every number below is in the runs' results.json.", ""]
    def claims_table(res: dict) -> list[str]:
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731  (sub-domain specs hold '|')
        return ["| claim | verdict | evidence | rule |", "|---|---|---|---|"] + [
            f"| {cell(c['claim'])} | **{c['verdict']}** | {cell(c['evidence'])} | {cell(c['rule'])} |"
            for c in res["claims"]]

    L += ["## The claims (evidence preset: 15 pairs, 2 seeds)", ""] + claims_table(r)
    L += ["", "The `quick` run (3 domains, all subsets, 1 seed, independent init) decides the two claims that need "
          "compositions of 3 blocks and unlearning:", ""] + claims_table(q)
    rc = r["recipe_check"]
    L += ["", f"Recipe check (each fundamental ≤ {rc['max_ppl_ratio']}× the base perplexity on its own domain): "
          + ("passed" if rc["passed"] else "FAILED") + " — "
          + ", ".join(f"{_label(d)} {v['ratio']:.2f}×" for d, v in rc["domains"].items()) + ".", ""]
    rel = r["fit"]["relation"]
    L += ["## RMS → %Δ over all pairs", ""]
    if rel.get("decidable"):
        sp, ols = rel["spearman"], rel["ols"]
        L += [f"n = {rel['n']} pairs of {sp['n_domains']} sub-domains. Spearman ρ = {sp['rho']:.3f}, permutation "
              f"p = {sp['p']:.3f} ({sp['test']}, {sp['permutations']} permutations); OLS slope {ols['slope']:.1f} "
              f"(domain-bootstrap {int(100 * ols['level'])}% CI {ols['ci'][0]:.1f} to {ols['ci'][1]:.1f}, "
              f"{ols['skipped']} of {ols['samples']} draws skipped). Verdict: **{rel['verdict']}** — {rel['rule']}.",
              ""]
        for g, gr in (rel.get("groups") or {}).items():
            L.append(f"- {g}: " + (f"{gr['verdict']} (ρ {gr['spearman']['rho']:.3f}, p {gr['spearman']['p']:.3f}, "
                                  f"n = {gr['n']})" if gr.get("decidable") else gr["reason"]))
        L.append("")
    else:
        L += [rel["reason"], ""]
    L += ["![RMS vs %Δ](evidence/evidence_rms_vs_pct_change.png)", "",
          "## Table 3 for every pair", "",
          "| pair | ppl merged | ppl summed | RMS | random null | same-domain ceiling | A sim | %Δ summed |",
          "|---|---|---|---|---|---|---|---|"]
    refs = r["references"]
    for c in [c for c in r["compositions"] if c["level"] == 2]:
        p = r["pairs"]["|".join(c["subset"])]
        ceil = [refs.get(d, {}).get("split", refs.get(d, {}).get("seeds")) for d in c["subset"]]
        L.append(f"| {' + '.join(_label(d) for d in c['subset'])} | {_ci(c['merged'])} | {_ci(c['summed'])} | "
                 f"{p['rms']:.4f} | {p['null']['mean']:.4f} | "
                 f"{(sum(ceil) / 2) if None not in ceil else float('nan'):.4f} | {p['factors']['A']:.3f} | "
                 f"{_pct(c['pct_change'])} |")
    n_seeds = len(cfg["seeds"])
    L += ["", f"CIs: paired bootstrap over test examples and the {n_seeds} training seed(s)"
          + (" (with 2 seeds the seed variance is barely estimated)." if n_seeds == 2 else "."), ""]
    comp = q.get("init_comparison") or {}
    L += ["## Shared vs independent LoRA initialisation (quick, 3 domains)", "",
          "| pair | RMS independent | RMS shared | A sim independent | A sim shared | %Δ independent | %Δ shared |",
          "|---|---|---|---|---|---|---|"]
    for pair, v in (comp.get("pairs") or {}).items():
        i, s = v.get("independent", {}), v.get("shared", {})
        L.append(f"| {pair.replace('|', ' + ')} | {i['rms']:.4f} | {s['rms']:.4f} | {i['factors']['A']:.3f} | "
                 f"{s['factors']['A']:.3f} | {_pct(i['pct_change'])} | {_pct(s['pct_change'])} |")
    L += ["", "## Unlearning (quick, independent init)", "", "| removed | λ = 1: ppl after | trained without | "
          "chosen λ (validation) | ppl after at chosen λ |", "|---|---|---|---|---|"]
    for u in q["unlearning"]:
        ch = u["chosen"]["weight"]
        s = next((x for x in u["sweep"] if x["weight"] == ch), None)
        L.append(f"| {u['removed']} | {_ci(u['removed_domain']['after'])} | {_ci(u['removed_domain']['without'])} | "
                 f"{'none' if ch is None else f'{ch:g}'} | {'' if s is None else _ci(s['removed'])} |")
    L += ["", "![unlearning curve](evidence/quick_unlearning_curve.png)", ""]
    out.write_text("\n".join(L) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
