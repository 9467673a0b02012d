"""The report's tuning section and its figures, drawn from the `tuning` record of results.json alone."""

from __future__ import annotations

from ..charts import history_png, importance_png, value_text
from .blocks import Figures, Paragraph, Table
from .ordering import partition_order


def _range(v: dict) -> str:
    if "choices" in v:
        return "{" + ", ".join(map(value_text, v["choices"])) + "}"
    return f"[{value_text(v['low'])}, {value_text(v['high'])}]" + (" log" if v.get("log") else "")


def tuning_blocks(r: dict) -> list:
    """Blocks of the report's "Tuning" section: how it was tuned, the best parameters per study, their figures."""
    t = r["tuning"]
    if t["mode"] == "shared":
        how = ("one set of hyperparameters was found on the pooled validation split of all domains (trained on "
               "their merged data) and used for every partition, so merged and summed models stay comparable.")
    else:
        how = ("CONFOUNDED: every partition was tuned separately (tune: per_partition), so differences between "
               "merged and summed models mix the effect of composition with that of tuning.")
    blocks: list = [Paragraph(f"Optuna TPE, {t['trials']} trials per study minimising validation loss (best epoch), "
                              f"median pruning on per-epoch validation loss; {how}")]
    names = sorted(t["space"])  # results.json is written with sorted keys: order explicitly, so re-renders match
    rows = [[part, f"{s['value']:.4f}" if s.get("value") is not None else "", str(s.get("trial", "")),
             *(value_text((s.get("tuned") or {}).get(n)) for n in names)] for part, s in _studies(r)]
    space = "; ".join(f"{n} {_range(t['space'][n])}" for n in names)
    blocks.append(Table(["partition", "best val loss", "trial", *names], rows, f"Search space: {space}."))
    parts = [part for part, _ in _studies(r)]
    blocks.append(Figures(tuple(tuning_pngs(r, names_only=True)),
                          tuple(a for p in parts for a in (f"Optimisation history of the tuning study of {p}: validation "
                                                           "loss per trial and the best so far.",
                                                           f"Parameter importances of the tuning study of {p}.")),
                          tuple(c for p in parts for c in (f"Optimisation history, {p}: dots are complete trials, "
                                                           "crosses pruned ones; the line is the best loss so far.",
                                                           f"Parameter importances, {p}: which hyperparameter moved "
                                                           "the validation loss most."))))
    return blocks


def _studies(r: dict) -> list[tuple[str, dict]]:
    """(partition, study) in the grid's order of partitions (figure names number them in this order)."""
    studies = (r.get("tuning") or {}).get("studies", {})
    return [(p, studies[p]) for p in partition_order(r, studies)]


def tuning_pngs(r: dict, names_only: bool = False) -> dict:
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
