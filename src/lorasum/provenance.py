"""Library versions, git revision and device: recorded beside every artifact so results can be traced."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("lorasum", "torch", "transformers", "peft", "safetensors", "gguf", "datasets", "numpy")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def git_revision() -> str | None:
    """The project's git revision (with '+dirty' for uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def device_name(device: str | None = None) -> str:
    """The device a run uses, in words: the GPU's name for cuda[:N] (None/auto: the GPU if present, as load_model
    picks), `cpu (<architecture>)` on the CPU, else the device string."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return str(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev.index or 0)
    return f"cpu ({platform.machine()})" if dev.type == "cpu" else str(dev)


@functools.lru_cache(maxsize=8)
def provenance(device: str | None = None) -> dict:
    """Versions, revision and the device (see device_name) with torch's CUDA version (None on a CPU-only build)."""
    return {
        **{pkg: _version(pkg) for pkg in PACKAGES},
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "device": device_name(device),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
    }
