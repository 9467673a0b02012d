"""`lorasum experiment`: plan the paper's grid for N domains as jobs, run what is missing, assemble and report.

Grid (paper §4): an adapter per non-empty subset of domains up to `max_level` (singletons = fundamental blocks,
k-subsets = level-k blocks trained on merged data), per seed. Composed models evaluated beside them: the naive sum
of a subset's fundamentals, the mean (weights 1/k), level-2 block + remaining fundamental (3-subsets), and
unlearning (all-domain block minus one fundamental). Every model is evaluated on every single domain's test set;
pooled figures for a subset are exp(ΣNLL/Σtokens) over the union of its domains' test sets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..errors import LorasumError
from ..files import atomic_write_json, check_out_path, is_temp_name, sweep
from ..jsonfile import read_json
from ..lm.data import SPLITS, load_domain, require_nonempty
from ..lm.models import check_positions, load_model, torch_threads
from ..lock import LOCK_FILE, folder_lock
from ..progress import progress
from ..provenance import provenance
from ..report.render import write_report
from ..schema import config_diff
from .config import ExperimentConfig
from ..cluster import ExecutorOptions
from .executors import run_ray, run_serial
from .jobs import JOB_KINDS, is_done
from .plan import Plan, Planner
from .results import assemble
from .units import UNITS
from .tuning import run_tuning


def plan(cfg: ExperimentConfig, run_dir: str | Path, train_for: dict | None = None, init: str | None = None) -> Plan:
    """Every job of one init mode's grid under its typed key (see study.plan), as each analysis unit plans it.

    `train_for` maps partitions to tuned TrainConfigs (from the `tune` section); others use cfg.train. `init` is the
    LoRA init mode of every adapter (default: the run's first).
    """
    planner = Planner(cfg, run_dir, init or cfg.modes[0], train_for)
    for unit in UNITS.values():
        unit.plan(planner)
    return planner.plan


def plans(cfg: ExperimentConfig, run_dir: str | Path, train_for: dict | None = None) -> dict[str, Plan]:
    """One plan per init mode, in the config's order (the first is the report's primary grid)."""
    return {mode: plan(cfg, run_dir, train_for, mode) for mode in cfg.modes}


def _check_run_dir(cfg: ExperimentConfig, run_dir: Path, overwrite: bool) -> None:
    """Refuse a run folder made with another config (naming the keys), a corrupt one, or a non-folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LorasumError(f"{run_dir} exists and is not a folder; choose another run folder", key="out")
    cfg_path = run_dir / "config.json"
    if cfg_path.is_file():
        try:
            old = read_json(cfg_path, "run config", "")
        except LorasumError:
            old = None
        if not isinstance(old, dict):
            if overwrite:
                return
            raise LorasumError(f"{cfg_path} is corrupt (not a JSON object of config keys); pass --overwrite to "
                               "replace it with this config (finished jobs are reused) or choose another --out")
        if "init_modes" not in old:
            raise LorasumError(f"{run_dir} holds a run made before LoRA initialisation became a recorded choice (its "
                               "adapters all started from one shared A, and its results cannot be extended); "
                               "choose a new run folder", key="out")
        diff = config_diff(old, json.loads(json.dumps(cfg.to_dict())))
        if diff and not overwrite:
            moved = (f" (data_dir was {old.get('data_dir')}, now {cfg.data_dir}; if only the folder moved, "
                     "--overwrite reuses every job whose data files are unchanged)") if "data_dir" in diff else ""
            raise LorasumError(f"{run_dir} holds a run made with a different config (differs in: {', '.join(diff)})"
                               f"{moved}; pass --overwrite to switch it to this config (unchanged jobs are reused) "
                               "or choose another --out")
    elif run_dir.exists():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE and not is_temp_name(p.name))
        if foreign:  # hidden names count: a folder holding only .git is someone's, not an empty run folder
            raise LorasumError(f"{run_dir} exists and is not a lorasum run folder (it holds '{foreign[0]}'); choose "
                               "another run folder", key="out")
    _check_no_links(run_dir)


def _check_no_links(run_dir: Path) -> None:
    """lorasum makes no symlinks in a run folder: one there (an entry, or an adapter under adapters/) would let a
    job read or write outside the run, so it is refused."""
    tops = list(run_dir.iterdir()) if run_dir.is_dir() else []
    adapters = run_dir / "adapters"
    inner = list(adapters.iterdir()) if adapters.is_dir() and not adapters.is_symlink() else []
    link = next((p for p in [*tops, *inner] if p.is_symlink() and not is_temp_name(p.name)), None)
    if link is not None:
        raise LorasumError(f"{link} is a symbolic link, which lorasum never makes in a run folder; remove it (the "
                           "job that wrote it runs again) or choose another run folder", key="out")


