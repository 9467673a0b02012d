"""A converted copy of a GGUF model, so that each process does not de-quantize it again.

Reading SmolLM2's GGUF (parsing its metadata three times, de-quantizing every tensor) takes about 20 s per process;
the same fp32 weights load from safetensors in under a second. The copy is named by the GGUF file's sha256 and the
transformers version that converted it, holds the weights' fingerprint, and is used only when the loaded weights
hash to it: anything else (a truncated or edited copy, a missing file) is set aside and the GGUF read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import LorasumError
from ..files import atomic_dir, atomic_write_json
from ..jsonfile import sha256_file

CACHE_ENV = "LORASUM_CACHE_DIR"  # where converted models live; "off": never read or write one
STAMP = "lorasum-converted.json"


def cache_root() -> Path | None:
    """$LORASUM_CACHE_DIR, else $XDG_CACHE_HOME/lorasum, else ~/.cache/lorasum; None when set to `off`."""
    value = os.environ.get(CACHE_ENV)
    if value == "off":
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorasum"


def converted_folder(gguf: Path) -> Path | None:
    """Where the converted copy of `gguf` lives (None: caching is off)."""
    root = cache_root()
    if root is None:
        return None
    key = hashlib.sha256(f"{sha256_file(gguf)}:{transformers.__version__}".encode()).hexdigest()[:20]
    return root / "models" / f"{gguf.stem[:80]}-{key}"


def load_converted(folder: Path, fingerprint: Callable[[torch.nn.Module], str]):
    """(model, tokenizer) from a converted copy whose weights hash to its recorded fingerprint, else None."""
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: the GGUF is read instead
        return None
    if not isinstance(stamp, dict) or stamp.get("weights_sha256") != fingerprint(model):
        return None
    return model, tok


def save_converted(folder: Path, model: torch.nn.Module, tok, fingerprint: Callable[[torch.nn.Module], str]) -> None:
    """Write the converted copy atomically (replacing a damaged one); a copy that cannot be written (a read-only
    cache, a full disk, another process publishing the same copy first) is skipped: it only saves time."""
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / STAMP, {"weights_sha256": fingerprint(model),
                                            "transformers": transformers.__version__})
    except (OSError, LorasumError):
        pass
