"""`lorasum tune`: Optuna TPE search of training hyperparameters, minimising validation loss.

Each trial trains an adapter with lorasum's own training (`train_adapter`) and scores it by its best epoch's
validation loss; per-epoch validation losses feed a median pruner. r, alpha and max length stay fixed (paper §3).

The study lives in an SQLAlchemy storage: by default an SQLite file `OUT/study.db`, or any URL (PostgreSQL) shared
by several workers. `trials` is the total the study should reach: COMPLETE and PRUNED trials count, FAILed ones
(a crash, or a killed worker's trial failed by the heartbeat check) do not; a killed worker's trial is retried
with the same parameters. Workers claim slots by trial number, so a study never holds more than `trials`
finished trials. The search space and the setup (model, data, fixed hyperparameters) are stored on the study; a
rerun with a different one is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError

from ..errors import DivergedError, LorasumError
from ..files import atomic_write_json, atomic_write_text, barrier_for_test, sweep, temp_prefix
from ..lm.data import DataConfig, load_domain, partition_domains, require_nonempty
from ..lm.train import TrainConfig, train_adapter
from ..progress import progress
from .. import schema
from ..schema import config_diff
from .space import Space, default_space, space_dict, space_yaml
from .summary import write_summary

MAX_HEARTBEAT_S = 86_400  # a day between heartbeats: the longest a trial may go silent
MAX_TRIALS = 100_000  # finished trials of one study; TPE gains nothing long before this
HEARTBEAT_S = 30  # a running trial records a heartbeat this often; stale (failed, retried) after 2x without one
STATES_DONE = ("COMPLETE", "PRUNED")  # the trial states that count towards --trials


# --- storage and study --------------------------------------------------------------------------------------------
def storage_label(url: str) -> str:
    """The URL with any password masked (for messages and best.json)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, heartbeat: int = HEARTBEAT_S):
    """An RDBStorage with heartbeats; a killed worker's trial is failed after 2x `heartbeat` s and retried.
    (`journal:///PATH` is Optuna's file journal instead, safe for several processes on one machine; it has no
    heartbeats, so the Ray driver fails a dead worker's trial itself.)

    A bare `postgresql://` (or `postgres://`) URL uses psycopg 3, the driver lorasum installs; a URL naming its
    driver (`postgresql+psycopg2://`) is used as given.
    """
    if url.startswith("journal:///"):  # one machine, several processes (Ray workers), no server: a file journal
        path = url.removeprefix("journal:///")
        if not Path(path).parent.is_dir():
            raise LorasumError(f"cannot open --storage {url}: {Path(path).parent} is not a folder")
        return JournalStorage(JournalFileBackend(path))
    kwargs: dict = {"pool_pre_ping": True}
    label = storage_label(url)
    scheme, sep, rest = url.partition("://")
    if scheme in ("postgresql", "postgres"):
        url = f"postgresql+psycopg://{rest}"
    if scheme.startswith("postgres"):
        kwargs["connect_args"] = {"connect_timeout": 10}

    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                      grace_period=2 * heartbeat,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            except (IntegrityError, ProgrammingError):
                # workers creating the tables of an empty database at once collide ("duplicate key", "already
                # exists"); the next attempt finds the tables made
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorasumError(f"cannot open --storage {label}: {first}; check the URL, that the "
                           "database server is running and reachable, and its driver is installed") from None


