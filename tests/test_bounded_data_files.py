"""Bounded data files: a data file is refused by size before it is read (parquet by its uncompressed size), JSONL
and CSV are streamed a bounded line at a time, and only regular files are read; each refusal is one line naming the
file, with exit code 2. The other bounded inputs: test_bounded_inputs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import color_rows, one_line_error, write_jsonl

from lorasum.errors import LorasumError
from lorasum.lm import datafiles

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- data files: bounded size, streamed lines, only regular files --------------------------------------------------
def _read(path: Path, data_dir: Path | None = None):
    return datafiles.read_rows(datafiles.resolve_source(str(path) if data_dir is None else path.stem,
                                                        None if data_dir is None else str(data_dir)))


def test_a_huge_sparse_data_file_is_refused_before_it_is_read(tmp_path):
    """2 GB sparse .csv and .jsonl files (no disk used) are refused in one line, under a 1 GiB memory limit."""
    for ext in (".csv", ".jsonl"):
        f = tmp_path / f"big{ext}"
        subprocess.run(["truncate", "-s", "2G", str(f)], check=True)
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from lorasum.errors import LorasumError\n"
            "from lorasum.lm.datafiles import read_rows, resolve_source\n"
            "for f in sys.argv[1:]:\n"
            "    try:\n"
            "        read_rows(resolve_source(f, None))\n"
            "    except LorasumError as e:\n"
            "        print(e)\n")
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.csv"), str(tmp_path / "big.jsonl")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=60)
    assert time.monotonic() - start < 30
    lines = p.stdout.splitlines()
    assert len(lines) == 2, (p.stdout, p.stderr[-2000:])
    for line, ext in zip(lines, (".csv", ".jsonl")):
        assert f"big{ext} is 2147483648 bytes, over the {datafiles.MAX_DATA_BYTES}-byte limit" in line


def test_data_file_size_limit_at_and_past_it(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "colors.jsonl", color_rows(5))
    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", f.stat().st_size)
    assert len(_read(f)) == 5
    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", f.stat().st_size - 1)
    with pytest.raises(LorasumError, match=rf"data file {f} is {f.stat().st_size} bytes, over the"):
        _read(f)


def test_parquet_is_bounded_by_its_uncompressed_size(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["q" * 10_000] * 50, "answer": ["a"] * 50}), f)
    meta = pq.ParquetFile(f).metadata
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    assert size > f.stat().st_size  # compressed on disk
    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", size)
    assert len(_read(f)) == 50
    monkeypatch.setattr(datafiles, "MAX_DATA_BYTES", size - 1)
    with pytest.raises(LorasumError, match=rf"holds {size} bytes uncompressed"):
        _read(f)


def test_a_record_line_and_a_csv_field_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "MAX_RECORD_BYTES", 64)
    f = tmp_path / "d.jsonl"
    line = json.dumps({"question": "q", "answer": ""})
    line = json.dumps({"question": "q", "answer": "a" * (63 - len(line))}) + "\n"
    assert len(line) == 64
    f.write_text(line + line)
    assert len(_read(f)) == 2
    f.write_text(line + line[:-2] + "a\"}\n")  # 65 bytes
    with pytest.raises(LorasumError, match=rf"{f}:2: line is over 64 bytes"):
        _read(f)
    c = tmp_path / "d.csv"
    c.write_text('question,answer\nq,"' + "a" * 30 + "\n" + "a" * 30 + '"\n')  # one field over two short lines
    assert len(_read(c)) == 1
    c.write_text('question,answer\nq,"' + "a" * 40 + "\n" + "a" * 40 + '"\n')  # the field is over 64 bytes
    with pytest.raises(LorasumError, match=rf"{c}:\d: not valid CSV .*field larger than field limit"):
        _read(c)


def test_special_files_named_as_data_are_one_line(tmp_path, run_cli):
    d = tmp_path / "data"
    d.mkdir()
    os.mkfifo(d / "math.jsonl")
    with pytest.raises(LorasumError, match=r"math.jsonl is a FIFO \(named pipe\), not a regular file"):
        _read(d / "math.jsonl", d)
    (d / "math.jsonl").unlink()
    (d / "math.jsonl").symlink_to("/dev/zero")
    with pytest.raises(LorasumError, match="math.jsonl is a character device, not a regular file"):
        _read(d / "math.jsonl", d)
    (d / "math.jsonl").unlink()
    (d / "math.jsonl").symlink_to(d / "math.jsonl")
    with pytest.raises(LorasumError, match="math.jsonl is a symlink loop"):
        _read(d / "math.jsonl", d)
    with pytest.raises(LorasumError, match="math.jsonl is a symlink loop"):
        _read(d / "math.jsonl")  # named as a path
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(LorasumError, match=f"data directory {loop} is a symlink loop"):
        datafiles.resolve_source("math", str(loop))
    one_line_error(run_cli("data", "stats", "--model", "tiny-gpt2", "--data-dir", d, "math"),
                   str(d / "math.jsonl"), "symlink loop")


def _as_nobody(fn) -> str:
    """fn()'s result, computed in a forked child running as an unprivileged user (root reads anything)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, report, exit without running pytest's teardown
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            text = fn()
        except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
            text = f"child failed: {type(e).__name__}: {e}"
        os.write(w, text.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def test_unreadable_data_folder_and_file_are_one_line():
    root = Path(tempfile.mkdtemp(prefix="lorasum-perm-"))
    locked, ok = root / "locked", root / "ok"
    try:
        os.chmod(root, 0o755)
        for folder in (locked, ok):
            write_jsonl(folder / "math.jsonl", color_rows(3))
        os.chmod(locked, 0o000)
        os.chmod(ok, 0o755)
        os.chmod(ok / "math.jsonl", 0o000)

        def read_both() -> str:
            lines = []
            for d in (locked, ok):
                try:
                    datafiles.read_rows(datafiles.resolve_source("math", str(d)))
                    lines.append("read")
                except LorasumError as e:
                    lines.append(str(e))
            return "\n".join(lines)

        lines = _as_nobody(read_both).splitlines()
        assert lines[0].startswith(f"data directory {locked} is not readable by this user"), lines
        assert lines[1] == f"cannot read data file {ok / 'math.jsonl'}: Permission denied; check its permissions"
    finally:
        os.chmod(locked, 0o755)
        subprocess.run(["rm", "-rf", str(root)], check=False)