def _check_domains(cfg: ExperimentConfig) -> None:
    """Every domain must have records in each split after caps, and at least `min_records` before them (checked
    before anything is written)."""
    data = cfg.data_config()
    domains = [load_domain(d, data) for d in cfg.domains]
    for dom in domains:
        short = {s: n for s, n in (cfg.min_records or {}).items() if dom.available[s] < n}
        if short:
            have = ", ".join(f"{dom.available[s]} {s}" for s in SPLITS)
            need = ", ".join(f"{n} {s}" for s, n in cfg.min_records.items())
            raise LorasumError(f"sub-domain '{dom.spec}' has {have} records (from {dom.source}); this run needs at "
                               f"least {need}: choose a larger sub-domain or join categories (category=A|B)")
    for split in SPLITS:
        require_nonempty(domains, split)


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run folder this call created when the run stopped before any job or tuning study left a result."""
    def cheap(p: Path) -> bool:  # an empty tune folder, or checks/ holding only data statistics (seconds to redo)
        return p.is_dir() and not p.is_symlink() and (
            (p.name == "tune" and not any(p.iterdir())) or
            (p.name == "checks" and all(c.name.startswith("data_stats-") for c in p.iterdir())))

    leftovers = [p for p in run_dir.iterdir() if p.name not in ("config.json", "timings.json", LOCK_FILE)
                 and not is_temp_name(p.name) and not cheap(p)]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, overwrite: bool = False, loaded=None,
                   executor: ExecutorOptions | None = None, placements: list | None = None) -> dict:
    """Run (or resume) the grid on `executor` (default: serial, in this process), then write results.json,
    timings.json and the report. With Ray, `placements` collects where and when each job ran.

    The run folder is locked for the whole call (a second run on it is refused, naming this one), and the leftovers
    of an interrupted earlier run (temp files, half-replaced folders) are repaired or removed before any job runs.
    """
    executor = executor or ExecutorOptions()
    executor.check()
    run_dir = Path(run_dir).resolve()
    # absolute before the comparison with the saved config: a rerun from the same folder with the same relative
    # --data-dir (or LORASUM_DATA_DIR) must resume
    cfg.data_dir = str(Path(cfg.data_dir).resolve()) if cfg.data_dir else cfg.data_dir
    _check_run_dir(cfg, run_dir, overwrite)  # before the lock file is made: never inside a folder that is not a run
    check_out_path(run_dir, "--out")
    made = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LorasumError(f"{run_dir} cannot be created ({e.strerror}); choose another run folder", key="out") from None
    try:
        with folder_lock(run_dir) as stale:
            if stale:
                print(f"lorasum: {run_dir}: the run by pid {stale.get('pid', '?')} was killed; resuming from its "
                      "finished jobs", file=sys.stderr)
            sweep(run_dir, sorted({k.folder for k in JOB_KINDS.values()} | {"figures", "tune"}))
            _check_run_dir(cfg, run_dir, overwrite)  # again, now that no other run can change it
            _check_domains(cfg)
            if executor.kind == "serial":  # the model this process runs every job on, checked before config.json
                loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype, cfg.autocast)
                check_positions(loaded, cfg.train.max_length)
            with torch_threads(cfg.threads):  # this run's thread count, the caller's again afterwards
                return _run(cfg, run_dir, plans(cfg, run_dir), loaded, executor, placements)
    except BaseException:
        if made:  # a refused or interrupted first run leaves no folder behind (unless a job finished)
            _remove_if_unused(run_dir)
        raise


def _labels(ps: dict[str, Plan]) -> dict[str, dict]:
    """What each train (of the first sample) and test-eval job is, by key, for timings.json (the report's speed
    table reads it)."""
    out = {}
    for mode, p in ps.items():
        for k, spec in p.train.items():
            if not k.sample:
                out[spec["key"]] = {"init": mode, "partition": k.partition, "seed": k.seed}
            elif "fraction" in spec:  # a repair: its wall time against the merged block's training
                out[spec["key"]] = {"init": mode, "partition": k.partition, "seed": k.seed, "repair": spec["fraction"]}
        if p.throughput:
            out[p.throughput["key"]] = {"init": mode, "subset": p.throughput["domains"]}
        for k, spec in p.evals.items():
            if k.split == "test":
                out[spec["key"]] = {"init": mode, "model": k.model, "domain": k.domain, "seed": k.seed}
    return out


def _run(cfg: ExperimentConfig, run_dir: Path, ps: dict[str, Plan], loaded, executor: ExecutorOptions,
         placements: list | None) -> dict:
    """The planned run in an existing folder: config.json, tuning, the missing jobs (on `executor`), results and
    report."""
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    prov = provenance(cfg.device)  # the versions, revision and device this run runs with
    tuning = None
    if cfg.tune:  # tuned parameters replace cfg.train in the train jobs (and so in their keys)
        first = next(iter(ps.values()))
        loaded, train_for, tuning = run_tuning(cfg, run_dir, loaded, first.data_stats["data"]["sources"])
        ps = plans(cfg, run_dir, train_for)
    jobs = list({j["key"]: j for p in ps.values() for j in p.jobs()}.values())  # modes share e.g. data_stats
    pending = [j for j in jobs if not is_done(j)]
    timings_path = run_dir / "timings.json"
    try:  # wall times only (not results): a damaged file is started afresh
        timings = read_json(timings_path, "timings file", "started afresh") if timings_path.is_file() else {}
    except LorasumError:
        timings = {}
    labels = _labels(ps)
    total = sum(JOB_KINDS[j["kind"]].work(j) for j in pending)
    with progress(total=round(total), desc="grid", unit="u") as bar:
        def on_done(job: dict, measured: dict, wall_s: float) -> None:
            timings[job["key"]] = {"kind": job["kind"], **labels.get(job["key"], {}), **measured,
                                   "wall_s": round(wall_s, 3)}
            atomic_write_json(timings_path, timings)
            label = job.get("partition") or job.get("domain") or job["key"]
            bar.set_postfix_str(f"done {len(timings)}/{len(jobs)} {job['kind']} {label}")
            bar.update(round(JOB_KINDS[job["kind"]].work(job)))

        if executor.kind == "ray" and pending:  # each job as soon as what it reads exists
            run_ray(pending, run_dir, cfg.threads or executor.threads or 1, executor, on_done, placements)
        else:  # weight searches, and the evals that read their weights, after the rest
            later = [j for j in pending if j["kind"] == "weight_search" or j.get("weights_from")]
            run_serial([j for j in pending if j not in later] + later, loaded, on_done)
    results = assemble(cfg, ps, run_dir, prov, tuning)
    write_report(run_dir, results)
    return results
