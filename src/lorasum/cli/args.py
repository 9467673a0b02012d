"""What the commands share: model and data flags, `PATH[:WEIGHT]` terms, `--out` and `--max-rank` checks,
`--params` files, and JSON output. Each check is written here once."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..cluster import EXECUTORS, ExecutorOptions
from ..errors import LorasumError
from ..jsonfile import read_json
from ..lm.choices import SPLITS
from ..outputs import OutKind, check_out_dir


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name (smollm2-135m, tiny-gpt2, tiny-llama), .gguf path, "
                   "local folder or hub id (default: the embedded smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--dtype", default=None, help="weights: float32 (default), bfloat16, float16")
    p.add_argument("--autocast", default=None, help="bfloat16: mixed-precision forward passes over fp32 weights "
                   "(~1.3x faster on CPUs with bf16 instructions); default off")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder with <domain>.jsonl/.csv/.parquet (default: $LORASUM_DATA_DIR)")
    p.add_argument("--question-field", default="question", help="record field holding the question")
    p.add_argument("--answer-field", default="answer", help="record field holding the answer")
    p.add_argument("--split-seed", type=int, default=0, help="salt of the content hash that assigns splits")
    for split in SPLITS:
        p.add_argument(f"--max-{split}", type=int, default=None, metavar="N", help=f"cap on {split} records per domain")


def data_config(args: argparse.Namespace):
    from ..lm.data import DataConfig  # lazy, as every library import here: `lorasum --help` stays torch-free

    caps = {s: getattr(args, f"max_{s}") for s in SPLITS if getattr(args, f"max_{s}", None) is not None}
    return DataConfig(args.data_dir, args.question_field, args.answer_field, args.split_seed, caps)


def load(args: argparse.Namespace):
    from ..lm.models import load_model

    return load_model(args.model, args.device, args.dtype, args.autocast)


def expand_domains(specs: list[str]) -> list[str]:
    from ..lm.data import partition_domains

    return [d for s in specs for d in partition_domains(s)]


def parse_term(text: str) -> tuple[str, float]:
    """Split `PATH[:WEIGHT]` into (path, weight); the weight defaults to 1.0.

    Rule: if `text` names an existing file or folder, it is a path with weight 1 (so a folder may contain ':').
    Otherwise everything after the last ':' must be a finite number (`math:0.5`, `finance:-1`, `x:1e-3`).
    """
    if os.path.exists(text) or ":" not in text:
        if not text:
            raise LorasumError("empty adapter argument; write PATH or PATH:WEIGHT, e.g. math:0.5")
        return text, 1.0
    path, _, raw = text.rpartition(":")
    try:
        weight = float(raw)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise LorasumError(
            f"adapter argument '{text}': weight '{raw}' is not a finite number; "
            f"write PATH:WEIGHT, e.g. {path or 'math'}:0.5")
    if not path:
        raise LorasumError(f"adapter argument '{text}' has no path before ':'; write PATH:WEIGHT, e.g. math:0.5")
    return path, weight


def terms_text(adapters: list[dict]) -> str:
    """`1*math + 0.5*medicine` from a result's [{"name", "weight"}] list."""
    return " + ".join(f"{a['weight']:g}*{a['name']}" for a in adapters)


def check_out(path: str, kind: OutKind, overwrite: bool | None = None) -> Path:
    """`--out` before any work, by the one output rule (`outputs.check_out_dir`); `overwrite` None where the command
    has no --overwrite."""
    return check_out_dir(path, kind, overwrite)


def parse_max_rank(text: str | None) -> int | None:
    """`--max-rank K`: a whole number ≥ 1, or None."""
    if text is None:
        return None
    try:
        k = int(str(text).strip())
    except ValueError:
        k = 0
    if k < 1:
        raise LorasumError(f"--max-rank must be a whole number ≥ 1, got '{text}'")
    return k


def read_params(params_file: str | None) -> dict:
    """`--params FILE`: a JSON object of training parameters, or {"params": {...}} (a tuning best.json)."""
    if not params_file:
        return {}
    params = read_json(params_file, "--params", "pass a JSON object of training parameters (or a tuning best.json)",
                       kind=None)
    params = params.get("params", params) if isinstance(params, dict) else params
    if not isinstance(params, dict):
        raise LorasumError(f"--params {params_file} must hold a JSON object of training parameters")
    return params


def train_config(params_file: str | None, flags: dict):
    """Defaults < `--params FILE` (e.g. a tuning best.json) < explicit flags (typed by argparse, so a type error
    names the file); the value rules are checked on the result."""
    import dataclasses

    from ..lm.train import TrainConfig

    base = TrainConfig.from_dict(read_params(params_file), f"--params {params_file}", strict=True) if params_file \
        else TrainConfig()
    cfg = dataclasses.replace(base, **flags)
    cfg.check()
    return cfg


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def add_executor_args(p: argparse.ArgumentParser, outcome: str, workers: str, address: str = "") -> None:
    """--executor, --workers and --address (an `ExecutorOptions`), worded for what the command runs."""
    p.add_argument("--executor", choices=EXECUTORS, default="serial", help="where the work runs: serial (this "
                   f"process) or ray (Ray workers; pip install 'lorasum[ray]'); {outcome}")
    p.add_argument("--workers", type=int, default=None, help=f"ray: {workers} (default: CPUs ÷ threads each)")
    p.add_argument("--address", default=None, metavar="HOST:PORT", help="ray: join this running cluster (started with "
                   f"`ray start --head`) instead of starting a local one{'; ' + address if address else ''}")


def executor_options(args: argparse.Namespace) -> ExecutorOptions:
    """The checked options of `add_executor_args`."""
    opts = ExecutorOptions(args.executor, args.workers, args.address, args.threads)
    opts.check()
    return opts
