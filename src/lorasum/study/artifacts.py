"""Whether a finished job's artifact is whole: its JSON files read as JSON objects and its safetensors file is
exactly as long as its header says. A damaged artifact is removed (one line on stderr) so that its job runs again."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..errors import LorasumError
from ..jsonfile import parse_json, read_json


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header whose tensors' data_offsets tile the data, and
    exactly that much data: a shorter (truncated) or longer file is refused."""
    fix = "removed: its job runs again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        size = path.stat().st_size
        if n < 2 or 8 + n > size:
            raise LorasumError(f"{path} is truncated (its header does not fit in {size} bytes); {fix}")
        header = parse_json(f.read(n).decode("utf-8", "replace"), str(path), fix)
    offsets = [t.get("data_offsets") for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)] \
        if isinstance(header, dict) else []
    ends = [o[1] for o in offsets if isinstance(o, list) and len(o) == 2 and isinstance(o[1], int)]
    if 8 + n + max(ends, default=0) != size:
        raise LorasumError(f"{path} is truncated or damaged ({size} bytes, its header describes "
                           f"{8 + n + max(ends, default=0)}); {fix}")


def readable(artifact: Path, files: list[Path], tensors: Path | None = None) -> bool:
    """Whether every JSON file of a finished artifact reads as a JSON object, and its safetensors file (if any) is
    whole; if not, the artifact is removed."""
    try:
        for f in files:
            read_json(f, "finished-job artifact", "removed: its job runs again")
        if tensors is not None:
            check_safetensors(tensors)
    except LorasumError as e:
        shutil.rmtree(artifact, ignore_errors=True) if artifact.is_dir() else artifact.unlink(missing_ok=True)
        print(f"lorasum: {e}", file=sys.stderr)
        return False
    return True
