"""Commands of the study: experiment, report, job, tune.

Handlers import the library inside themselves, so that `lorasum --help` stays torch-free.
"""

from __future__ import annotations

import argparse
import os
from typing import get_args

from ..lm.choices import LossOn
from ..outputs import TUNE
from .args import (add_data_args, add_executor_args, add_model_args, check_out, data_config, executor_options,
                   load, train_config)


def experiment_command(args: argparse.Namespace) -> int:
    from ..errors import LorasumError
    from ..study.config import PRESETS, load_config
    from ..study.experiment import run_experiment

    if not args.preset and not args.config:
        raise LorasumError(f"experiment needs --preset ({', '.join(PRESETS)}) or --config FILE")
    overrides = {k: v for k, v in (("domains", args.domains), ("model", args.model)) if v}
    data_dir = args.data_dir or os.environ.get("LORASUM_DATA_DIR")
    if data_dir:
        overrides["data_dir"] = data_dir
    executor = executor_options(args)
    cfg = load_config(args.config, args.preset, overrides)
    res = run_experiment(cfg, args.out, args.overwrite, executor=executor)
    for f in res["findings"]:
        print(f"{f['claim']} — {f['subject']}: {f['verdict']} ({f['evidence']})")
    print(f"report: {os.path.join(args.out, 'report.html')}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    from ..report.render import write_report

    print(write_report(args.run_dir))
    return 0


def job_command(args: argparse.Namespace) -> int:
    from ..study.jobs import run_job_file

    print(run_job_file(args.spec))
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from .. import schema
    from ..files import check_out_path
    from ..tune.search import HEARTBEAT_S, MAX_HEARTBEAT_S, MAX_TRIALS, tune
    from ..tune.space import default_space, load_space

    heartbeat = HEARTBEAT_S if args.heartbeat is None else args.heartbeat  # 0 is refused, not defaulted
    schema.check_count(args.trials, "trials", MAX_TRIALS)  # before the model and the data load
    schema.check_count(heartbeat, "heartbeat", MAX_HEARTBEAT_S)
    check_out_path(args.out, "--out")  # a name the filesystem takes, in a folder this user may write (or resume in)
    executor = executor_options(args)
    check_out(args.out, TUNE)
    space = load_space(args.space) if args.space else default_space()
    fixed = {k: getattr(args, k) for k in ("r", "alpha", "max_length", "seed", "init", "loss_on", "targets")
             if getattr(args, k) is not None}
    base = train_config(args.params, fixed)
    kw = dict(space=space, storage=args.storage, study_name=args.study, data=data_config(args), base=base,
              seed=base.seed, heartbeat=heartbeat)
    if executor.kind == "ray":
        from ..tune.fanout import tune_on_ray

        best = tune_on_ray(load(args), (args.model, args.device, args.dtype, args.autocast), args.data, args.out,
                           args.trials, executor, args.threads or 1, **kw)
    else:
        best = tune(load(args), args.data, args.out, args.trials, **kw)
    if best:
        tuned = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["tuned"].items())
        print(f"best trial {best['trial']}: val loss {best['value']:.4f} ({tuned}); "
              f"{best['trials']['complete']} complete, {best['trials']['pruned']} pruned")
    else:
        print("no trial completed")
    print(f"wrote {args.out}/best.json, trials.csv, summary.md, history.png, importance.png")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's grid for N domains: train, compose, evaluate, report")
    p.add_argument("--preset", default=None, help="smoke (tests, seconds), quick (the paper's 3 domains, ~20 min on "
                   "2 CPU cores), evidence (6 sub-domains, 15 pairs, 2 seeds: enough pairs to test the RMS relation; "
                   "40 min on 2 idle CPU cores, measured), full (hours) or paper (GPT-2 small, a GPU)")
    p.add_argument("--config", default=None, help="YAML/JSON config (applied over the preset)")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--data-dir", default=None, help="folder with <domain>.jsonl (default: $LORASUM_DATA_DIR)")
    p.add_argument("--domains", nargs="+", default=None, help="override the config's domains")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--overwrite", action="store_true", help="switch an existing run folder to this config")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; a "
                   "config that sets `threads` takes precedence); a runtime setting, not part of the config")
    add_executor_args(p, "results are identical at the same threads per job, and a run resumes on either",
                      workers="worker processes (each loads the model once and runs jobs with the config's threads, "
                      "else --threads, else 1)")
    p.set_defaults(parser=p)

    p = sub.add_parser("report", help="re-render report.md/report.html from RUN_DIR/results.json")
    p.add_argument("run_dir")
    p.set_defaults(parser=p)

    p = sub.add_parser("job", help="run one job spec (train, eval, similarity, ...) in this process")
    p.add_argument("spec", help="JSON job spec")
    p.set_defaults(parser=p)

    p = sub.add_parser("tune", help="Optuna TPE search of dropout, batch size, epochs and lr on the validation split")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--data", action="append", required=True, help="domain or partition; repeat to pool domains "
                   "(trained on their merged data, scored on their pooled validation split)")
    p.add_argument("--trials", type=int, required=True, help="total finished trials the study should reach "
                   "(rerun to continue; complete and pruned trials count)")
    p.add_argument("--space", default=None, metavar="FILE", help="YAML search space (default: dropout 0..0.2, "
                   "batch size {4, 8, 16}, epochs 1..3, lr 1e-4..3e-3 log)")
    p.add_argument("--storage", default=None, metavar="URL", help="SQLAlchemy URL, e.g. postgresql://user@host/db "
                   "(default: sqlite:///OUT/study.db)")
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: tune:<partition>)")
    p.add_argument("--out", required=True, help="folder for best.json, trials.csv, summary.md and plots")
    p.add_argument("--heartbeat", type=int, default=None, metavar="S", help="seconds between a running trial's "
                   "heartbeats; a trial without one for 2*S is failed and retried (default 30)")
    p.add_argument("--params", default=None, help="JSON file of the fixed training parameters (e.g. r, alpha)")
    p.add_argument("--targets", nargs="+", default=None, help="module names to adapt (default: architecture preset)")
    for name, typ in (("r", int), ("alpha", float), ("max_length", int), ("seed", int), ("init", str)):
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help="fixed training parameter")
    p.add_argument("--loss-on", choices=get_args(LossOn), default=None)
    add_executor_args(p, "trials run in parallel against one study (parallel TPE is not reproducible trial for "
                      "trial)", workers="parallel trials", address="needs --storage postgresql://… that every node "
                      "reaches")
    p.set_defaults(parser=p)
