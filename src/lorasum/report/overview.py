"""The top of the report: what was run (one line of facts) and the answer (the paper's claims with their verdicts,
beside the headline figure). Everything a reader needs before deciding to scroll."""

from __future__ import annotations

from .blocks import Figures, Note, Section, Table
from .figures import figure_text
from .text import duration

HEADLINE = "rms_vs_pct_change"


def _records(r: dict) -> str:
    """Records per split summed over the domains, as used (after caps): `72 train, 21 validation, 22 test`."""
    data = r.get("data") or {}
    stats = data.get("stats") or []
    if stats:
        n = {sp: sum(s["records"] for s in stats if s["split"] == sp) for sp in ("train", "validation", "test")}
    else:  # no data statistics: the split sizes
        sizes = [v.get("split_sizes") or {} for v in data.get("domains", {}).values()]
        n = {sp: sum(s.get(sp, 0) for s in sizes) for sp in ("train", "validation", "test")} if sizes else {}
    return ", ".join(f"{v} {sp}" for sp, v in n.items())


def device_text(prov: dict) -> str:
    """The device a run used, with torch's CUDA version when it has one: `NVIDIA H200 (CUDA 13.0)`."""
    device = str(prov.get("device") or "")
    return f"{device} (CUDA {prov['cuda']})" if device and prov.get("cuda") and not device.startswith("cpu") else device


def run_facts(r: dict, timings: dict | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs of what was run; the compute time only with `timings` (timings.json)."""
    cfg = r.get("config")
    if not isinstance(cfg, dict):
        return []
    t = cfg.get("train") or {}
    init = r.get("init") or {}
    modes = init.get("modes") or []
    facts = [("model", str(cfg.get("model", ""))),
             ("device", device_text(r.get("provenance") or {})),
             ("domains", ", ".join(map(str, cfg.get("domains", [])))),
             ("seeds", ", ".join(map(str, cfg.get("seeds", [])))),
             ("init", (f"{init['primary']}" + (f" (also run: {', '.join(m for m in modes if m != init['primary'])})"
                                               if len(modes) > 1 else "")) if init else "shared (before init modes)"),
             ("records", _records(r)),
             ("LoRA", f"r {t.get('r')}, α {t.get('alpha'):g}, {t.get('epochs')} epoch(s), lr {t.get('lr'):g}, "
                      f"max length {t.get('max_length')}" if t.get("r") is not None else "")]
    if r.get("tuning"):
        facts.append(("tuning", f"{r['tuning']['mode']}, {r['tuning']['trials']} trials"))
    walls = [v["wall_s"] for v in (timings or {}).values()
             if isinstance(v, dict) and isinstance(v.get("wall_s"), (int, float))]
    if walls:
        facts.append(("time", f"{duration(sum(walls))} of compute over {len(walls)} jobs"))
    return [(k, v) for k, v in facts if v]


def _cautions(r: dict) -> list[Note]:
    """What makes every result below suspect: a failed recipe check, tuning that confounds the comparison."""
    out = []
    rc = r.get("recipe_check") or {}
    if rc.get("passed") is False:
        out.append(Note("The recipe check FAILED: the fundamental blocks do not beat the base model enough on their "
                        "own domains, so the training recipe is broken and the comparisons below are not results."))
    if (r.get("tuning") or {}).get("confounded"):
        out.append(Note("Caution: hyperparameters were tuned per partition (tune: per_partition), so every "
                        "merged-vs-summed comparison is confounded by tuning."))
    return out


def answer_section(r: dict) -> list[Section]:
    """The claims table (verdict badges, the number and rule behind each) beside the headline figure."""
    alt, caption = figure_text(r, HEADLINE)
    fig = Figures((HEADLINE,), (alt,), (caption,))
    if not r.get("claims"):  # results.json of schema 1: no claims, the headline figure alone
        return [Section("Summed vs merged against RMS similarity", [*_cautions(r), fig], lead=True)]
    rows = [[c["claim"], c["verdict"], c["evidence"], c["rule"]] for c in r["claims"]]
    table = Table(["claim", "verdict", "evidence", "rule"], rows,
                  "Each of the paper's claims, decided on this run by the rule beside it: holds, does not hold, or "
                  "cannot be decided here (this run's design or sample cannot decide it). Every verdict by pair "
                  "or domain is under Findings.", verdicts=1, style="claims")
    return [Section("Claims of the paper", [*_cautions(r), table, fig], lead=True)]
