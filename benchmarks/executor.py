"""The same reduced grid run serially and on Ray, side by side, on this machine.

  serial   one process, `--threads` threads per job (default 2: all cores of a 2-core machine)
  ray      `--workers` Ray workers × 1 thread per job (default 2), a local runtime started by the run

Both run the quick preset's grid (embedded SmolLM2, the three real domains) with smaller caps, each into a fresh
run folder; the wall times include loading the model (and, for Ray, starting the runtime). The per-job times of the
serial run (timings.json) give the work on the critical path: no number of workers can finish the grid faster
than its longest training job plus the longest job that needs that adapter.

    LORASUM_DATA_DIR=../shared/data .venv/bin/python benchmarks/executor.py [--max-train 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lorasum.cluster import ExecutorOptions
from lorasum.study.config import load_config
from lorasum.study.experiment import run_experiment


def grid(data_dir: str, max_train: int, threads: int) -> dict:
    return {"data_dir": data_dir, "max_train": max_train, "max_validation": 10, "max_test": 16, "threads": threads,
            "bootstrap_samples": 200}


def timed(cfg, out: Path, executor: ExecutorOptions | None = None) -> float:
    t0 = time.perf_counter()
    run_experiment(cfg, out, executor=executor)
    return time.perf_counter() - t0


def makespan(times: list[float], workers: int) -> float:
    """Longest-first list scheduling of independent jobs on `workers` (within 4/3 of the optimum)."""
    load = [0.0] * workers
    for t in sorted(times, reverse=True):
        i = load.index(min(load))
        load[i] += t
    return max(load)


def project(timings: dict, workers: list[int], slowdown: float = 1.0, scale: dict | None = None,
            copies: int = 1) -> list[tuple]:
    """Projected wall time of a grid from its serial per-job times: the training jobs first, then the jobs that read
    their adapters (a conservative two-phase schedule: the executor starts a job as soon as its adapters exist).
    `slowdown`: per-job time at the workers' thread count ÷ at the serial run's; `scale`: kind -> factor, to project
    a larger preset from a smaller one's jobs; `copies`: the grid repeated (e.g. once per extra seed)."""
    scale = scale or {}
    train = [j["wall_s"] * slowdown * scale.get("train", 1.0) for j in timings.values() if j["kind"] == "train"]
    rest = [j["wall_s"] * slowdown * scale.get(j["kind"], 1.0) for j in timings.values() if j["kind"] != "train"]
    train, rest = train * copies, rest * copies
    serial = copies * sum(j["wall_s"] * scale.get(j["kind"], 1.0) for j in timings.values())
    return [(w, makespan(train, w) + makespan(rest, w), serial) for w in workers]


def print_projection(path: str, slowdown: float, scale: dict | None, copies: int, label: str) -> None:
    timings = json.loads(Path(path).read_text())
    print(f"{label}: {len(timings) * copies} jobs; per-job time on the workers / in the serial run {slowdown:.2f}x")
    print("  workers   projected wall   speed-up vs serial")
    for w, t, serial in project(timings, [1, 2, 4, 8, 16, 32, 64], slowdown, scale, copies):
        print(f"  {w:7d}   {t / 60:10.1f} min   {serial / t:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-train", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="threads of the serial run")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (1 thread each)")
    ap.add_argument("--project", nargs="*", default=None, metavar="LABEL=TIMINGS.json[:TRAIN:EVAL:COPIES]",
                    help="instead of running, project wall times by number of workers from a finished serial run's "
                    "timings.json (TRAIN and EVAL multiply training and other jobs' times and COPIES repeats the "
                    "grid, to project a larger preset); --slowdown: per-job time on a worker ÷ in the serial run")
    ap.add_argument("--slowdown", type=float, default=1.0)
    args = ap.parse_args()
    if args.project is not None:
        for item in args.project:
            label, _, rest = item.partition("=")
            path, *factors = rest.split(":")
            train, other, copies = (float(factors[0]), float(factors[1]), int(factors[2])) if factors else (1, 1, 1)
            scale = {"train": train, "eval": other, "similarity": other, "inplace": other, "data_stats": other}
            print_projection(path, args.slowdown, scale, copies, label)
        return
    data_dir = os.environ.get("LORASUM_DATA_DIR", "../shared/data")
    with tempfile.TemporaryDirectory(prefix="lorasum-bench-") as tmp:
        serial_cfg = load_config(None, "quick", grid(data_dir, args.max_train, args.threads))
        t_serial = timed(serial_cfg, Path(tmp) / "serial")
        ray_cfg = load_config(None, "quick", grid(data_dir, args.max_train, 1))
        t_ray = timed(ray_cfg, Path(tmp) / "ray", ExecutorOptions("ray", workers=args.workers))
        jobs = json.loads((Path(tmp) / "serial" / "timings.json").read_text())
        ray_jobs = json.loads((Path(tmp) / "ray" / "timings.json").read_text())
    train = sorted((j["wall_s"] for j in jobs.values() if j["kind"] == "train"), reverse=True)
    total = sum(j["wall_s"] for j in jobs.values())
    print(f"grid: quick preset, max_train {args.max_train}, {len(jobs)} jobs ({len(train)} training), "
          f"{total:.0f} s of job time in the serial run")
    print(f"serial, {args.threads} threads          {t_serial:8.1f} s")
    print(f"ray, {args.workers} workers x 1 thread    {t_ray:8.1f} s")
    print(f"ratio serial / ray                {t_serial / t_ray:8.2f}x")
    print(f"longest training job {train[0]:.1f} s: the floor for any number of workers (before the jobs using it)")
    slowdown = sum(j["wall_s"] for j in ray_jobs.values()) / total
    print(f"per-job time on 1 thread (ray) / on {args.threads} threads (serial): {slowdown:.2f}x")


if __name__ == "__main__":
    main()
