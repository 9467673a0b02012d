"""Durable atomic writes, their crash recovery, the run-folder lock and the untrusted-JSON reader.

The kill tests run a writer in a child process, stop it with SIGKILL at each point of the write (the test-only pause
hook), and check the invariant: the final path holds the old or the new complete output, and the next write (or
`recover`) leaves nothing else behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import file_bytes, kill_when_paused

from lorasum import files
from lorasum.errors import LorasumError
from lorasum.files import atomic_dir, atomic_write_bytes, atomic_write_json, recover, sweep
from lorasum.jsonfile import read_json
from lorasum.lock import LOCK_FILE, folder_lock


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- fsync before publishing ----------------------------------------------------------------------------------------
def _record(monkeypatch) -> list[tuple]:
    """Log fsyncs (by the path the descriptor names) and publishing renames, in order."""
    log: list[tuple] = []
    real_fsync, real_replace, real_exchange = os.fsync, os.replace, files._exchange

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(a, b):
        log.append(("rename", str(a), str(b)))
        real_replace(a, b)

    def exchange(a, b):
        log.append(("rename", str(a), str(b)))
        return real_exchange(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "_exchange", exchange)
    return log


def test_a_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    log = _record(monkeypatch)
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b"x")
    (i, rename), = [(i, e) for i, e in enumerate(log) if e[0] == "rename"]
    assert rename[2] == str(target)
    assert ("fsync", rename[1]) in log[:i]  # the temp file's bytes are on disk before it is published
    assert ("fsync", str(tmp_path)) in log[i + 1:]  # and the rename itself after


@pytest.mark.parametrize("replace", [False, True])
def test_every_file_and_folder_of_a_published_tree_is_fsynced_before_the_publishing_rename(tmp_path, monkeypatch,
                                                                                            replace):
    out = tmp_path / "adapter"
    if replace:
        out.mkdir()
        (out / "old.txt").write_text("old")
    log = _record(monkeypatch)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w" * 10)
        (tmp / "c.json").write_text("{}")
    publish = next(i for i, e in enumerate(log) if e[0] == "rename" and e[2] == str(out))
    tmp = Path(log[publish][1])
    synced = {e[1] for e in log[:publish] if e[0] == "fsync"}
    assert {str(tmp / "sub" / "w.bin"), str(tmp / "c.json"), str(tmp / "sub"), str(tmp)} <= synced
    assert ("fsync", str(tmp_path)) in log[publish + 1:]
    assert file_bytes(out) == {"c.json": b"{}", "sub/w.bin": b"w" * 10}
    assert _hidden(tmp_path) == []


# --- kill at every write point --------------------------------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lorasum import files
    kind, target, exchange = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    files.EXCHANGE = exchange
    if kind == "file":
        files.atomic_write_bytes(target, b"new")
    else:
        with files.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "weights.bin").write_bytes(b"new" * 1000)
            (tmp / "config.json").write_text('{"v": "new"}')
""")

_NEW_DIR = {"config.json": b'{"v": "new"}', "weights.bin": b"new" * 1000}
_OLD_DIR = {"config.json": b'{"v": "old"}', "weights.bin": b"old" * 1000}


