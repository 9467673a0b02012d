"""Where the grid's jobs run: in this process one after another (`serial`), or fanned out over Ray workers (`ray`).

Executors are runtime choices, never part of the config, its hash or the results: a job's artifact depends only on
its spec and the thread count it ran with, so a run started serially resumes on Ray and the other way round, and
both give byte-identical results at the same threads per job.

Ray assumes no shared filesystem. The driver ships each job the data files, adapters and weight-search results it
reads (through Ray's object store), a worker runs it in a private temporary run folder, sends the artifact's bytes
back, and the driver publishes it atomically in the real run folder. Each worker is an actor that loads the base model once and keeps it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..cluster import RETRIES, ExecutorOptions, connect, reraise, worker_resources
from ..errors import LorasumError
from ..files import atomic_dir, atomic_write_bytes
from ..lm.data import partition_domains, resolve_source
from ..lm.models import LoadedModel, load_model, set_threads
from .jobs import JOB_KINDS, artifact_path, run_job
from .jobspec import adapter_dir

OnDone = Callable[[dict, dict, float], None]  # (spec, timings the job measured, wall seconds)


def needed_inputs(spec: dict) -> list[str]:
    """What a job reads from the run folder, as paths relative to it, in a stable order: its adapters' folders and
    other jobs' JSON artifacts (an eval's weight search)."""
    kind = JOB_KINDS[spec["kind"]]
    keys = [t["train_key"] for field in kind.terms for t in spec.get(field) or []] + list(spec.get("all", []))
    paths = [str(adapter_dir("", k)) for k in dict.fromkeys(keys)]
    return paths + ([f"searches/{spec['weights_from']}.json"] if spec.get("weights_from") else [])


def _published(path: Path) -> bool:
    """An input is there: a JSON artifact as its file, an adapter folder with its weights."""
    return path.is_file() or (path / "adapter_model.safetensors").is_file()


def needed_sources(spec: dict) -> list[str]:
    """The local data files a job reads (hub datasets are fetched by the worker itself)."""
    names = []
    if "partition" in spec:
        names += partition_domains(spec["partition"])
    if "domain" in spec:
        names.append(spec["domain"])
    names += list(spec.get("domains", []))
    files = []
    for name in dict.fromkeys(names):
        path = resolve_source(name.split("[", 1)[0], spec.get("data_dir"))
        if not path.startswith("hf:"):
            files.append(path)
    return files


def run_serial(jobs: list[dict], loaded: LoadedModel, on_done: OnDone) -> None:
    """Every job in this process on the caller's loaded model, in the given order (which respects what each reads),
    with the caller's thread count."""
    for job in jobs:
        t0 = time.perf_counter()
        measured: dict = {}
        run_job(job, loaded, measured)
        on_done(job, measured, time.perf_counter() - t0)


# --- the worker side ------------------------------------------------------------------------------------------------
def run_detached(spec: dict, sources: dict[str, bytes], inputs: dict[str, dict[str, bytes]],
                 loaded: LoadedModel | None) -> tuple[dict[str, bytes], dict]:
    """Run one job in a private temporary run folder from shipped inputs: data files by name, and run-folder inputs
    by path (each as `read_artifact` gives it); returns its artifact's files (relative path → bytes; one entry ""
    for a JSON artifact) and the timings it measured."""
    with tempfile.TemporaryDirectory(prefix="lorasum-job-") as tmp:
        run_dir, data_dir = Path(tmp) / "run", Path(tmp) / "data"
        data_dir.mkdir()
        for name, data in sources.items():
            (data_dir / name).write_bytes(data)
        for path, files in inputs.items():
            for rel, data in files.items():
                target = run_dir / path / rel if rel else run_dir / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        local = {**spec, "run_dir": str(run_dir), **({"data_dir": str(data_dir)} if sources else {})}
        measured: dict = {}
        out = run_job(local, loaded, measured)
        return read_artifact(out), measured


def read_artifact(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {"": path.read_bytes()}


def publish(spec: dict, files: dict[str, bytes]) -> None:
    """Write a worker's artifact into the driver's run folder, atomically."""
    path = artifact_path(spec)
    if set(files) == {""}:
        atomic_write_bytes(path, files[""])
        return
    with atomic_dir(path, overwrite=True) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)


