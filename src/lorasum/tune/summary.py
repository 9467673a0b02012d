"""The tuning summary beside a study: trials.csv, summary.json (history and importances, which the experiment
report re-draws from), summary.md, history.png and importance.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import optuna

from ..charts import history_png, importance_png, value_text
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text

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
                     "duration_s": None if dur is None else round(dur, 3), "diverged": "diverged" in t.user_attrs})
    return rows


def importances(study) -> tuple[dict | None, str]:
    """PED-ANOVA parameter importances (Optuna's default evaluator, deterministic), or None and the reason."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(done) < MIN_FOR_IMPORTANCE:
        return None, f"parameter importances need at least {MIN_FOR_IMPORTANCE} completed trials, have {len(done)}"
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except (RuntimeError, ValueError, ImportError) as e:
        return None, f"parameter importances unavailable: {e}"
    return {k: float(v) for k, v in imp.items()}, ""


def md_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(value_text(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def md_text(text: str) -> str:
    """A user-chosen name as literal Markdown text: HTML and Markdown markup escaped, one line."""
    text = " ".join(str(text).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join(f"\\{c}" if c in "\\`*_{}[]()#+-.!|~" else c for c in text)


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
    lines = [f"# Tuning: {md_text(study.study_name)}", ""]
    if best:
        lines += [f"Best trial **{best['trial']}**: validation loss **{best['value']:.6g}** "
                  f"({best['trials']['complete']} complete, {best['trials']['pruned']} pruned of "
                  f"{best['trials']['requested']} requested; storage {best['storage']}).", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {value_text(v)} |" for k, v in best["tuned"].items()]
        lines += ["", f"Retrain it: `lorasum train --params {out / 'best.json'} ...` (same model, data and caps).", ""]
    else:
        lines += ["No trial has completed yet.", ""]
    lines += ["## Trials", "", md_table(rows), "", "![optimisation history](history.png)", ""]
    lines += ["![parameter importances](importance.png)" if imp else f"*{note}*", ""]
    atomic_write_text(out / "summary.md", "\n".join(lines))
    return summary
