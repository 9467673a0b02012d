"""The `lorasum` command: each subcommand parses its arguments and calls one public function."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import LorasumError


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name (smollm2-135m, tiny-gpt2, tiny-llama), .gguf path, "
                   "local folder or hub id (default: the embedded smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


# ---------------------------------------------------------------------------------------------------------------
# Delta algebra commands (issue 3): similarity, compose, merge.
def _add_delta_commands(sub: argparse._SubParsersAction) -> None:
    # Imports happen in the handlers, so `lorasum --help` does not pay for torch.
    p = sub.add_parser("similarity", help="per-layer cosines and RMS between adapters, from the LoRA factors")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="two or more PEFT adapter folders")
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorasum", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_delta_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
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
