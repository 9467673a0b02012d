"""JSON from files lorasum did not necessarily write: bounded, strict (no NaN), one-line errors naming the file and
the fix; and content hashes of what lorasum wrote."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import LorasumError


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (write a finite number or null)")


def parse_json(text: str, where: str, fix: str) -> Any:
    """Parse JSON text from an untrusted source: a byte-order mark is accepted; NaN/Infinity, nesting deep enough to
    exhaust the parser's recursion, integers beyond the interpreter's digit limit and invalid JSON all become one
    LorasumError naming `where` and ending with `fix`."""
    try:
        return json.loads(text.removeprefix("\ufeff"), parse_constant=_no_constant)
    except RecursionError:
        raise LorasumError(f"{where}: JSON nested too deeply to read; {fix}") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, an integer with thousands of digits
        raise LorasumError(f"{where}: not valid JSON ({str(e).splitlines()[0]}); {fix}") from None


def content_digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): what a file lorasum wrote must still hash to."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


MAX_JSON_BYTES = 256 << 20  # results.json of the largest grid is a few MiB


def read_json(path: str | os.PathLike, what: str, fix: str, kind: type | None = dict) -> Any:
    """Read a JSON file (see `parse_json`); with `kind`, the top level must be of that type."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise LorasumError(f"{what} {path} is not a regular file; {fix}")
        if st.st_size > MAX_JSON_BYTES:
            raise LorasumError(f"{what} {path} is {st.st_size} bytes, over the {MAX_JSON_BYTES >> 20} MiB lorasum "
                               f"reads of a JSON file; {fix}")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise LorasumError(f"{what} {path} not found; {fix}") from None
    except IsADirectoryError:
        raise LorasumError(f"{what} {path} is a folder, not a JSON file; {fix}") from None
    except OSError as e:
        raise LorasumError(f"cannot read {what} {path}: {e.strerror}; {fix}") from None
    except UnicodeDecodeError as e:
        raise LorasumError(f"{what} {path} is not UTF-8 text (byte {e.start}); {fix}") from None
    obj = parse_json(text, f"{what} {path}", fix)
    if kind is not None and not isinstance(obj, kind):
        raise LorasumError(f"{what} {path} is not a JSON {'object' if kind is dict else kind.__name__}; {fix}")
    return obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
