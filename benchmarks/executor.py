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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-train", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="threads of the serial run")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (1 thread each)")
    args = ap.parse_args()
    data_dir = os.environ.get("LORASUM_DATA_DIR", "../shared/data")
    with tempfile.TemporaryDirectory(prefix="lorasum-bench-") as tmp:
        serial_cfg = load_config(None, "quick", grid(data_dir, args.max_train, args.threads))
        t_serial = timed(serial_cfg, Path(tmp) / "serial")
        ray_cfg = load_config(None, "quick", grid(data_dir, args.max_train, 1))
        t_ray = timed(ray_cfg, Path(tmp) / "ray", ExecutorOptions("ray", workers=args.workers))
        jobs = json.loads((Path(tmp) / "serial" / "timings.json").read_text())
    train = sorted((j["wall_s"] for j in jobs.values() if j["kind"] == "train"), reverse=True)
    total = sum(j["wall_s"] for j in jobs.values())
    print(f"grid: quick preset, max_train {args.max_train}, {len(jobs)} jobs ({len(train)} training), "
          f"{total:.0f} s of job time in the serial run")
    print(f"serial, {args.threads} threads          {t_serial:8.1f} s")
    print(f"ray, {args.workers} workers x 1 thread    {t_ray:8.1f} s")
    print(f"ratio serial / ray                {t_serial / t_ray:8.2f}x")
    print(f"longest training job {train[0]:.1f} s: the floor for any number of workers (before the jobs using it)")


if __name__ == "__main__":
    main()
