"""The tuning summary (trials.csv, summary.json, summary.md, history.png, importance.png) and the experiment
report's tuning section, drawn from summary data alone so `lorasum report` can re-render it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .figures import _plt, _png

MIN_FOR_IMPORTANCE = 2  # completed trials an importance estimate needs


def trial_rows(study) -> list[dict]:
    """One row per trial (trials that lost the race for the last slot are left out)."""
    rows = []
    names = list((study.user_attrs.get("lorasum.space") or {}).keys())
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("lorasum.surplus"):
            continue
        value = t.value if t.state.name == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append({"number": t.number, "state": t.state.name, "value": value,
                     **{n: t.params.get(n) for n in names}, "best_epoch": t.user_attrs.get("best_epoch"),
                     "worker": t.user_attrs.get("worker"), "retry_of": t.system_attrs.get("failed_trial"),
                     "duration_s": None if dur is None else round(dur, 3)})
    return rows


def importances(study) -> tuple[dict | None, str]:
    """PED-ANOVA parameter importances (Optuna's default evaluator, deterministic), or None and the reason."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < MIN_FOR_IMPORTANCE:
        return None, f"parameter importances need at least {MIN_FOR_IMPORTANCE} completed trials, have {len(done)}"
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError, ImportError) as e:
        return None, f"parameter importances unavailable: {e}"
    return {k: float(v) for k, v in imp.items()}, ""


def history_png(history: list[list], title: str) -> bytes:
    """Value per trial (dots: complete, crosses: pruned at their last reported value) and the best so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        pts = [(n, v) for n, s, v in history if s == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state.lower(), zorder=3)
    best, line = math.inf, []
    for n, s, v in sorted(history):
        if s == "COMPLETE" and v is not None:
            best = min(best, v)
        if math.isfinite(best):
            line.append((n, best))
    if line:
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    if history:
        ax.legend(fontsize=8)
    return _png(fig)


def importance_png(imp: dict | None, note: str, title: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(len(imp or {}), 2)))
    if imp:
        names = sorted(imp, key=imp.get)
        ax.barh(names, [imp[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=9)
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _range(v: dict) -> str:
    if "choices" in v:
        return "{" + ", ".join(map(_fmt, v["choices"])) + "}"
    return f"[{_fmt(v['low'])}, {_fmt(v['high'])}]" + (" log" if v.get("log") else "")


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(study, out: Path, best: dict) -> dict:
    """trials.csv, summary.json (history + importances), history.png, importance.png, summary.md."""
    rows = trial_rows(study)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    imp, note = importances(study)
    summary = {"study": study.study_name, "history": [[r["number"], r["state"], r["value"]] for r in rows],
               "importances": imp, "importance_note": note}
    atomic_write_json(out / "summary.json", summary)
    name = study.study_name
    atomic_write_bytes(out / "history.png", history_png(summary["history"], f"optimisation history: {name}"))
    atomic_write_bytes(out / "importance.png", importance_png(imp, note, f"parameter importances: {name}"))
    lines = [f"# Tuning: {study.study_name}", ""]
    if best:
        lines += [f"Best trial **{best['trial']}**: validation loss **{best['value']:.6g}** "
                  f"({best['trials']['complete']} complete, {best['trials']['pruned']} pruned of "
                  f"{best['trials']['requested']} requested; storage {best['storage']}).", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in best["tuned"].items()]
        lines += ["", f"Retrain it: `lorasum train --params {out / 'best.json'} ...` (same model, data and caps).", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += ["## Trials", "", md_table(rows), "", "![optimisation history](history.png)", ""]
    lines += ["![parameter importances](importance.png)" if imp else f"*{note}*", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    return summary


# --- the experiment report ----------------------------------------------------------------------------------------
def report_blocks(r: dict) -> list:
    """Blocks of the report's "Tuning" section (paragraphs, a table, then the marker of the tuning figures)."""
    t = r["tuning"]
    if t["mode"] == "shared":
        how = ("one set of hyperparameters was found on the pooled validation split of all domains (trained on "
               "their merged data) and used for every partition, so merged and summed models stay comparable.")
    else:
        how = ("CONFOUNDED: every partition was tuned separately (tune: per_partition), so differences between "
               "merged and summed models mix the effect of composition with that of tuning.")
    blocks: list = [f"Optuna TPE, {t['trials']} trials per study minimising validation loss (best epoch), median "
                    f"pruning on per-epoch validation loss; {how}"]
    names = sorted(t["space"])  # results.json is written with sorted keys: order explicitly, so re-renders match
    rows = [[part, f"{s['value']:.4f}" if s.get("value") is not None else "", str(s.get("trial", "")),
             *(_fmt((s.get("tuned") or {}).get(n)) for n in names)] for part, s in _studies(r)]
    space = "; ".join(f"{n} {_range(t['space'][n])}" for n in names)
    blocks.append((["partition", "best val loss", "trial", *names], rows, f"Search space: {space}."))
    blocks.append("FIGURES:" + ",".join(report_pngs(r, names_only=True)))
    return blocks


def _studies(r: dict) -> list[tuple[str, dict]]:
    """(partition, study) in the grid's order of partitions (figure names number them in this order)."""
    from .ordering import partition_order

    studies = (r.get("tuning") or {}).get("studies", {})
    return [(p, studies[p]) for p in partition_order(r, studies)]


def report_pngs(r: dict, names_only: bool = False) -> dict:
    """{figure name: PNG bytes} for every tuning study of the run (history and importances)."""
    out: dict = {}
    for i, (part, s) in enumerate(_studies(r)):
        for kind in ("history", "importance"):
            name = f"tuning_{kind}_{i}"
            if names_only:
                out[name] = None
            elif kind == "history":
                out[name] = history_png(s["history"], f"optimisation history: {part}")
            else:
                out[name] = importance_png(s.get("importances"), s.get("importance_note", ""),
                                           f"parameter importances: {part}")
    return out