def _kill_writer(kind: str, target: Path, point: str, exchange: bool, tmp_path: Path) -> None:
    marker = tmp_path / f"{point}.marker"
    env = {**os.environ, files.PAUSE_ENV: f"{point}:{target.name}", files.PAUSE_MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, kind, str(target), "1" if exchange else "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when_paused(proc, marker, "writer", point, limit=60, poll=0.01)
    marker.unlink()


@pytest.mark.parametrize("point,exchange", [("write", True)])
@pytest.mark.parametrize("existing", [False, True])
def test_a_file_killed_mid_write_is_old_or_absent_and_the_next_write_cleans_up(tmp_path, point, exchange, existing):
    target = tmp_path / "out" / "eval.json"
    target.parent.mkdir()
    if existing:
        target.write_bytes(b"old")
    _kill_writer("file", target, point, exchange, tmp_path)
    assert (target.read_bytes() == b"old") if existing else not target.exists()
    assert len(_hidden(target.parent)) == 1  # the dead writer's complete temp file
    atomic_write_bytes(target, b"next")
    assert target.read_bytes() == b"next" and _hidden(target.parent) == []


@pytest.mark.parametrize("point,exchange,existing", [
    ("publish", True, False),  # a new folder: published by one rename
    ("publish", True, True), ("exchanged", True, True),  # replaced by an atomic exchange
    ("publish", False, True), ("aside", False, True),  # replaced through the journal (no exchange available)
])
def test_a_folder_killed_at_any_point_of_its_replacement_is_old_or_new_and_recover_completes_it(
        tmp_path, point, exchange, existing):
    target = tmp_path / "out" / "adapter"
    target.mkdir(parents=True)
    if existing:
        (target / "config.json").write_bytes(_OLD_DIR["config.json"])
        (target / "weights.bin").write_bytes(_OLD_DIR["weights.bin"])
    _kill_writer("dir", target, point, exchange, tmp_path)
    if point == "aside":  # the one moment without a folder: the journal names both
        assert not target.exists() and any(n.endswith(".journal") for n in _hidden(target.parent))
    elif point == "exchanged":
        assert file_bytes(target) == _NEW_DIR
    else:
        assert file_bytes(target) == (_OLD_DIR if existing else {})
    assert _hidden(target.parent)  # leftovers of the dead writer
    recover(target)  # what the next write, resume or read of this path does first
    assert file_bytes(target) in (_OLD_DIR, _NEW_DIR) if existing else file_bytes(target) in ({}, _NEW_DIR)
    if point in ("aside", "exchanged"):
        assert file_bytes(target) == _NEW_DIR  # the replacement had passed its point of no return
    assert _hidden(target.parent) == []


def test_recover_keeps_a_live_writers_temp_files_and_removes_only_dead_lorasum_leftovers(tmp_path):
    dead = _dead_pid()
    target = tmp_path / "evals.json"
    live = tmp_path / f".evals.json.lorasum-{os.getpid()}.abcdefgh.tmp"
    leftover = tmp_path / f".evals.json.lorasum-{dead}.k2j4h5g6.tmp"
    other = tmp_path / f".other.json.lorasum-{dead}.abcdefgh.tmp"  # another target's: not this write's business
    lookalikes = [".evals.json.k2j4h5g6.tmp", ".evals.json.old-12", f".evals.json.{dead}.abcdefgh.tmp"]
    for p in (live, leftover, other, *(tmp_path / n for n in lookalikes)):
        p.write_text("x")
    recover(target)
    assert sorted(_hidden(tmp_path)) == sorted([live.name, other.name, *lookalikes])


def test_sweep_recovers_interrupted_writes_in_the_folders_lorasum_writes_and_nowhere_else(tmp_path):
    dead = _dead_pid()
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / f".a.json.lorasum-{dead}.abcdefgh.tmp").write_text("{}")
    (tmp_path / "adapters" / f".p.lorasum-{dead}.abcdefgh.tmp").mkdir(parents=True)
    (tmp_path / "adapters" / f".p.lorasum-{dead}.abcdefgh.tmp" / "x").write_text("y")
    (tmp_path / "keep.json").write_text("{}")
    deeper = tmp_path / "evals" / "sub" / f".a.json.lorasum-{dead}.abcdefgh.tmp"  # not a folder lorasum writes
    deeper.parent.mkdir()
    deeper.write_text("mine")
    assert sweep(tmp_path, ["evals", "adapters"]) == 2
    assert file_bytes(tmp_path) == {"keep.json": b"{}", f"evals/sub/{deeper.name}": b"mine"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- refusals ------------------------------------------------------------------------------------------------------
def test_an_output_name_too_long_for_the_filesystem_is_refused_before_any_write(tmp_path):
    with pytest.raises(LorasumError, match=r"is 240 bytes; names are limited to 200"):
        with atomic_dir(tmp_path / ("n" * 240)):
            raise AssertionError("not reached")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(LorasumError, match=r"cannot write .*a\.json: No space left on device; free some space"):
        atomic_write_json(tmp_path / "a.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def _as_nobody(fn) -> tuple[int, str]:
    """Run `fn` in a forked child as user nobody (the test runs as root, whom permissions do not stop)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        code, text = 0, ""
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except LorasumError as e:
            code, text = 2, str(e)
        except BaseException as e:
            code, text = 1, repr(e)
        os.write(write, text.encode())
        os._exit(code)
    os.close(write)
    deadline = time.monotonic() + 60  # a child forked from a threaded process could deadlock: never wait forever
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish within 60 s")
        time.sleep(0.01)
    with os.fdopen(read) as f:
        text = f.read()
    return os.waitstatus_to_exitcode(done[1]), text


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_unwritable_output_folder_is_refused_before_work_naming_it():
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="lorasum-perm-"))  # under /tmp: other users may pass through
    locked = top / "readonly"
    locked.mkdir()
    os.chmod(top, 0o755)
    os.chmod(locked, 0o555)
    request_cleanup = lambda: shutil.rmtree(top, ignore_errors=True)  # noqa: E731
    if os.geteuid() == 0:
        code, text = _as_nobody(lambda: files.check_out_path(locked / "run" / "adapter"))
    else:
        with pytest.raises(LorasumError) as e:
            files.check_out_path(locked / "run" / "adapter")
        code, text = 2, str(e.value)
    try:
        assert code == 2 and f"{locked} is not writable by this user" in text, text
        assert list(locked.iterdir()) == []
    finally:
        request_cleanup()


# --- the run-folder lock ---------------------------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from lorasum.lock import folder_lock
    with folder_lock(sys.argv[1]):
        open(sys.argv[2], "w").close()
        time.sleep(120)
""")


def _hold_lock(folder: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(ready)])
    while not ready.exists():
        assert proc.poll() is None
        time.sleep(0.01)
    return proc


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    proc = _hold_lock(tmp_path, tmp_path)
    try:
        with pytest.raises(LorasumError, match=rf"is in use by another lorasum run \(pid {proc.pid} on .*started"):
            with folder_lock(tmp_path):
                raise AssertionError("not reached")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with folder_lock(tmp_path) as stale:  # the kernel released the dead holder's lock: taken over
        assert stale["pid"] == proc.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released cleanly: no stale trace
    with folder_lock(tmp_path) as stale:
        assert stale == {}