class Worker:
    """One Ray actor: loads each base model once and runs jobs on it with a fixed thread count."""

    def __init__(self, threads: int):
        set_threads(threads)
        self.models: dict[tuple, LoadedModel] = {}

    def where(self) -> dict:
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id()}

    def run(self, spec: dict, source_names: list[str], input_paths: list[str], *blobs):
        """Run `spec`; `blobs` are the sources' bytes then the run-folder inputs' files (Ray resolves them from the
        object store), in the order of the two name lists."""
        sources = dict(zip(source_names, blobs[:len(source_names)]))
        inputs = dict(zip(input_paths, blobs[len(source_names):]))
        loaded = None
        if JOB_KINDS[spec["kind"]].needs_model:
            key = (spec["model"], spec.get("device"), spec.get("dtype"), spec.get("autocast"))
            if key not in self.models:
                self.models[key] = load_model(*key)
            loaded = self.models[key]
        t0 = time.time()
        files, measured = run_detached(spec, sources, inputs, loaded)
        return files, measured, {**self.where(), "start": t0, "end": time.time()}


# --- the driver side ------------------------------------------------------------------------------------------------
def run_ray(jobs: list[dict], run_dir: Path, threads: int, opts: ExecutorOptions, on_done: OnDone,
            placements: list | None = None) -> None:
    """Run `jobs` on Ray workers, each job as soon as what it reads exists (adapters, weight-search results);
    publish each artifact here.

    A worker that dies mid-job is replaced and the job runs again (up to RETRIES times); a job's own error stops the
    run after the jobs already finished are published. `placements` collects where and when each job ran.
    """
    ray, started = connect(opts, threads)
    try:
        cpus = int(ray.cluster_resources().get("CPU", threads))
        n = opts.workers or max(1, cpus // threads)
        device = next((j.get("device") for j in jobs if JOB_KINDS[j["kind"]].needs_model), None)  # one per run
        actor = ray.remote(max_restarts=0, **worker_resources(device, n, threads, torch.cuda.is_available()))(Worker)
        idle = [actor.remote(threads) for _ in range(n)]
        blobs: dict[str, object] = {}  # data file or run-folder input -> object ref, shipped once

        def blob(name: str, read: Callable[[], object]):
            if name not in blobs:
                blobs[name] = ray.put(read())
            return blobs[name]

        def ready(job: dict) -> bool:
            return all(_published(run_dir / p) for p in needed_inputs(job))

        def submit(job: dict, worker, tries: int) -> None:
            sources, inputs = needed_sources(job), needed_inputs(job)
            refs = [blob(p, lambda p=p: Path(p).read_bytes()) for p in sources]
            refs += [blob(p, lambda p=p: read_artifact(run_dir / p)) for p in inputs]
            in_flight[worker.run.remote(job, [Path(p).name for p in sources], inputs, *refs)] = (job, worker, tries)

        queue, in_flight = list(jobs), {}
        while queue or in_flight:
            for job in [j for j in queue if ready(j)][:len(idle)]:
                queue.remove(job)
                submit(job, idle.pop(), 0)
            if not in_flight:
                raise LorasumError(f"{len(queue)} job(s) wait for adapters or weight-search results no job makes "
                                   f"(first: {queue[0]['key']}); rerun the experiment to re-plan")
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            job, worker, tries = in_flight.pop(ref)
            try:
                files, measured, where = ray.get(ref)
            except ray.exceptions.RayActorError:  # the worker process died: replace it, run the job again
                if tries >= RETRIES:
                    raise LorasumError(f"job {job['key']} lost its worker {tries + 1} times; check the nodes' "
                                       "memory and logs (ray logs) and rerun to resume") from None
                replacement = actor.remote(threads)
                submit(job, replacement, tries + 1)
                continue
            except ray.exceptions.RayTaskError as e:
                reraise(e, f"job {job['key']}")
            publish(job, files)
            idle.append(worker)
            on_done(job, measured, where["end"] - where["start"])
            if placements is not None:
                placements.append({"key": job["key"], **where})
    finally:
        if started:
            ray.shutdown()
