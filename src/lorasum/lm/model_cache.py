"""A converted copy of a GGUF model, so that each process does not de-quantize it again.

Reading SmolLM2's GGUF (parsing its metadata three times, de-quantizing every tensor) takes about 20 s per process;
the same fp32 weights load from safetensors in about a second. The copy is named by the GGUF file's sha256, the
versions of transformers and gguf that converted it and lorasum's conversion version; its stamp records the sha256 of
every small file (config, tokenizer) and the weights' fingerprint, and it is used only when all of them still match:
anything else (a truncated or edited copy, a missing file) means the GGUF is read again and the copy rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..files import atomic_dir, atomic_write_json
from ..jsonfile import sha256_file

CACHE_ENV = "LORASUM_CACHE_DIR"  # where converted models live; "off" (or 0): never read or write one
CONVERSION = 1  # lorasum's own steps after transformers' conversion (see models._convert_gguf); bump when they change
STAMP = "lorasum-converted.json"
WEIGHTS = "model.safetensors"
Fingerprint = Callable[[torch.nn.Module], str]


def cache_root() -> Path | None:
    """$LORASUM_CACHE_DIR, else $XDG_CACHE_HOME/lorasum, else ~/.cache/lorasum (absolute); None when set to `off`
    or when there is no home folder to put it in."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0"):
        return None
    try:
        root = Path(value) if value else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorasum"
    except RuntimeError:  # no HOME and no passwd entry (a container under an arbitrary uid)
        return None
    return root.absolute()


def converted_folder(gguf: Path) -> Path | None:
    """Where the converted copy of `gguf` lives (None: caching is off, or the file cannot be read: reading it
    then names the problem)."""
    root = cache_root()
    if root is None:
        return None
    try:
        digest = sha256_file(gguf)
    except OSError:
        return None
    versions = f"{digest}:{transformers.__version__}:{metadata.version('gguf')}:{CONVERSION}"
    return root / "models" / f"{gguf.stem[:80]}-{hashlib.sha256(versions.encode()).hexdigest()[:20]}"


def _small_files(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in (WEIGHTS, STAMP)}


def load_converted(folder: Path, fingerprint: Fingerprint):
    """(model, tokenizer) from a converted copy whose files and weights still match its stamp, else None."""
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
        if not isinstance(stamp, dict) or stamp.get("files") != _small_files(folder):
            return None
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: the GGUF is read instead
        return None
    return (model, tok) if stamp.get("weights_sha256") == fingerprint(model) else None


def _room_for(root: Path, model: torch.nn.Module) -> bool:
    """Whether the disk holding `root` has twice the copy's size free (a copy is only worth its time)."""
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())
    existing = next(p for p in (root, *root.parents) if p.exists())
    return shutil.disk_usage(existing).free > 2 * size


def save_converted(folder: Path, model: torch.nn.Module, tok, fingerprint: Fingerprint, replace: bool = False) -> None:
    """Write the converted copy atomically; `replace` a damaged one, else leave a copy another process published
    first. A copy that cannot be written (a read-only or full disk, too little room) is skipped: it only saves time."""
    try:
        if not _room_for(folder, model):
            return
        with atomic_dir(folder, overwrite=replace) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / STAMP, {"weights_sha256": fingerprint(model), "files": _small_files(tmp),
                                            "transformers": transformers.__version__})
    except Exception:  # noqa: BLE001 - OSError, LorasumError, safetensors' own errors on a full disk ...
        return


def load_or_convert(gguf: Path, convert: Callable[[Path], tuple], fingerprint: Fingerprint) -> tuple:
    """(model, tokenizer) of `gguf`: from its converted copy when that is whole, else `convert(gguf)`, keeping the
    result as the copy (replacing a damaged one)."""
    folder = converted_folder(gguf)
    hit = load_converted(folder, fingerprint) if folder is not None else None
    if hit is not None:
        return hit
    model, tok = convert(gguf)
    if folder is not None:  # an existing folder that did not load is a damaged copy
        save_converted(folder, model, tok, fingerprint, replace=folder.exists())
    return model, tok
