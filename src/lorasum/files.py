"""Durable, atomic writes: every file lorasum leaves behind is complete or absent, and survives a power cut once
published; interrupted writes are repaired or removed by the next write of the same path (`recover`, `sweep`).

Also the one reader of untrusted JSON files (`read_json`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import LorasumError


# Names of in-flight writes: `.NAME.PID.RANDOM.tmp` (a temp file or folder; after an exchange, the old folder) and
# `.NAME.PID.journal` (a folder replacement in progress where the filesystem cannot exchange). The pid lets the next
# run tell a dead writer's leftovers from a live writer's work.
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?:tmp|old)$")
_JOURNAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.journal$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.(?:[A-Za-z0-9_]{8}\.tmp|old-\d+)$")  # before names carried the writer's pid
MAX_NAME_BYTES = 200  # the filesystem's 255 less room for the temp-name decoration above
EXCHANGE = True  # use renameat2(RENAME_EXCHANGE) where available; tests turn it off to exercise the journal


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int | None) -> bool:
    """Whether the writer `pid` may still be working (None: a name from before names carried the pid: dead)."""
    if pid is None or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing component of `path`'s parents that is not a folder (so `path` cannot be created)."""
    return next((p for p in reversed([path.parent, *path.parent.parents]) if p.exists() and not p.is_dir()), None)


def _write_error(path: Path, e: OSError) -> LorasumError:
    """An OS refusal to write (permissions, read-only or full filesystem, name too long) as one line."""
    why = e.strerror or type(e).__name__
    fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
           errno.ENAMETOOLONG: "choose a shorter name"}.get(e.errno, "choose a folder you can write to")
    return LorasumError(f"cannot write {path}: {why}; {fix}")


