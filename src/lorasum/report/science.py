"""The report's science beyond the main tables: where each pair's RMS sits between the random null
and the same-domain ceiling, the effect of the LoRA initialisation, the unlearning sweep, Table 1 and speed.

All of it reads results.json (schema 2); a results file of schema 1 has none of these keys and gets none of
these sections.
"""

from __future__ import annotations

from .repair import repair_timing_table
from .routing import serving_cost_table
from .blocks import Note, Paragraph, Section, Table
from .ordering import by_domain, model_order, pair_order
from .text import ci, num


def _f(x, fmt: str = "{:.4f}") -> str:
    return "" if x is None else fmt.format(x)


def references_section(r: dict) -> list[Section]:
    """Each pair's RMS between 'unrelated' (two random deltas of the same shapes) and 'same domain'."""
    pairs = r.get("pairs", {})
    if not any("null" in p for p in pairs.values()):
        return []
    refs = r.get("references") or {}
    rows = []
    for name in pair_order(r):
        p = pairs[name]
        fac = p.get("factors") or {}
        rows.append([" + ".join(p["domains"]), f"{p['rms']:.4f}", f"{p['null']['mean']:.4f} ± {p['null']['sd']:.4f}",
                     _f(p.get("ceiling")), _f(fac.get("A"), "{:.3f}"), _f(fac.get("B"), "{:.3f}")])
    blocks: list = [Table(["pair", "RMS cos", "random null (mean ± sd)", "same-domain ceiling", "A row-space sim",
                           "B column-space sim"], rows,
                          "Random null: RMS between two independent random deltas with the same factor shapes. "
                          "Ceiling: mean of the two domains' same-domain RMS (a disjoint second sample of the "
                          "domain's training records, initialised as the pairs are; else the fundamental trained with "
                          "a second seed). Subspace "
                          "similarity: mean over layers of the mean squared cosine of the principal angles (1: the "
                          "same row/column space, e.g. a shared LoRA initialisation).")]
    drows = [[d, _f(refs[d].get("split")), _f(refs[d].get("seeds"))] for d in by_domain(r, refs)]
    missing = [d for d in r["config"]["domains"] if "split" not in refs.get(d, {})]
    if drows:
        blocks.append(Table(["domain", "RMS: two disjoint samples", "RMS: two seeds"], drows,
                            "Each domain's same-domain RMS: between two adapters of that domain (two disjoint samples "
                            "of its records, or two seeds), the ceiling a pair's RMS is judged against."))
    if missing:
        blocks.append(Note(f"no split-sample ceiling for {', '.join(missing)}: it needs twice the training records a "
                           "fundamental uses (max_train)."))
    return [Section("References — where each pair sits between unrelated and same-domain", blocks)]


def init_section(r: dict) -> list[Section]:
    comp = r.get("init_comparison")
    init = r.get("init")
    if init is None:
        return [Section("LoRA initialisation", [Note("results written before initialisation became a recorded "
                                                     "choice: every adapter of that run started from one shared A.")])]
    if not comp:
        return [Section("LoRA initialisation", [Paragraph(
            f"Every adapter started from a LoRA A of its own ('{init['primary']}' mode: its init seed derives from "
            "(partition, seed) by sha256)." if init["primary"] == "independent" else
            "Every adapter trained with one seed started from the same LoRA A ('shared' mode), so the row spaces "
            "of all deltas are tied by their initialisation.")])]
    modes = comp["modes"]
    heads = ["pair"] + [f"{h} ({m})" for m in modes for h in ("RMS", "A sim", "%Δ summed")]
    rows = []
    for name in pair_order(r, comp["pairs"]):
        row = [" + ".join(r["pairs"][name]["domains"]) if name in r["pairs"] else name]
        for m in modes:
            v = comp["pairs"][name].get(m) or {}
            pc = v.get("pct_change")
            row += [_f(v.get("rms")), _f((v.get("factors") or {}).get("A"), "{:.3f}"),
                    "" if pc is None else f"{pc['mean']:+.1f}% [{pc['ci'][0]:+.1f}, {pc['ci'][1]:+.1f}]"]
        rows.append(row)
    return [Section("LoRA initialisation — independent vs shared", [Table(heads, rows, (
        f"The same grid trained in each mode; the rest of this report shows '{modes[0]}'. A sim near 1 means the "
        "adapters' A factors span the same row space: their deltas are tied by the initialisation, not the data."))])]


