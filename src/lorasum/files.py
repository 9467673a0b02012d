"""Durable, atomic writes: every file lorasum leaves behind is complete or absent, and survives a power cut once
published; interrupted writes are repaired or removed by the next write of the same path (`recover`, `sweep`).
Reading JSON back lives in `jsonfile`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LorasumError


# Names of in-flight writes: `.NAME.lorasum-PID.RANDOM.tmp` (a temp file or folder; after an exchange, the old folder),
# `.NAME.lorasum-PID.RANDOM.old` (the old folder of a journalled replacement) and `.NAME.lorasum-PID.journal`. The
# tag and the pid say which writer made a name, so recovery touches only a dead lorasum writer's own leftovers.
_TEMP = re.compile(r"^\.(?P<name>.+)\.lorasum-(?P<pid>[1-9][0-9]{0,9})\.(?P<rand>[a-z0-9_]{8})\.(?P<kind>tmp|old)$")
_JOURNAL = re.compile(r"^\.(?P<name>.+)\.lorasum-(?P<pid>[1-9][0-9]{0,9})\.journal$")
MAX_NAME_BYTES = 200  # the filesystem's 255 less room for the temp-name decoration above
EXCHANGE = True  # use renameat2(RENAME_EXCHANGE) where available; tests turn it off to exercise the journal


# Test-only hooks: a named pause where a test SIGKILLs a writer, and a barrier that starts parallel workers
# together. Unset (outside tests) both do nothing.
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


def stat_or_refuse(path: str | os.PathLike, missing: str, unreadable: str) -> os.stat_result:
    """`os.stat(path)`, or a one-line error: `missing` where nothing is there, else `unreadable` with `{why}` replaced
    by the reason (a symlink loop named as such)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise LorasumError(missing) from None
    except OSError as e:
        why = "is a symlink loop" if e.errno == errno.ELOOP else f"cannot be read ({e.strerror})"
        raise LorasumError(unreadable.replace("{why}", why).replace("{strerror}", str(e.strerror))) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    """Whether the writer `pid` may still be working."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
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


def temp_prefix(name: str) -> str:
    """The start of this process's temp names for target `name` (see `_TEMP`)."""
    return f".{name}.lorasum-{os.getpid()}."


def is_temp_name(name: str) -> bool:
    """Whether `name` is one lorasum gives an in-flight write (a temp file or folder, an old folder, a journal)."""
    return bool(_TEMP.match(name) or _JOURNAL.match(name))


def _own(p: Path) -> os.stat_result | None:
    """`p`'s lstat if it is a plain file or folder (never a symlink) owned by this user, else None."""
    try:
        st = os.lstat(p)
    except OSError:
        return None
    plain = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
    return st if plain and st.st_uid == os.geteuid() else None


def _remove_own(p: Path) -> None:
    """Remove `p` if it is this user's plain file or folder; a symlink or anything else is left alone."""
    st = _own(p)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)  # removes links inside, never what they point to
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _journal_names(journal: Path, target: str, pid: int) -> tuple[str, str] | None:
    """The (new, old) folders a dead writer's journal names, if they are exactly the names that writer gives them:
    bare temp names of `target` with the journal's pid and one shared random part. Anything else: None."""
    if _own(journal) is None or not journal.is_file():
        return None
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    new, old = (plan.get("new"), plan.get("old")) if isinstance(plan, dict) else (None, None)
    mn, mo = _TEMP.match(new) if isinstance(new, str) else None, _TEMP.match(old) if isinstance(old, str) else None
    if not (mn and mo and plan.get("target") == target and Path(new).name == new and Path(old).name == old):
        return None
    same = mn["name"] == mo["name"] == target and int(mn["pid"]) == int(mo["pid"]) == pid and mn["rand"] == mo["rand"]
    return (new, old) if same and mn["kind"] == "tmp" and mo["kind"] == "old" else None


def recover(path: str | os.PathLike) -> None:
    """Finish or undo an interrupted replacement of `path` and remove dead writers' temp leftovers beside it.

    Only names a lorasum writer gives `path` (`_TEMP`, `_JOURNAL`) in `path`'s own folder are touched, only once
    their writer is dead, and only plain files and folders owned by this user: a journal's names must be exactly
    its writer's temp names for `path` (else the journal alone is removed), and a symlink is never followed or
    removed. A killed replacement's journal is rolled forward: if `path` is missing, its new folder is moved in.
    """
    path = Path(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = _JOURNAL.match(name)
        if not m or m["name"] != path.name or _alive(int(m["pid"])) or _own(path.parent / name) is None:
            continue
        plan = _journal_names(path.parent / name, path.name, int(m["pid"]))
        if plan is not None:
            new, old = path.parent / plan[0], path.parent / plan[1]
            st = _own(new)
            if not os.path.lexists(path) and st is not None and stat.S_ISDIR(st.st_mode):
                os.replace(new, path)  # killed between the two renames: roll forward to the complete new folder
                fsync_dir(path.parent)
            _remove_own(old)
            _remove_own(new)
        _remove_own(path.parent / name)
    for name in names:
        m = _TEMP.match(name)
        if m and m["name"] == path.name and not _alive(int(m["pid"])):
            _remove_own(path.parent / name)


def sweep(root: str | os.PathLike, folders: Iterable[str] = ()) -> int:
    """Recover every interrupted write in `root` and in each of its sub-`folders` lorasum writes (not below them,
    and never through a symlink); returns how many leftovers were removed."""
    root = Path(root)
    removed = 0
    for folder in [root, *(root / f for f in folders)]:
        st = _own(folder)
        if st is None or not stat.S_ISDIR(st.st_mode):
            continue
        names = os.listdir(folder)
        for target in sorted({m["name"] for n in names if (m := _TEMP.match(n) or _JOURNAL.match(n))}):
            recover(folder / target)
        removed += len(set(names) - set(os.listdir(folder)))
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`, and fsync the folder."""
    path = Path(path)
    _make_parent(path)
    if path.is_dir():
        raise LorasumError(f"cannot write {path}: it is a folder; choose a file path")
    recover(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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
    journal = path.with_name(f"{temp_prefix(path.name)}journal")
    old = path.with_name(f"{temp_prefix(path.name)}{new.name.split('.')[-2]}.old")
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
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent))
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
