"""`lorasum tune --executor ray`: several Ray workers run trials of one Optuna study at the same time.

Each worker is a Ray task that loads the base model once and runs the same trial loop as a serial `tune` (slots
claimed by trial number, so the study never holds more than `trials` finished trials) against storage every worker
reaches: PostgreSQL (`--storage postgresql://…`) across machines, or on a local runtime without a server Optuna's
file journal `OUT/study.journal`, which is safe for several processes on one machine. The driver ships the data
files, watches the workers, fails the running trial of a worker that died and starts a replacement, and writes
best.json and the summary at the end.

Parallel TPE is not reproducible trial for trial: which trials a sampler sees finished depends on timing. The
serial path is (from the seed); results of a parallel study are compared by their best value, not by identity.
"""

from __future__ import annotations

import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import optuna

from ..cluster import RETRIES, ExecutorOptions, connect, reraise, worker_resources
from ..errors import LorasumError
from ..lm.data import partition_domains, resolve_source
from ..lm.models import load_model, set_threads
from ..progress import progress
from .search import Search, finish, finished, open_search, opened, prepare, work


def _worker(model: tuple, threads: int, search: Search, tag: str, names: list[str], *blobs) -> str:
    """One Ray task: the shipped data files in a private folder, the model loaded once, trials until done."""
    set_threads(threads)
    with tempfile.TemporaryDirectory(prefix="lorasum-tune-") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        for name, data in zip(names, blobs):
            (data_dir / name).write_bytes(data)
        local = replace(search, data=replace(search.data, data_dir=str(data_dir) if names else search.data.data_dir))
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        work(load_model(*model), local, open_search(local), Path(tmp), tag)
    return tag


def _fail_running(study, tag: str) -> int:
    """Fail the trials a dead worker left RUNNING (a journal has no heartbeats to do it)."""
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("worker") == tag:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            n += 1
    return n


def tune_on_ray(loaded, model: tuple, partitions: str | list[str], out: str | Path, trials: int,
                opts: ExecutorOptions, threads: int = 1, **kw) -> dict:
    """Run (or continue) the study on Ray workers until it holds `trials` finished trials; returns best.json's
    content. `model` is (spec, device, dtype, autocast) for the workers; `kw` as for `search.tune`."""
    out = Path(out).resolve()
    if opts.address and not kw.get("storage"):
        raise LorasumError("tuning on a Ray cluster needs a study every node reaches: pass --storage "
                           "postgresql://USER@HOST/DB (a local study file is not shared between machines)")
    search = prepare(loaded.model_id, partitions, out, trials, default_store="study.journal", **kw)
    with opened(search, out) as study:
        ray, started = connect(opts, threads)
        try:
            files = [resolve_source(d.split("[", 1)[0], search.data.data_dir)
                     for d in dict.fromkeys(partition_domains(search.partition))]
            files = [f for f in files if not f.startswith("hf:")]
            refs = [ray.put(Path(f).read_bytes()) for f in files]
            names = [Path(f).name for f in files]
            n = opts.workers or max(1, int(ray.cluster_resources().get("CPU", threads)) // threads)
            gpu = next(loaded.model.parameters()).device.type == "cuda"  # the driver's model: where `model` loads
            task = ray.remote(max_retries=0, **worker_resources(model[1], n, threads, gpu))(_worker)
            host = socket.gethostname()

            def launch(i: int, attempt: int):
                tag = f"ray:{host}:{i}.{attempt}"
                return task.remote(model, threads, search, tag, names, *refs), (i, attempt, tag)

            running = dict(launch(i, 0) for i in range(n))
            with progress(total=trials, desc=f"tune {search.name} on {n} Ray workers", unit="trial",
                          initial=min(finished(study), trials)) as bar:
                while running:
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                    bar.update(min(finished(study), trials) - bar.n)
                    for ref in ready:
                        i, attempt, tag = running.pop(ref)
                        try:
                            ray.get(ref)
                        except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError,
                                ray.exceptions.NodeDiedError):
                            _fail_running(study, tag)
                            if attempt >= RETRIES:
                                raise LorasumError(f"tuning worker {i} died {attempt + 1} times; check the nodes' "
                                                   "memory and logs (ray logs), then rerun to continue") from None
                            ref2, meta = launch(i, attempt + 1)
                            running[ref2] = meta
                        except ray.exceptions.RayTaskError as e:
                            reraise(e, f"tuning worker {i}")
                    time.sleep(0.01)
                bar.update(min(finished(study), trials) - bar.n)
        finally:
            if started:
                ray.shutdown()
        return finish(study, out, search)
