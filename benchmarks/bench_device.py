"""The device a benchmark runs on: `--device`, honest timings on CUDA, and the device's name in what it prints.

CUDA runs kernels asynchronously: a timer read before the queue drains measures the launch, not the work, so every
timed region synchronizes before it starts and before it stops.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable

import torch

from lorasum.errors import LorasumError
from lorasum.lm.models import resolve_device


def add_device_arg(ap: argparse.ArgumentParser) -> None:
    """`--device`: cpu, cuda, cuda:N (default: cuda if available, else cpu)."""
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")


def device_or_exit(name: str | None) -> torch.device:
    """The device named (None: cuda if available, else cpu); an unusable one is one line on stderr and exit 2."""
    try:
        return resolve_device(name)
    except LorasumError as e:
        print(f"bench: error: {e.as_flag()}", file=sys.stderr)
        raise SystemExit(2) from None


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` takes on `device`, its queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' for a GPU, 'cpu (x86_64)' for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()})"
