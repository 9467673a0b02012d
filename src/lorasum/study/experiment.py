"""`lorasum experiment`: plan the paper's grid for N domains as jobs, run what is missing, assemble and report.

Grid (paper §4): an adapter per non-empty subset of domains up to `max_level` (singletons = fundamental blocks,
k-subsets = level-k blocks trained on merged data), per seed. Composed models evaluated beside them: the naive sum
of a subset's fundamentals, the mean (weights 1/k), level-2 block + remaining fundamental (3-subsets), and
unlearning (all-domain block minus one fundamental). Every model is evaluated on every single domain's test set;
pooled figures for a subset are exp(ΣNLL/Σtokens) over the union of its domains' test sets.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import LorasumError
from ..files import atomic_write_json, check_out_path, is_temp_name, read_json, sha256_file, sweep
from ..lm.data import SPLITS, load_domain, parse_spec, partition_domains, require_nonempty, resolve_source
from ..lm.models import check_positions, load_model, torch_threads
from ..lm.train import init_seed
from ..lock import LOCK_FILE, folder_lock
from ..progress import progress
from ..report.render import write_report
from ..schema import config_diff
from .config import ExperimentConfig
from ..cluster import ExecutorOptions
from .executors import run_ray, run_serial
from .grid import METHOD_COMPOSITIONS, adapter, eval_domains, model_catalog, partition_name, subsets
from .jobs import JOB_KINDS, is_done
from .jobspec import with_key
from .results import assemble
from .tuning import run_tuning


def _sources(cfg: ExperimentConfig) -> dict[str, str | None]:
    out = {}
    for d in cfg.domains:
        name = parse_spec(d)[0]
        path = resolve_source(name, cfg.data_dir)
        out[name] = None if path.startswith("hf:") else sha256_file(path)
    return out


def plan(cfg: ExperimentConfig, run_dir: str | Path, train_for: dict | None = None, init: str | None = None) -> dict:
    """All job specs (with keys) of one init mode's grid: train, similarity and eval, plus the model catalog.

    `evals` maps (model name, domain, seed) to test-split evals and (model name, domain, seed, "validation") to the
    validation-split evals that choose the best-single baseline and the unlearning weight; `models` is the grid's
    Catalog. `ceiling` maps (domain, seed) to the train job of a disjoint second sample of the domain's training
    records (the same-domain reference), where the domain has twice the records a fundamental trains on.

    `train_for` maps partitions to tuned TrainConfigs (from the `tune` section); others use cfg.train. `init` is the
    LoRA init mode of every adapter (default: the run's first).
    """
    run_dir = str(run_dir)
    mode = init or cfg.modes[0]
    sources = _sources(cfg)
    base = {"model": cfg.model, "dtype": cfg.dtype, "autocast": cfg.autocast, "run_dir": run_dir, "device": cfg.device,
            "data_dir": cfg.data_dir}
    fields_ = {"question_field": cfg.question_field, "answer_field": cfg.answer_field, "split_seed": cfg.split_seed}

    def data_part(domains: list[str], caps: dict, skip: dict | None = None) -> dict:
        names = sorted({parse_spec(d)[0] for d in domains})
        return {**fields_, "max_records": caps, "sources": {n: sources[n] for n in names}, **({"skip": skip} if skip
                                                                                             else {})}

    def train_spec(part: str, seed: int, skip: dict | None = None) -> dict:
        tc = replace((train_for or {}).get(part, cfg.train), seed=seed, init=mode)
        sample = {"sample": "second"} if skip else {}  # a second sample: an init of its own (independent mode)
        return with_key({**base, "kind": "train", "partition": part, **sample,
                         "init_seed": init_seed(part, tc, sample.get("sample", "")),
                         "data": data_part(partition_domains(part), cfg.caps(("train", "validation"), keep_none=True),
                                           skip), "train": asdict(tc)})

    train: dict[tuple[str, int], dict] = {}
    for seed in cfg.seeds:
        for s in subsets(cfg.domains, cfg.level):
            train[(partition_name(s), seed)] = train_spec(partition_name(s), seed)
    ceiling: dict[tuple[str, int], dict] = {}
    if cfg.max_train:
        data = cfg.data_config()
        for d in cfg.domains:
            if load_domain(d, data).available["train"] >= 2 * cfg.max_train:
                for seed in cfg.seeds:
                    ceiling[(d, seed)] = train_spec(d, seed, skip={"train": cfg.max_train})

    def terms(items, seed):
        return [{"train_key": train[(p, seed)]["key"], "weight": w} for p, w in items]

    def search_spec(m, seed) -> dict:
        return with_key({**base, "kind": "weight_search", "adapters": terms(m.terms, seed), "domains": list(m.subset),
                         "data": data_part(list(m.subset), cfg.caps(("validation",), keep_none=True)),
                         "max_length": cfg.train.max_length, "batch_size": cfg.eval_batch_size,
                         "loss_on": cfg.eval_loss_on, "trials": cfg.weight_search_trials or 12, "method": m.method,
                         "params": dict(m.params)})

    def method_fields(m, seed) -> dict:
        """A merge method's eval carries the method and its hyperparameters (or its search) in its key."""
        if m is None or m.method is None:
            return {}
        if m.kind == "weight_search":
            return {"method": m.method, "params": {}, "weights_from": searches[(m.name, seed)]["key"]}
        return {"method": m.method, "params": dict(m.params)}

    def eval_spec(items, seed, domain: str, split: str = "test", m=None) -> dict:
        return with_key({**base, "kind": "eval", "adapters": terms(items, seed), "domain": domain,
                         **({"split": split} if split != "test" else {}), **method_fields(m, seed),
                         "data": data_part([domain], cfg.caps((split,), keep_none=True)),
                         "max_length": cfg.train.max_length, "batch_size": cfg.eval_batch_size,
                         "loss_on": cfg.eval_loss_on})

    catalog = model_catalog(cfg.domains, cfg.level, cfg.compositions, cfg.unlearn_weights, cfg.method_grid)
    searches = {(m.name, seed): search_spec(m, seed) for seed in cfg.seeds for m in catalog.of("weight_search")}
    evals: dict[tuple, dict] = {}
    best_single = "best_single" in cfg.compositions
    for seed in cfg.seeds:
        for name, m in catalog.models.items():
            for d in eval_domains(m, cfg.domains, cfg.eval_scope, best_single, bool(catalog.of("unlearn"))):
                evals[(name, d, seed)] = eval_spec(m.terms, seed, d, m=m)
    if any(c in METHOD_COMPOSITIONS for c in cfg.compositions):  # each method chosen, and ranked, on validation
        for seed in cfg.seeds:
            for m in catalog.models.values():
                if m.method is not None or m.kind in ("sum", "mean"):
                    for d in m.subset:
                        evals[(m.name, d, seed, "validation")] = eval_spec(m.terms, seed, d, "validation", m)
    validation = [adapter([f]) for f in cfg.domains] if best_single else []
    unlearn = catalog.of("unlearn")
    if unlearn:  # the weight λ is chosen on validation: every λ, the block before removal, and the block without
        validation += [*unlearn, adapter(cfg.domains), *(adapter(m.subset) for m in unlearn if m.weight == 1.0)]
    for seed in cfg.seeds:
        for m in validation:
            for d in cfg.domains:
                evals[(m.name, d, seed, "validation")] = eval_spec(m.terms, seed, d, "validation")

    sims: dict[tuple, dict] = {}  # (what, subset[, domain], seed) -> similarity job
    for seed in cfg.seeds:
        def sim(what: tuple, a, b, b_specs: dict | None = None):
            b_terms = terms(b, seed) if b_specs is None else [{"train_key": b_specs[(b[0][0], seed)]["key"],
                                                               "weight": b[0][1]}]
            sims[(*what, seed)] = with_key({"kind": "similarity", "run_dir": run_dir,
                                            "a": terms(a, seed), "b": b_terms})

        for x, y in itertools.combinations(cfg.domains, 2):
            sim(("pair", (x, y)), [[x, 1.0]], [[y, 1.0]])
        for d in cfg.domains:
            if (d, seed) in ceiling:
                sim(("ceiling", d), [[d, 1.0]], [[d, 1.0]], b_specs=ceiling)
        for s in subsets(cfg.domains, cfg.level, 2):
            sim(("weight", s), [[d, 1.0] for d in s], [[partition_name(s), 1.0]])
            if len(s) >= 3:
                for d in s:
                    sim(("block_vs_rest", s, d), [[d, 1.0]], [[x, 1.0] for x in s if x != d])
            if len(s) == 3:
                for d in s:
                    sim(("level2_plus_one", s, d), [[partition_name([x for x in s if x != d]), 1.0]], [[d, 1.0]])
    if len(cfg.seeds) >= 2:  # the same partition trained with two seeds: a same-domain reference
        s0, s1 = cfg.seeds[:2]
        for d in cfg.domains:
            sims[("seeds", d, s0)] = with_key({"kind": "similarity", "run_dir": run_dir, "a": terms([[d, 1.0]], s0),
                                               "b": terms([[d, 1.0]], s1)})
    checks: dict[tuple[str, int], dict] = {}
    if "unlearning" in cfg.compositions and cfg.level == len(cfg.domains):
        for seed in cfg.seeds:
            keys = [train[(d, seed)]["key"] for d in cfg.domains]
            for d, k in zip(cfg.domains, keys):
                checks[(d, seed)] = with_key({"kind": "inplace", "model": cfg.model, "dtype": cfg.dtype,
                                              "autocast": cfg.autocast,
                                              "run_dir": run_dir, "device": cfg.device, "all": keys, "removed": k})
    stats = with_key({**base, "kind": "data_stats", "domains": list(cfg.domains),
                      "data": data_part(cfg.domains, cfg.caps(keep_none=True)), "max_length": cfg.train.max_length})
    return {"init": mode, "train": train, "ceiling": ceiling, "evals": evals, "sims": sims, "checks": checks,
            "data_stats": stats, "models": catalog, "searches": searches}


def plans(cfg: ExperimentConfig, run_dir: str | Path, train_for: dict | None = None) -> dict[str, dict]:
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
    if executor.kind == "serial":  # the model this process runs every job on: its limits are checked before any write
        loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype, cfg.autocast)
        check_positions(loaded, cfg.train.max_length)
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
            with torch_threads(cfg.threads):  # this run's thread count, the caller's again afterwards
                return _run(cfg, run_dir, plans(cfg, run_dir), loaded, executor, placements)
    except BaseException:
        if made:  # a refused or interrupted first run leaves no folder behind (unless a job finished)
            _remove_if_unused(run_dir)
        raise


