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


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    return {
        **{pkg: _version(pkg) for pkg in PACKAGES},
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "torch_threads": torch.get_num_threads(),
    }
