"""Commands on one base model: train, eval, generate, data stats, demo.

Handlers import the library inside themselves, so that `lorasum --help` stays torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import get_args

from ..lm.choices import SPLITS, LossOn
from ..outputs import ADAPTER
from ..delta.registry import method_label
from .algebra import add_method_args, method_choice
from .args import add_data_args, add_model_args, check_out, data_config, expand_domains, load, parse_term, \
    print_json, terms_text, train_config

MAX_DEMO_RECORDS = 100_000  # a demo's slice: more is an experiment, not a demo
TRAIN_FLAGS = (("r", int), ("alpha", float), ("dropout", float), ("max_length", int), ("batch_size", int),
               ("epochs", int), ("lr", float), ("warmup_ratio", float), ("weight_decay", float), ("seed", int),
               ("init", str))


def train_command(args: argparse.Namespace) -> int:
    from ..lm.train import train_adapter

    flags = {k: getattr(args, k) for k, _ in TRAIN_FLAGS if getattr(args, k) is not None}
    flags |= {k: getattr(args, k) for k in ("loss_on", "targets") if getattr(args, k) is not None}
    if args.rslora:
        flags["use_rslora"] = True
    cfg = train_config(args.params, flags)
    check_out(args.out, ADAPTER, overwrite=args.overwrite)
    res = train_adapter(load(args), args.data, args.out, cfg, data_config(args), args.overwrite)
    for e in res.epochs:
        print(f"epoch {e['epoch']}: train loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
              f"val ppl {e['val_perplexity']:.3f}")
    print(f"best epoch {res.best_epoch}; {res.tokens_per_s:.0f} tokens/s; {res.wall_s:.1f} s; saved {res.out}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from ..errors import LorasumError
    from ..files import check_out_path
    from ..lm.data import check_max_length
    from ..lm.evaluate import evaluate

    from ..lm.train import LIMITS
    from ..schema import check_count

    check_count(args.batch_size, "batch_size", LIMITS["eval_batch_size"])
    check_max_length(args.max_length)
    if args.per_example:
        path = check_out_path(args.per_example, "--per-example", folder=False)
        if path.exists() and not args.overwrite:
            raise LorasumError(f"{path} already exists; choose a new file, or pass --overwrite to replace it",
                               key="per_example")
    method, params = method_choice(args)
    loaded = load(args)
    terms, route = applied_terms(loaded, [parse_term(a) for a in args.adapter], method, params)
    res = evaluate(loaded, expand_domains(args.data), terms, data_config(args), args.split, args.max_length,
                   args.batch_size, args.loss_on, args.per_example, route, params, args.general)
    if args.json:
        print_json(res)
        return 0
    routed = f" routed by {method_label(method, params)}" if route else ""
    print(f"model {res['model']}; adapters {terms_text(res['adapters']) or '(none)'}{routed}; split {res['split']}")
    for dom, r in res["results"].items():
        extra = f"  loss {r['loss']:.4f}  tokens {r['tokens']}" if "loss" in r else ""
        print(f"  {dom:<30} perplexity {r['perplexity']:10.4f}{extra}")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from ..lm.generate import generate

    method, params = method_choice(args, seed=False)
    loaded = load(args)
    terms, route = applied_terms(loaded, [parse_term(a) for a in args.adapter], method, params)
    print(generate(loaded, args.prompt, terms, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                   args.template, route, params, args.general))
    return 0


def applied_terms(loaded, terms: list[tuple[str, float]], method: str, params: dict) -> tuple[list, str | None]:
    """(the `PATH[:WEIGHT]` terms as they are served, the route or None): unchanged for the exact sum and for a
    route (evaluate and generate load and check them), else loaded, each checked against the model, and merged by
    `method` (lm.combination)."""
    from ..delta.registry import is_route

    if is_route(method):
        return terms, method
    if method == "sum" or not terms:
        return terms, None
    from ..lm.adapters import adapters_for
    from ..lm.combination import merged_name, method_terms

    adapters = adapters_for(loaded, terms)
    return method_terms([a for a, _ in adapters], [w for _, w in adapters], method, params, loaded,
                        merged_name(adapters, method, params)), None


def data_stats_command(args: argparse.Namespace) -> int:
    from ..lm.data import check_max_length
    from ..lm.datastats import data_stats

    check_max_length(args.max_length)
    rows = data_stats(expand_domains(args.domains), load(args).tokenizer, data_config(args), args.max_length)
    print_json(rows) if args.json else print(format_stats(rows))
    return 0


def format_stats(rows: list[dict]) -> str:
    head = ("domain", "split", "records", "left out", "tokens", "truncated", "answer tok", "no answer",
            "dup q x-split")
    body = [(r["domain"], r["split"], str(r["records"]), str(r.get("skipped_empty", 0)), str(r["tokens"]),
             f"{100 * r['truncated_share']:.1f}%", f"{100 * r['answer_token_share']:.1f}%", str(r["answer_cut_off"]),
             str(r["duplicates_across_splits"])) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    note = ("left out: records with an empty question or answer (never trained on); truncated: records cut at max "
            "length; answer tok: share of tokens that are answer tokens (incl. EOS); "
            "no answer: records whose answer is cut off entirely; dup q x-split: records whose question also appears "
            "in another split")
    return "\n".join(lines) + "\n" + note


def demo_command(args: argparse.Namespace) -> int:
    """Train on a slice of one domain and compare base and adapter perplexity."""
    from ..lm.data import DataConfig
    from ..lm.evaluate import evaluate
    from ..lm.train import TrainConfig, train_adapter
    from ..schema import check_count

    n_train, n_test = (check_count(getattr(args, k), k, MAX_DEMO_RECORDS) for k in ("train_records", "test_records"))
    out = check_out(args.out, ADAPTER, overwrite=args.overwrite)  # never replace a folder lorasum did not make
    loaded, domain = load(args), args.domain
    data = DataConfig(data_dir=args.data_dir, max_records={"train": n_train, "validation": 50, "test": n_test})
    print(f"[1/3] perplexity of {loaded.model_id} on {domain} (test, {n_test} records)")
    base = evaluate(loaded, [domain], [], data)["results"][domain]
    print(f"[2/3] training a LoRA adapter (r=4, alpha=64) on {n_train} {domain} records -> {out}")
    res = train_adapter(loaded, domain, out, TrainConfig(), data, overwrite=args.overwrite)
    print("[3/3] perplexity with the adapter")
    tuned = evaluate(loaded, [domain], [out], data)["results"][domain]
    ratio = tuned["perplexity"] / base["perplexity"]
    print(f"\nbase    {loaded.model_id:<14} {domain}: perplexity {base['perplexity']:.3f} ({base['tokens']} tokens)")
    print(f"adapter {Path(out).name:<14} {domain}: perplexity {tuned['perplexity']:.3f} ({ratio:.2f}x base; "
          f"trained {res.wall_s:.0f} s at {res.tokens_per_s:.0f} tokens/s)")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one LoRA adapter on a domain or merged partition (e.g. math+medicine)")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--data", required=True, help="domain or partition: math, medicine[category=GARD], math+finance")
    p.add_argument("--out", required=True, help="adapter folder to write (stock PEFT format + lorasum.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished adapter lorasum wrote at --out")
    p.add_argument("--params", default=None, help="JSON file of training parameters (e.g. a tuning best.json)")
    p.add_argument("--targets", nargs="+", default=None, help="module names to adapt (default: architecture preset)")
    for name, typ in TRAIN_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help="training parameter (defaults: README, Training)")
    p.add_argument("--loss-on", choices=get_args(LossOn), default=None, help="default: all tokens (as the paper)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r)")
    p.set_defaults(parser=p)

    p = sub.add_parser("eval", help="token-weighted perplexity of the base model plus a weighted sum of adapters")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]",
                   help="adapter to add (repeat: their weighted sum, or their --method merge, is applied)")
    add_method_args(p, routes=True)
    p.add_argument("--data", nargs="+", required=True, help="domains; a+b expands to both (pooled = partition)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--loss-on", choices=get_args(LossOn), default="all")
    p.add_argument("--per-example", default=None, metavar="FILE", help="write per-example NLL and tokens (JSONL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --per-example file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(parser=p)

    p = sub.add_parser("generate", help="text from the base model with a sum of adapters applied")
    add_model_args(p)
    p.add_argument("prompt", help="the question; formatted with the training template")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:WEIGHT]")
    add_method_args(p, seed=False, routes=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", choices=("lorasum", "chat"), default="lorasum",
                   help="lorasum: 'Question: ...\\nAnswer:' (as trained); chat: the model's chat template")
    p.set_defaults(parser=p)
    _add_data_and_demo_parsers(sub)


def _add_data_and_demo_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect domain data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("stats", help="records, tokens, truncation and answer-token share per domain and split")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("domains", nargs="+")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(parser=p)

    p = sub.add_parser("demo", help="train one adapter on a slice of a domain, print base vs adapter perplexity")
    add_model_args(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--domain", default="math")
    p.add_argument("--train-records", type=int, default=200)
    p.add_argument("--test-records", type=int, default=200)
    p.add_argument("--out", default="runs/demo", help="adapter folder to write (absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished adapter lorasum wrote at --out")
    p.set_defaults(parser=p)