def unlearning_sweep_section(r: dict) -> list[Section]:
    rows, notes = [], []
    for u in r.get("unlearning", []):
        if "sweep" not in u:
            return []
        chosen = u["chosen"]["weight"]
        for s in u["sweep"]:
            rows.append([u["removed"], f"{s['weight']:g}" + (" ← chosen" if s["weight"] == chosen else ""),
                         num(s["validation_removed"]),
                         ", ".join(f"{o} {num(v)}" for o, v in s["validation_others"].items()),
                         ci(s["removed"]), num(s["others"]["mean"])])
        ref = u["validation_reference"]
        notes.append(f"{u['removed']}: {u['chosen']['rule']} (trained without it: validation ppl "
                     f"{num(ref['without'])}; before removal: "
                     + ", ".join(f"{o} {num(v)}" for o, v in ref["before"].items()) + ").")
    if not rows:
        return []
    return [Section("Subtraction weight λ — unlearning with λ chosen on validation", [
        Table(["removed", "λ", "val ppl removed", "val ppl others (before: see note)", "test ppl removed",
               "test ppl others (pooled)"], rows,
              "base + all-domain block − λ · fundamental for each λ: perplexity on the removed domain should fall "
              "towards the block trained without it while the others stay put; λ is chosen on the validation "
              "split, then reported on test."), *(Paragraph(n) for n in notes)])]


def table1_section(r: dict) -> list[Section]:
    t = r.get("table1")
    if not t:
        return []
    rows = [[x["layer"], "×".join(map(str, x["A_shape"])), "×".join(map(str, x["B_shape"])),
             ", ".join(f"{v:.4f}" for v in x["A_first"]), ", ".join(f"{v:.4f}" for v in x["B_first"]),
             f"{x['scale']:g}"] for x in t["layers"]]
    return [Section("Table 1 — sample LoRA layers", [Table(
        ["layer", "A (r × in)", "B (out × r)", "A[0, :3]", "B[0, :3]", "scale α/r"], rows,
        f"Three layers of {t['adapter']} (seed {t['seed']}): factor shapes and first values, where ΔW = scale · B A "
        "(transposed for Conv1D, paper eq. 1).")],
        summary=f"{len(rows)} layers of {t['adapter']}: shapes and first values of A and B")]


def speed_section(r: dict, timings: dict) -> list[Section]:
    """Compose + apply time of each composed model beside the training time of the merged-data block it stands in
    for (the paper's 'few seconds'), from timings.json: wall times stay out of results.json."""
    primary = (r.get("init") or {}).get("primary")
    models = r.get("models", {})
    entries = [t for t in timings.values() if isinstance(t, dict) and isinstance(t.get("wall_s"), (int, float))
               and t.get("init") == primary]
    train: dict = {}
    for t in entries:
        if t.get("kind") == "train" and "repair" not in t:
            train.setdefault(t.get("partition"), []).append(t["wall_s"])  # one per seed
    apply: dict = {}
    for t in entries:
        m = models.get(t.get("model"))
        if t.get("kind") == "eval" and "apply_s" in t and m and m["kind"] not in ("base", "adapter"):
            apply.setdefault(t["model"], []).append(t["apply_s"])
    rows = []
    for name in model_order(r, [n for n in models if n in apply]):
        part = "+".join(models[name]["subset"]) if models[name]["kind"] != "unlearn" else None
        trained = train.get(part)
        rows.append([name, f"{1000 * sum(apply[name]) / len(apply[name]):.1f} ms",
                     "" if not trained else f"{sum(trained) / len(trained):.1f} s"])
    repairs = repair_timing_table(entries, train) + serving_cost_table(entries)
    if not rows:
        return [Section("Speed — repairs and serving", repairs)] if repairs else []
    applied = [1000 * sum(v) / len(v) for v in apply.values()]
    trains = [sum(v) / len(v) for v in train.values()]
    return [Section("Speed — composing instead of training", [Table(
        ["composed model", "compose + apply (mean over its evals)", "training its subset's merged-data block "
                                                                    "(mean over seeds)"], rows,
        "What composing a model costs beside training the block it stands in for: wall times on this machine, "
        "from timings.json (not results.json, which stays deterministic).")] + repairs,
        summary=f"{len(rows)} composed models: {min(applied):.1f} to {max(applied):.1f} ms to compose and apply"
                + (f"; training a block: {min(trains):.1f} to {max(trains):.1f} s" if trains else ""))]