def check_out_path(path: str | os.PathLike, flag: str = "--out", folder: bool = True) -> Path:
    """Refuse, before any work, an output path that cannot be written: no name (`.`, `..`, `/`), a name too long
    for the filesystem, a file where a parent folder should be, a parent lorasum may not write to, or (for `folder`)
    an existing file / (else) an existing folder."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise LorasumError(f"{flag} '{path}' names no {'folder' if folder else 'file'}; "
                           f"give it a name, e.g. {flag} {path / 'out' if folder else path / 'out.jsonl'}")
    long = next((p for p in path.parts if len(os.fsencode(p)) > MAX_NAME_BYTES), None)
    if long is not None:
        raise LorasumError(f"{flag} {path}: the name '{long[:40]}…' is {len(os.fsencode(long))} bytes; names are "
                           f"limited to {MAX_NAME_BYTES} bytes (the filesystem's 255 less lorasum's temp suffix)")
    blocker = _file_in_the_way(path)
    if blocker is not None:
        raise LorasumError(f"{flag} {path}: {blocker} is a file, not a folder; choose another path")
    if folder and path.exists() and not path.is_dir():
        raise LorasumError(f"{flag} {path} exists and is not a folder; choose another path")
    if not folder and path.is_dir():
        raise LorasumError(f"{flag} {path} is a folder; pass a file path, e.g. {flag} {path / 'out.jsonl'}")
    nearest = next(p for p in [*([path] if folder else []), path.parent, *path.parent.parents] if p.exists())
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise LorasumError(f"{flag} {path}: {nearest.resolve()} is not writable by this user; "
                           "choose a folder you can write to")
    return path


def _make_parent(path: Path) -> None:
    """mkdir -p the parent of `path`; a file in the way or an OS refusal is a LorasumError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(path) or path.parent
        raise LorasumError(f"cannot write {path}: {blocker} is a file, not a folder; choose another path") from None
    except OSError as e:
        raise _write_error(path.parent, e) from None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root`, then `root` itself, so a renamed tree is complete on disk."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _pid(m: re.Match) -> int | None:
    pid = m.groupdict().get("pid")
    return int(pid) if pid else None


def recover(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted replacement of `path` and remove dead writers' temp leftovers beside it.

    A journal left by a killed replacement (see `atomic_dir`) is completed: if `path` is missing, its new folder is
    moved in; then the old folder and the journal are removed. Live writers' files are never touched.
    """
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = _JOURNAL.match(entry.name)
        if not m or m["name"] != path.name or _alive(_pid(m)):
            continue
        try:
            plan = json.loads(entry.read_text(encoding="utf-8"))
            new, old = path.parent / plan["new"], path.parent / plan["old"]
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
            continue
        if not path.exists() and new.is_dir():
            os.replace(new, path)  # killed between the two renames: roll forward to the complete new folder
            fsync_dir(path.parent)
        _remove(old)
        _remove(new)
        entry.unlink(missing_ok=True)
    for entry in entries:
        m = _TEMP.match(entry.name) or _LEGACY.match(entry.name)
        if m and m["name"] == path.name and os.path.lexists(entry) and not _alive(_pid(m)):
            _remove(entry)


def sweep(root: str | os.PathLike) -> int:
    """Recover every interrupted write below `root` (see `recover`); returns how many leftovers were removed."""
    root = Path(root)
    removed = 0
    for folder, dirs, files in os.walk(root):
        for name in [*files, *dirs]:
            m = _TEMP.match(name) or _LEGACY.match(name) or _JOURNAL.match(name)
            if m:
                before = os.path.lexists(os.path.join(folder, name))
                recover(Path(folder) / m["name"])
                removed += before and not os.path.lexists(os.path.join(folder, name))
        dirs[:] = [d for d in dirs if os.path.isdir(os.path.join(folder, d))]
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`, and fsync the folder."""
    path = Path(path)
    _make_parent(path)
    if path.is_dir():
        raise LorasumError(f"cannot write {path}: it is a folder; choose a file path")
    recover(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        pause_for_test("write", str(path), tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the filesystem lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if EXCHANGE else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(new: Path, path: Path) -> None:
    """Put the complete folder `new` at `path`, which exists: the final path always holds the old or the new
    folder, or (only between a journal's two renames) nothing, which `recover` repairs from the journal."""
    if _exchange(new, path):
        pause_for_test("exchanged", str(path), str(new))
        fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
        return
    journal = path.with_name(f".{path.name}.{os.getpid()}.journal")
    old = path.with_name(f"{_temp_prefix(path)}{new.name.split('.')[-2]}.old")
    atomic_write_json(journal, {"target": path.name, "new": new.name, "old": old.name})
    os.replace(path, old)
    pause_for_test("aside", str(path), str(new))
    os.replace(new, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    journal.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it is fsynced and then published at `path` in one rename (or,
    replacing an existing folder, one atomic exchange; see `_replace_dir`).

    A non-empty `path` is replaced only with `overwrite` (LorasumError otherwise, raised before publishing). On any
    exception the temp folder is removed and `path` is left as it was. Leftovers of an interrupted earlier write
    of `path` are cleaned up first.
    """
    path = check_out_path(path, "output folder")  # a name, no file in the way, not an existing file
    _make_parent(path)
    recover(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files: give them the usual permissions
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~_umask())
        _fsync_tree(tmp)
        pause_for_test("publish", str(path), str(tmp))
        if path.exists():
            if not overwrite and any(path.iterdir()):
                raise LorasumError(f"{path} exists and is not empty; choose a new folder or remove it")
            _replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
            fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
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


def content_digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): what a file lorasum wrote must still hash to."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


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
BARRIER_ENV = "LORASUM_TEST_BARRIER"  # "DIR:N": N processes meet in DIR before they start work


def pause_for_test(point: str, target: str = "", holding: str = "") -> None:
    """Test-only: with LORASUM_TEST_PAUSE naming this point, write the marker file (its text: `holding`, else
    `target`, else this process's pid) and sleep, so a test can SIGKILL the process exactly here. Once the marker
    exists, later arrivals pass (a retried job is not paused again). Unset (outside tests) it does nothing."""
    want = os.environ.get(PAUSE_ENV)
    if not want:
        return
    name, _, part = want.partition(":")
    if name != point or part not in target:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker and os.path.exists(marker):
        return  # one pause per marker: a job retried after the kill runs through
    if marker:
        tmp = f"{marker}.{os.getpid()}.tmp"  # two workers can arrive at once: each its own temp, the first link wins
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(holding or target or str(os.getpid()))
        try:
            os.link(tmp, marker)
        except FileExistsError:
            return  # another process holds the pause; this one runs through
        finally:
            os.unlink(tmp)
    deadline = time.monotonic() + 600  # a test that never kills still ends
    while time.monotonic() < deadline:
        time.sleep(0.05)


def barrier_for_test() -> None:
    """Test-only: with LORASUM_TEST_BARRIER=DIR:N, wait until N processes (this one included) have arrived, so a
    test of parallel workers does not depend on which one finished starting first. Unset it does nothing."""
    want = os.environ.get(BARRIER_ENV)
    if not want:
        return
    folder, _, n = want.rpartition(":")
    open(os.path.join(folder, f"{socket.gethostname()}.{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
        time.sleep(0.02)
