"""Atomic writes: every file lorasum leaves behind is either complete or absent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import LorasumError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing component of `path`'s parents that is not a folder (so `path` cannot be created)."""
    return next((p for p in reversed([path.parent, *path.parent.parents]) if p.exists() and not p.is_dir()), None)


def check_out_path(path: str | os.PathLike, flag: str = "--out", folder: bool = True) -> Path:
    """Refuse, before any work, an output path that cannot be written: no name (`.`, `..`, `/`), a file where a
    parent folder should be, or (for `folder`) an existing file / (else) an existing folder."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise LorasumError(f"{flag} '{path}' names no {'folder' if folder else 'file'}; "
                           f"give it a name, e.g. {flag} {path / 'out' if folder else path / 'out.jsonl'}")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise LorasumError(f"{flag} {path}: {blocker} is a file, not a folder; choose another path")
    if folder and path.exists() and not path.is_dir():
        raise LorasumError(f"{flag} {path} exists and is not a folder; choose another path")
    if not folder and path.is_dir():
        raise LorasumError(f"{flag} {path} is a folder; pass a file path, e.g. {flag} {path / 'out.jsonl'}")
    return path


def _make_parent(path: Path) -> None:
    """mkdir -p the parent of `path`; a file in the way is a LorasumError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(path) or path.parent
        raise LorasumError(f"cannot write {path}: {blocker} is a file, not a folder; choose another path") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    _make_parent(path)
    if path.is_dir():
        raise LorasumError(f"cannot write {path}: it is a folder; choose a file path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        pause_for_test("write", str(path), tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename.

    A non-empty `path` is replaced only with `overwrite` (LorasumError otherwise, raised before the rename). On any
    exception the temp folder is removed and `path` is left as it was.
    """
    path = check_out_path(path, "output folder")  # a name, no file in the way, not an existing file
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files: give them the usual permissions
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        if path.exists():
            if not overwrite and any(path.iterdir()):
                raise LorasumError(f"{path} exists and is not empty; choose a new folder or remove it")
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def read_json(path: str | os.PathLike, what: str, fix: str, kind: type | None = dict) -> Any:
    """Read a JSON file (see `parse_json`); with `kind`, the top level must be of that type."""
    path = Path(path)
    try:
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


# --- test-only hook -------------------------------------------------------------------------------------------------
PAUSE_ENV = "LORASUM_TEST_PAUSE"  # "train" (after the first optimizer step) or "write[:PART]" (temp file written,
PAUSE_MARKER_ENV = "LORASUM_TEST_PAUSE_MARKER"  # not yet renamed; PART: a substring of the target path)


def pause_for_test(point: str, target: str = "", holding: str = "") -> None:
    """Test-only: with LORASUM_TEST_PAUSE naming this point, write the marker file (its text: `holding` or
    `target`) and sleep, so a test can SIGKILL the process exactly here. Unset (outside tests) it does nothing."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, part = want.partition(":")
    if name != point or part not in target:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            f.write(holding or target)
        os.replace(marker + ".tmp", marker)
    deadline = time.monotonic() + 600  # a test that never kills still ends
    while time.monotonic() < deadline:
        time.sleep(0.05)