# --- untrusted JSON --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,why", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('{"a": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"a": ', "not valid JSON"),
])
def test_read_json_refuses_hostile_files_naming_them(tmp_path, text, why):
    path = tmp_path / "spec.json"
    path.write_text(text)
    with pytest.raises(LorasumError, match=rf"job spec {path}: .*{why}.*; rewrite it"):
        read_json(path, "job spec", "rewrite it")


def test_read_json_accepts_a_byte_order_mark_and_checks_the_top_level_type(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}')
    assert read_json(path, "config", "fix it") == {"a": 1}
    path.write_text("[1]")
    with pytest.raises(LorasumError, match=r"config .*c\.json is not a JSON object; fix it"):
        read_json(path, "config", "fix it")
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(LorasumError, match=r"is not UTF-8 text \(byte 7\)"):
        read_json(path, "config", "fix it")


def test_reading_an_adapter_whose_replacement_was_killed_between_renames_completes_it(tmp_path):
    from lorasum.delta.peft_format import load_adapter, save_adapter
    from test_fuzz_readers import _valid, _write_adapter

    config, tensors = _valid([2, 2], [4, 4], 0)
    old = load_adapter(_write_adapter(tmp_path / "src", config, tensors))
    target = tmp_path / "out" / "adapter"
    save_adapter(old, target)
    new = load_adapter(_write_adapter(tmp_path / "src2", *_valid([3, 3], [4, 4], 1)))
    script = (f"import sys; from lorasum import files; files.EXCHANGE = False\n"
              f"from lorasum.delta.peft_format import load_adapter, save_adapter\n"
              f"save_adapter(load_adapter({str(tmp_path / 'src2')!r}), {str(target)!r}, overwrite=True)\n")
    marker = tmp_path / "aside.marker"
    env = {**os.environ, files.PAUSE_ENV: f"aside:{target.name}", files.PAUSE_MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    while not marker.exists():
        assert proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    got = load_adapter(target)  # the next command on it rolls the replacement forward
    assert {k: f.rank for k, f in got.layers.items()} == {k: f.rank for k, f in new.layers.items()}
    assert _hidden(target.parent) == []


def test_two_processes_reaching_a_test_pause_at_once_pause_only_one(tmp_path):
    """The kill tests name one process in the marker: a second arrival must run through, not sleep or crash."""
    marker, gate = tmp_path / "m", tmp_path / "gate"
    gate.mkdir()
    code = textwrap.dedent(f"""
        import os, time
        from lorasum.files import pause_for_test
        open(os.path.join({str(gate)!r}, str(os.getpid())), "w").close()
        while not os.path.exists(os.path.join({str(gate)!r}, "go")):
            time.sleep(0.001)
        pause_for_test("train")
    """)
    env = {**os.environ, files.PAUSE_ENV: "train", files.PAUSE_MARKER_ENV: str(marker)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    try:
        t0 = time.time()
        while len(list(gate.iterdir())) < 4:  # all four waiting at the gate
            assert time.time() - t0 < 60 and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        (gate / "go").touch()
        while sum(p.poll() is None for p in procs) > 1 or not marker.exists() \
                or len(list(tmp_path.iterdir())) > 2:  # one paused; the losers exited; no temp left behind
            assert time.time() - t0 < 60, sorted(x.name for x in tmp_path.iterdir())
            time.sleep(0.05)
        running = [p for p in procs if p.poll() is None]
        assert len(running) == 1 and marker.read_text() == str(running[0].pid)
        assert all(p.returncode == 0 for p in procs if p is not running[0]), [p.stderr.read() for p in procs]
        assert sorted(x.name for x in tmp_path.iterdir()) == ["gate", "m"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