def _labels(ps: dict[str, dict]) -> dict[str, dict]:
    """What each train and test-eval job is, by key, for timings.json (the report's speed table reads it)."""
    out = {}
    for mode, p in ps.items():
        for (part, seed), spec in p["train"].items():
            out[spec["key"]] = {"init": mode, "partition": part, "seed": seed}
        for key, spec in p["evals"].items():
            if len(key) == 3:
                out[spec["key"]] = {"init": mode, "model": key[0], "domain": key[1], "seed": key[2]}
    return out


def _jobs(p: dict) -> list[dict]:
    """A plan's jobs in an order that respects what each reads: adapters before the jobs that use them."""
    return [p["data_stats"], *p["train"].values(), *p["ceiling"].values(), *p["sims"].values(),
            *p["checks"].values(), *p["searches"].values(), *p["evals"].values()]


def _run(cfg: ExperimentConfig, run_dir: Path, ps: dict[str, dict], loaded, executor: ExecutorOptions,
         placements: list | None) -> dict:
    """The planned run in an existing folder: config.json, tuning, the missing jobs (on `executor`), results and
    report."""
    atomic_write_json(run_dir / "config.json", cfg.to_dict())
    tuning = None
    if cfg.tune:  # tuned parameters replace cfg.train in the train jobs (and so in their keys)
        first = next(iter(ps.values()))
        loaded, train_for, tuning = run_tuning(cfg, run_dir, loaded, first["data_stats"]["data"]["sources"])
        ps = plans(cfg, run_dir, train_for)
    jobs = list({j["key"]: j for p in ps.values() for j in _jobs(p)}.values())  # modes share e.g. data_stats
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
    results = assemble(cfg, ps, run_dir, tuning)
    write_report(run_dir, results)
    return results
