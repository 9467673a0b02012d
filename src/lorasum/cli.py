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
    pass


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