def _seeded_tpe(seed: int, n_startup: int):
    """TPE whose random draws are seeded by (seed, trial number): a resumed study or a second worker never
    replays the draws of earlier trials, and a given trial number with a given history is reproducible."""
    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

        def _tpe(self, trial) -> optuna.samplers.TPESampler:
            if trial.number not in self._by_trial:
                self._by_trial[trial.number] = optuna.samplers.TPESampler(
                    seed=(seed * 1_000_003 + trial.number) % 2**32, n_startup_trials=n_startup,
                    constant_liar=True)
            return self._by_trial[trial.number]

        def infer_relative_search_space(self, study, trial):
            return self._tpe(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._tpe(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study, trial) -> None:
            self._tpe(trial).before_trial(study, trial)

        def after_trial(self, study, trial, state, values) -> None:
            self._by_trial.pop(trial.number, self._tpe(trial)).after_trial(study, trial, state, values)

    return TrialSeededTPE()


def open_study(storage, name: str, label: str, space: Space, setup: dict, seed: int, trials: int):
    """Load or create the study; refuse one made with another space or setup, naming what differs."""
    sampler = _seeded_tpe(seed, min(10, max(2, trials // 3)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    want = {"lorasum.space": space_dict(space), "lorasum.setup": setup}
    attrs = study.user_attrs
    if "lorasum.space" not in attrs:
        if study.trials or study.direction != optuna.study.StudyDirection.MINIMIZE:
            raise LorasumError(f"study '{name}' in {label} was not made by lorasum tune; choose another --study")
        for k, v in want.items():
            study.set_user_attr(k, v)
        return study
    _check_inputs(name, label, (attrs.get("lorasum.setup") or {}).get("inputs"), setup.get("inputs"))
    for key, what in (("lorasum.space", "search space"), ("lorasum.setup", "setup (model, data, fixed training "
                                                                           "parameters)")):
        diff = config_diff(attrs.get(key) or {}, json.loads(json.dumps(want[key])))
        if diff:
            raise LorasumError(f"study '{name}' in {label} was made with a different {what} (differs in: "
                               f"{', '.join(diff)}); use the same one to continue it, or another --study name")
    return study


class InputsChanged(LorasumError):
    """The files a study was made from (their sha256 in setup["inputs"]) changed: its trials score other inputs."""


def _check_inputs(name: str, label: str, stored: dict | None, current: dict | None) -> None:
    """Refuse a study whose recorded input files (path -> sha256) differ from the current ones, naming them."""
    if current is None or stored == current:
        return
    if not isinstance(stored, dict):
        raise InputsChanged(f"study '{name}' in {label} holds no sha256 of the files it was made from (an older "
                            "lorasum made it), so its trials cannot be trusted for these inputs; use another --out "
                            "or --storage")
    changed = [p for p in sorted(set(stored) | set(current)) if stored.get(p) != current.get(p)]
    raise InputsChanged(f"study '{name}' in {label} was made from other file contents: {', '.join(changed[:4])}"
                        f"{' …' if len(changed) > 4 else ''} changed (sha256 differs); restore them, or use another "
                        "--out or --storage for a new study")


def count_states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def finished(study) -> int:
    c = count_states(study)
    return sum(c.get(s, 0) for s in STATES_DONE)


class _Surplus(Exception):
    """Raised inside a trial that lost the race for the last slot (another worker claimed it first)."""


# --- the search ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Search:
    """What every worker of one study shares: the pooled partition, the space, the fixed training config, the data
    reading and where the study lives."""

    partition: str
    trials: int
    space: Space
    base: TrainConfig
    data: DataConfig
    setup: dict
    name: str
    url: str
    label: str
    seed: int
    heartbeat: int


def prepare(model_id: str, partitions: str | list[str], out: Path, trials: int, space: Space | None = None,
            storage: str | None = None, study_name: str | None = None, data: DataConfig | None = None,
            base: TrainConfig | None = None, seed: int = 0, heartbeat: int = HEARTBEAT_S,
            default_store: str = "study.db") -> Search:
    """Check the inputs and describe the study, before anything is written."""
    space = space or default_space()
    base = TrainConfig.from_dict(asdict(base)) if base is not None else TrainConfig()
    data = data or DataConfig()
    specs = [partitions] if isinstance(partitions, str) else list(partitions)
    domains = [load_domain(d, data) for s in specs for d in partition_domains(s)]
    require_nonempty(domains, "train")
    require_nonempty(domains, "validation")
    schema.check_count(trials, "trials", MAX_TRIALS)  # (the CLI and the experiment check both where they enter)
    schema.check_count(heartbeat, "heartbeat", MAX_HEARTBEAT_S)
    partition = "+".join(d.spec for d in domains)
    if out.exists() and not out.is_dir():
        raise LorasumError(f"{out} exists and is not a folder", key="out")
    setup = {"model": model_id, "partition": partition,
             "data": {"question_field": data.question_field, "answer_field": data.answer_field,
                      "split_seed": data.split_seed, "max_records": {k: v for k, v in data.max_records.items()
                                                                      if k in ("train", "validation")},
                      "sources": {d.spec: d.source_sha256 for d in domains}},
             "train": {k: v for k, v in asdict(base).items() if k not in space}}
    journal = out / "study.journal"
    url = storage or (f"journal:///{journal}" if journal.exists() or default_store == "study.journal"
                      else f"sqlite:///{out / 'study.db'}")
    return Search(partition, trials, space, base, data, setup, study_name or f"tune:{partition}", url,
                  storage_label(url), seed, heartbeat)


def open_search(search: Search):
    storage = open_storage(search.url, search.heartbeat)
    return open_study(storage, search.name, search.label, search.space, search.setup, search.seed, search.trials)


def work(loaded, search: Search, study, scratch: Path, worker: str, after_trial=None, show: str | None = None) -> None:
    """Run trials until the study holds `trials` finished ones (this worker's and others'); `after_trial()` runs
    after each of this worker's trials; with `show`, a progress bar of that name follows the count."""
    trials, space, base = search.trials, search.space, search.base

    def objective(trial) -> float:
        running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.number < trial.number]
        if finished(study) + len(running) >= trials:
            trial.set_user_attr("lorasum.surplus", True)
            raise _Surplus(f"trial {trial.number}: all {trials} slots are taken")
        trial.set_user_attr("worker", worker)
        params = {n: p.suggest(trial) for n, p in space.items()}
        cfg = replace(base, **params)
        best = [math.inf]

        def on_epoch(epoch: int, val_loss: float) -> None:
            best[0] = min(best[0], val_loss)
            trial.report(best[0], epoch)
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: best val loss {best[0]:.4f}")

        with tempfile.TemporaryDirectory(prefix=temp_prefix("trial"), suffix=".tmp", dir=scratch) as tmp:
            try:
                res = train_adapter(loaded, search.partition, Path(tmp) / "adapter", cfg, search.data,
                                    on_epoch=on_epoch)  # the adapter itself is not kept
            except DivergedError as e:  # these parameters diverge: a pruned point, worse than any completed one
                trial.set_user_attr("diverged", str(e))
                raise optuna.TrialPruned(str(e)) from None
        trial.set_user_attr("best_epoch", res.best_epoch)
        trial.set_user_attr("val_losses", [e["val_loss"] for e in res.epochs])
        return min(e["val_loss"] for e in res.epochs)

    barrier_for_test()  # test-only: parallel workers start together; no-op unless set
    done, waiting = finished(study), False
    with progress(total=trials, desc=show or "", unit="trial", initial=min(done, trials), disable=not show) as bar:
        while done < trials:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a killed worker's trial: FAIL, then retried
            running = count_states(study).get("RUNNING", 0)
            if done + running >= trials:  # the last slots are being worked on elsewhere: wait for them
                if not waiting and show:
                    bar.write(f"waiting for {running} trial(s) running elsewhere (a dead worker's trial is failed "
                              f"after {2 * search.heartbeat} s without a heartbeat, then retried)", file=sys.stderr)
                waiting = True
                time.sleep(min(2.0, search.heartbeat))
            else:
                waiting = False
                study.optimize(objective, n_trials=1, catch=(_Surplus,), gc_after_trial=False)
                if after_trial is not None:
                    after_trial()
            done = finished(study)
            bar.update(min(done, trials) - bar.n)
            if show and _has_complete(study):
                bar.set_postfix(best=f"{study.best_value:.4f}", refresh=False)


def tune(loaded, partitions: str | list[str], out: str | Path, trials: int, space: Space | None = None,
         storage: str | None = None, study_name: str | None = None, data: DataConfig | None = None,
         base: TrainConfig | None = None, seed: int = 0, heartbeat: int = HEARTBEAT_S) -> dict:
    """Run (or continue) the study in this process until it holds `trials` finished trials; write OUT/best.json
    and a summary.

    Several partitions are pooled: trained on their merged training data, scored on their pooled validation split.
    Returns best.json's content ({} when no trial completed).
    """
    out = Path(out).resolve()
    search = prepare(loaded.model_id, partitions, out, trials, space, storage, study_name, data, base, seed,
                     heartbeat)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with opened(search, out) as study:
        work(loaded, search, study, out, worker, lambda: write_best(study, out, search), show=f"tune {search.name}")
    return finish(study, out, search)


@contextlib.contextmanager
def opened(search: Search, out: Path):
    """Open (or create) the study with OUT made and swept; after a failure inside the block, remove the local
    study this call created if no trial finished in it (and OUT if this call made it and it is empty), so a retry
    starts clean rather than from an empty study."""
    made_out = not out.exists()
    local = search.url.removeprefix("sqlite:///").removeprefix("journal:///")
    made_db = local != search.url and not Path(local).exists()
    out.mkdir(parents=True, exist_ok=True)
    sweep(out)  # a killed trial's temp folder
    study = None
    try:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = open_search(search)
        yield study
    except BaseException:
        if made_db and (study is None or finished(study) == 0):
            for leftover in (Path(local), Path(local + ".lock")):
                leftover.unlink(missing_ok=True)
        if made_out and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def write_best(study, out: Path, search: Search) -> dict:
    return _write_best(study, out, search.name, search.label, search.base, search.space, search.trials)


def finish(study, out: Path, search: Search) -> dict:
    """best.json, space.yaml and the summary (trials.csv, summary.md, plots) of a finished study."""
    best = write_best(study, out, search)
    atomic_write_text(out / "space.yaml", space_yaml(search.space))
    write_summary(study, out, best)
    return best


def _has_complete(study) -> bool:
    return any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))


def _write_best(study, out: Path, name: str, label: str, base: TrainConfig, space: Space, trials: int) -> dict:
    """best.json: `params` is the whole training config (so `lorasum train --params` reproduces the trial)."""
    if not _has_complete(study):
        return {}
    t = study.best_trial
    c = count_states(study)
    best = {"params": asdict(replace(base, **t.params)), "tuned": dict(t.params), "value": t.value,
            "trial": t.number, "study": name, "storage": label, "space": space_dict(space),
            "setup": study.user_attrs.get("lorasum.setup"), "trials": {
                "requested": trials, "complete": c.get("COMPLETE", 0), "pruned": c.get("PRUNED", 0)}}
    atomic_write_json(out / "best.json", best)
    return best
