"""The `lorasum` command: parse, call the command's function, and turn a LorasumError into one line and exit 2.

Each module adds its own parsers; COMMANDS maps every command to its handler, named `*_command`, in core (one base
model), algebra (adapter files and merging) or study (experiment, report, job, tune).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable

from ..errors import LorasumError
from ..progress import quiet_libraries
from . import algebra, core, study

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": core.train_command, "eval": core.eval_command, "generate": core.generate_command,
    "data stats": core.data_stats_command, "demo": core.demo_command,
    "similarity": algebra.similarity_command, "compose": algebra.compose_command,
    "search-weights": algebra.search_weights_command, "merge": algebra.merge_command,
    "experiment": study.experiment_command, "report": study.report_command, "job": study.job_command,
    "tune": study.tune_command,
}


class Parser(argparse.ArgumentParser):
    """argparse with lorasum's refusal: one line naming the command and the flag, exit code 2 (no usage block;
    `--help` shows it)."""

    def error(self, message: str):
        command = self.prog.removeprefix("lorasum").strip()
        print(f"lorasum: error: {f'{command}: ' if command else ''}{message}; see {self.prog} --help",
              file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lorasum", description="Modular learning by naive LoRA summation: train, "
                                     "compare, compose and evaluate LoRA deltas exactly.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (core, algebra, study):
        module.add_parsers(sub)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, subcommand included: `compose`, `data stats`."""
    return " ".join(n for n in (args.command, getattr(args, "data_command", None)) if n)


def _message(e: LorasumError, parser: argparse.ArgumentParser | None) -> str:
    """The error's text, its key written as the command's flag when the value came from one."""
    flags = {a.dest for a in parser._actions if a.option_strings} if parser is not None else set()
    return e.as_flag() if e.key in flags else str(e)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a flag argparse refused (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Unable to fetch remote file.*")
    try:
        from transformers.utils import logging as hf_logging  # after parsing: `lorasum --help` stays torch-free

        hf_logging.set_verbosity_error()
        quiet_libraries()
        if getattr(args, "threads", None) is not None:
            from ..lm.models import set_threads

            set_threads(args.threads)
        return int(COMMANDS[command_name(args)](args) or 0)
    except LorasumError as e:
        print(f"lorasum: error: {_message(e, getattr(args, 'parser', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorasum: interrupted", file=sys.stderr)
        return 130
