"""Tuning inside an experiment: run the studies its `tune` section asks for (cached in RUN_DIR/tune), and hand
the tuned training parameters to the grid.

`shared` (the default mode) finds one parameter set on the pooled validation split of all domains (trained on
their merged data) and uses it for every partition, so merged and summed models stay comparable.
`per_partition` tunes every partition separately; the report marks the comparison as confounded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import LorasumError
from ..files import atomic_write_text
from ..jsonfile import read_json
from ..lm.models import load_model
from ..lm.train import TrainConfig
from ..tune.search import tune
from .config import ExperimentConfig
from .grid import partition_name, subsets


def _folder_name(i: int, partition: str) -> str:
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9_.+=-]", "_", partition)[:80]


def run_tuning(cfg: ExperimentConfig, run_dir: Path, loaded, sources: dict) -> tuple:
    """Tune as `cfg.tune` says (cached: a finished study is not reopened); returns (loaded model or None,
    {partition: tuned TrainConfig}, the results.json section)."""
    t = cfg.tune
    shared = t.mode == "shared"
    caps = cfg.caps(("train", "validation"))
    data = cfg.data_config(("train", "validation"))
    partitions = [partition_name(s) for s in subsets(cfg.domains, cfg.level)]
    base = replace(cfg.train, seed=cfg.seeds[0])  # the grid's seeds replace it per job
    storage = t.storage or f"sqlite:///{run_dir / 'tune' / 'study.db'}"
    (run_dir / "tune").mkdir(parents=True, exist_ok=True)
    targets = [partition_name(cfg.domains)] if shared else partitions
    studies, train_for = {}, {}
    for i, part in enumerate(targets):
        folder = run_dir / "tune" / ("shared" if shared else _folder_name(i, part))
        key = hashlib.sha256(json.dumps({
            "model": cfg.model, "dtype": cfg.dtype, "autocast": cfg.autocast, "partition": part, "caps": caps,
            "fields": [cfg.question_field, cfg.answer_field, cfg.split_seed], "sources": sources,
            "base": asdict(base), "tune": {k: v for k, v in asdict(t).items() if k != "heartbeat"}}, sort_keys=True,
        ).encode()).hexdigest()[:20]
        best = _cached(folder, key)
        if best is None:
            if loaded is None:
                loaded = _load(cfg)
            best = tune(loaded, part, folder, t.trials, t.parsed_space, storage, f"{t.mode}:{part}", data, base, t.seed,
                        t.heartbeat)
            if not best:
                raise LorasumError(f"tuning {part}: no trial completed (all were pruned or failed); see "
                                   f"{folder / 'summary.md'}, then rerun to continue the study")
            atomic_write_text(folder / "experiment_key", key + "\n")
        summary = read_json(folder / "summary.json", "tuning summary", "remove that study's folder and rerun to tune "
                            "again")
        studies[part] = {"value": best["value"], "trial": best["trial"], "tuned": best["tuned"],
                         "study": best["study"], "folder": str(folder.relative_to(run_dir)),
                         "history": summary["history"], "importances": summary["importances"],
                         "importance_note": summary["importance_note"]}
        tuned = TrainConfig.from_dict(best["params"])
        train_for.update({p: tuned for p in (partitions if shared else [part])})
    info = {"mode": t.mode, "confounded": not shared, "trials": t.trials, "space": t.space,
            "studies": studies}
    return loaded, train_for, info


def _cached(folder: Path, key: str) -> dict | None:
    """best.json of a finished study made for exactly this key, else None."""
    try:
        if (folder / "experiment_key").read_text(encoding="utf-8").strip() != key:
            return None
        best = read_json(folder / "best.json", "tuning result", "")
    except (OSError, UnicodeDecodeError, LorasumError):  # absent or damaged: the study is continued, which rewrites it
        return None
    done = best.get("trials")
    counts = [done.get(k, d) for k, d in (("complete", 0), ("pruned", 0), ("requested", 1))] if isinstance(done, dict) \
        else None
    if not counts or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        return None
    return best if counts[0] + counts[1] >= counts[2] else None


def _load(cfg: ExperimentConfig):
    return load_model(cfg.model, cfg.device, cfg.dtype, cfg.autocast)
