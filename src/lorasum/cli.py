"""The `lorasum` command: each subcommand parses its arguments and calls one public function."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from .errors import LorasumError


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name (smollm2-135m, tiny-gpt2, tiny-llama), .gguf path, "
                   "local folder or hub id (default: the embedded smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--dtype", default=None, help="weights: float32 (default), bfloat16, float16")
    p.add_argument("--autocast", default=None, help="bfloat16: mixed-precision forward passes over fp32 weights "
                   "(~1.3x faster on CPUs with bf16 instructions); default off")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


# ---------------------------------------------------------------------------------------------------------------
# Core commands (issue 2): train, eval, generate, data stats, demo.
def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="folder with <domain>.jsonl/.csv/.parquet (default: $LORASUM_DATA_DIR)")
    p.add_argument("--question-field", default="question", help="record field holding the question")
    p.add_argument("--answer-field", default="answer", help="record field holding the answer")
    p.add_argument("--split-seed", type=int, default=0, help="salt of the content hash that assigns splits")
    for split in ("train", "validation", "test"):
        p.add_argument(f"--max-{split}", type=int, default=None, metavar="N", help=f"cap on {split} records per domain")


def _data_config(args: argparse.Namespace):
    from .data import DataConfig

    caps = {s: getattr(args, f"max_{s}") for s in ("train", "validation", "test") if getattr(args, f"max_{s}", None) is not None}
    return DataConfig(args.data_dir, args.question_field, args.answer_field, args.split_seed, caps)


def _load(args: argparse.Namespace):
    from .models import load_model

    return load_model(args.model, args.device, args.dtype, args.autocast)


def _expand_domains(specs: list[str]) -> list[str]:
    from .data import partition_domains

    return [d for s in specs for d in partition_domains(s)]


def _add_core_commands(sub: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train one LoRA adapter on a domain or merged partition (e.g. math+medicine)")
    _add_common_model_args(p)
    _add_data_args(p)
    p.add_argument("--data", required=True, help="domain or partition: math, medicine[category=GARD], math+finance")
    p.add_argument("--out", required=True, help="adapter folder to write (stock PEFT format + lorasum.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (an adapter or not)")
    p.add_argument("--params", default=None, help="JSON file of training parameters (e.g. a tuning best.json)")
    p.add_argument("--targets", nargs="+", default=None, help="module names to adapt (default: architecture preset)")
    for name, typ in (("r", int), ("alpha", float), ("dropout", float), ("max_length", int), ("batch_size", int),
                      ("epochs", int), ("lr", float), ("warmup_ratio", float), ("weight_decay", float),
                      ("seed", int)):
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None,
                       help=f"default {getattr(defaults, name)}")
    p.add_argument("--loss-on", choices=("all", "answer"), default=None, help="default: all tokens (as the paper)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")

    def _train(args: argparse.Namespace) -> int:
        from .train import train_command

        overrides = {k: getattr(args, k) for k in ("r", "alpha", "dropout", "max_length", "batch_size", "epochs",
                                                   "lr", "warmup_ratio", "weight_decay", "seed", "loss_on",
                                                   "targets") if getattr(args, k) is not None}
        if args.rslora:
            overrides["use_rslora"] = True
        res = train_command(_load(args), args.data, args.out, overrides, args.params, _data_config(args),
                            args.overwrite)
        for e in res.epochs:
            print(f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
                  f"val ppl {e['val_perplexity']:.3f}")
        print(f"best epoch {res.best_epoch}; {res.tokens_per_s:.0f} tokens/s; {res.wall_s:.1f} s; saved {res.out}")
        return 0

    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="token-weighted perplexity of the base model plus a weighted sum of adapters")
    _add_common_model_args(p)
    _add_data_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]",
                   help="adapter to add (repeat: their weighted sum is applied)")
    p.add_argument("--data", nargs="+", required=True, help="domains; a+b expands to both (pooled = partition)")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--loss-on", choices=("all", "answer"), default="all")
    p.add_argument("--per-example", default=None, metavar="FILE", help="write per-example NLL and tokens (JSONL)")
    p.add_argument("--json", action="store_true", help="print JSON")

    def _eval(args: argparse.Namespace) -> int:
        from .evaluate import evaluate

        if args.batch_size < 1:
            raise LorasumError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.max_length < 8:
            raise LorasumError(f"--max-length {args.max_length} is too short; use at least 8 tokens")
        res = evaluate(_load(args), _expand_domains(args.data), args.adapter, _data_config(args), args.split,
                       args.max_length, args.batch_size, args.loss_on, args.per_example)
        if args.json:
            print_json(res)
            return 0
        names = " + ".join(f"{a['weight']:g}*{a['name']}" for a in res["adapters"]) or "(none)"
        print(f"model {res['model']}; adapters {names}; split {res['split']}")
        for dom, r in res["results"].items():
            extra = f"  loss {r['loss']:.4f}  tokens {r['tokens']}" if "loss" in r else ""
            print(f"  {dom:<30} perplexity {r['perplexity']:10.4f}{extra}")
        return 0

    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="text from the base model with a sum of adapters applied")
    _add_common_model_args(p)
    p.add_argument("prompt", help="the question; formatted with the training template")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=("lorasum", "chat"), default="lorasum",
                   help="lorasum: 'Question: ...\\nAnswer:' (as trained); chat: the model's chat template")

    def _generate(args: argparse.Namespace) -> int:
        from .generate import generate

        print(generate(_load(args), args.prompt, args.adapter, args.max_new_tokens, args.temperature, args.top_p,
                       args.seed, args.template))
        return 0

    p.set_defaults(func=_generate)

    p = sub.add_parser("data", help="inspect domain data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("stats", help="records, tokens, truncation and answer-token share per domain and split")
    _add_common_model_args(p)
    _add_data_args(p)
    p.add_argument("domains", nargs="+")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--json", action="store_true")

    def _stats(args: argparse.Namespace) -> int:
        from .data import DataConfig
        from .datastats import data_stats, format_stats

        if args.max_length < 8:
            raise LorasumError(f"--max-length {args.max_length} is too short; use at least 8 tokens")
        rows = data_stats(_expand_domains(args.domains), _load(args).tokenizer, _data_config(args), args.max_length)
        print_json(rows) if args.json else print(format_stats(rows))
        return 0

    p.set_defaults(func=_stats)

    p = sub.add_parser("demo", help="the main job until the experiment grid exists: train on a slice of math, "
                                    "print base vs adapter perplexity")
    _add_common_model_args(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--domain", default="math")
    p.add_argument("--train-records", type=int, default=200)
    p.add_argument("--test-records", type=int, default=200)
    p.add_argument("--out", default="runs/demo")

    def _demo(args: argparse.Namespace) -> int:
        from .train import demo

        demo(_load(args), args.domain, args.out, args.data_dir, args.train_records, args.test_records)
        return 0

    p.set_defaults(func=_demo)


# ---------------------------------------------------------------------------------------------------------------
# Delta algebra commands (issue 3): similarity, compose, merge.
def _add_delta_commands(sub: argparse._SubParsersAction) -> None:
    # Imports happen in the handlers, so `lorasum --help` does not pay for torch.
    p = sub.add_parser("similarity", help="per-layer cosines and RMS between adapters, from the LoRA factors")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="two or more adapter folders, "
                   "each delta scaled by its weight (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def _similarity(args: argparse.Namespace) -> int:
        from .similarity import format_table, similarity

        report = similarity(args.adapters)
        if args.json:
            print_json(report)
        else:
            print(format_table(report))
        return 0

    p.set_defaults(func=_similarity)

    p = sub.add_parser("compose", help="exact weighted sum of adapters, saved as one PEFT adapter folder")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="adapter folders, weight defaults to 1")
    p.add_argument("--max-rank", default=None, metavar="K", help="SVD-compress each layer to rank K")
    p.add_argument("--out", required=True, help="output adapter folder (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="print the full report (per-layer errors) as JSON")

    def _compose(args: argparse.Namespace) -> int:
        from .compose import compose, parse_max_rank

        report = compose(args.adapters, args.out, max_rank=parse_max_rank(args.max_rank))
        if args.json:
            print_json(report)
        else:
            terms = " + ".join(f"{a['weight']:g}*{a['name']}" for a in report["adapters"])
            err = f", relative error {report['relative_error']:.3e}" if report["max_rank"] else ""
            print(f"wrote {report['out']}: {terms}, rank {report['rank']} on {report['layers']} layers{err}")
        return 0

    p.set_defaults(func=_compose)

    p = sub.add_parser("merge", help="add weighted adapter deltas into the base weights and save the model")
    _add_common_model_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:W]", help="repeatable")
    p.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")

    def _merge(args: argparse.Namespace) -> int:
        from .merge import merge

        report = merge(args.adapter, args.out, model=args.model, device=args.device, dtype=args.dtype)
        terms = " + ".join(f"{a['weight']:g}*{a['name']}" for a in report["adapters"])
        print(f"wrote {report['out']}: {report['base_model']['id']} + {terms}")
        return 0

    p.set_defaults(func=_merge)


# ---------------------------------------------------------------------------------------------------------------
# Experiment commands (issue 4): experiment, report, job.
def _add_experiment_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="the paper's grid for N domains: train, compose, evaluate, report")
    p.add_argument("--preset", default=None, help="smoke, quick, full or paper")
    p.add_argument("--config", default=None, help="YAML/JSON config (applied over the preset)")
    p.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    p.add_argument("--data-dir", default=None, help="folder with <domain>.jsonl (default: $LORASUM_DATA_DIR)")
    p.add_argument("--domains", nargs="+", default=None, help="override the config's domains")
    p.add_argument("--model", default=None, help="override the config's model")
    p.add_argument("--overwrite", action="store_true", help="switch an existing run folder to this config")

    def _experiment(args: argparse.Namespace) -> int:
        import os

        from .config import load_config
        from .experiment import run_experiment

        if not args.preset and not args.config:
            raise LorasumError("experiment needs --preset (smoke, quick, full, paper) or --config FILE")
        overrides = {k: v for k, v in (("domains", args.domains), ("model", args.model)) if v}
        data_dir = args.data_dir or os.environ.get("LORASUM_DATA_DIR")
        if data_dir:
            overrides["data_dir"] = data_dir
        cfg = load_config(args.config, args.preset, overrides)
        res = run_experiment(cfg, args.out, args.overwrite)
        for f in res["findings"]:
            print(f"{f['claim']} — {f['subject']}: {f['verdict']} ({f['evidence']})")
        print(f"report: {os.path.join(args.out, 'report.html')}")
        return 0

    p.set_defaults(func=_experiment)

    p = sub.add_parser("report", help="re-render report.md/report.html from RUN_DIR/results.json")
    p.add_argument("run_dir")

    def _report(args: argparse.Namespace) -> int:
        from .report import write_report

        print(write_report(args.run_dir))
        return 0

    p.set_defaults(func=_report)

    p = sub.add_parser("job", help="run one job spec (train, eval, similarity, ...) in this process")
    p.add_argument("spec", help="JSON job spec")

    def _job(args: argparse.Namespace) -> int:
        from .jobs import run_job_file

        print(run_job_file(args.spec))
        return 0

    p.set_defaults(func=_job)


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameter search (issue 5): tune.
def _add_tune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Optuna TPE search of dropout, batch size, epochs and lr on the validation split")
    _add_common_model_args(p)
    _add_data_args(p)
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
    for name, typ in (("r", int), ("alpha", float), ("max_length", int), ("seed", int)):
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help="fixed training parameter")
    p.add_argument("--loss-on", choices=("all", "answer"), default=None)

    def _tune(args: argparse.Namespace) -> int:
        from .train import TrainConfig, read_params
        from .tune import HEARTBEAT_S, tune
        from .tune_space import default_space, load_space

        if args.trials < 1:
            raise LorasumError(f"--trials must be at least 1 (the total number of finished trials), got {args.trials}")
        space = load_space(args.space) if args.space else default_space()
        fixed = {k: getattr(args, k) for k in ("r", "alpha", "max_length", "seed", "loss_on", "targets")
                 if getattr(args, k) is not None}
        base = TrainConfig.from_dict({**read_params(args.params), **fixed})
        best = tune(_load(args), args.data, args.out, args.trials, space, args.storage, args.study,
                    _data_config(args), base, base.seed, args.heartbeat or HEARTBEAT_S)
        if best:
            tuned = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["tuned"].items())
            print(f"best trial {best['trial']}: val loss {best['value']:.4f} ({tuned}); "
                  f"{best['trials']['complete']} complete, {best['trials']['pruned']} pruned")
        else:
            print("no trial completed")
        print(f"wrote {args.out}/best.json, trials.csv, summary.md, history.png, importance.png")
        return 0

    p.set_defaults(func=_tune)


# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorasum", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_core_commands(sub)
    _add_delta_commands(sub)
    _add_experiment_commands(sub)
    _add_tune_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Unable to fetch remote file.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        if getattr(args, "threads", None) is not None:
            from .models import set_threads

            set_threads(args.threads)
        return int(args.func(args) or 0)
    except LorasumError as e:
        print(f"lorasum: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorasum: interrupted", file=sys.stderr)
        return 130


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
