"""Data files: which file a domain name means, whether lorasum may read it, and its rows, read in bounded pieces.

Records are held in memory (several times their bytes, as Python strings), so a data file is refused past
MAX_DATA_BYTES before it is read, and JSONL and CSV are streamed a line at a time with each line (and CSV field)
bounded by MAX_RECORD_BYTES: no input, however large or however it is laid out, is read whole into memory first.
Only regular files are read: a FIFO or a device (`/dev/zero`) would block or never end.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

import pyarrow.parquet as pq

from ..errors import LorasumError
from ..files import stat_or_refuse
from ..jsonfile import parse_json

EXTENSIONS = (".jsonl", ".csv", ".parquet")
DATA_DIR_ENV = "LORASUM_DATA_DIR"
MAX_DATA_BYTES = 1 << 30  # per data file (parquet: uncompressed); the real domains are a few MiB each
MAX_RECORD_BYTES = 16 << 20  # per JSONL line (newline included) and per CSV line and field; long answers are KiB
_FIX = "split it into several domain files, or filter it to the records you need"


def data_dir_from(data_dir: str | None) -> Path | None:
    d = data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(d) if d else None


def _not_regular(mode: int) -> str:
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def check_file(path: str) -> str:
    """`path` if it is a regular data file within MAX_DATA_BYTES; else one line saying what it is instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise LorasumError(f"data file {'is a dangling symlink' if dangling else 'not found'}: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LorasumError(f"data file {path} is a symlink loop; point it at a .jsonl, .csv or .parquet file") \
                from None
        raise LorasumError(f"cannot read data file {path}: {e.strerror}; check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise LorasumError(f"{path} is a folder, not a data file; pass a .jsonl, .csv or .parquet file")
    if not stat.S_ISREG(st.st_mode):
        raise LorasumError(f"data file {path} is {_not_regular(st.st_mode)}, not a regular file; copy the records "
                           "into a .jsonl, .csv or .parquet file")
    if st.st_size > MAX_DATA_BYTES:
        raise LorasumError(f"data file {path} is {st.st_size} bytes, over the {MAX_DATA_BYTES}-byte limit on a data "
                           f"file (lorasum holds its records in memory); {_FIX}")
    return path


def _check_dir(d: Path) -> None:
    """The data directory exists, is a folder (not a symlink loop) and can be listed."""
    where = f"(from data_dir / --data-dir or {DATA_DIR_ENV})"
    st = stat_or_refuse(d, f"data directory not found: {d} {where}",
                        f"data directory {d} {{why}} {where}; pass a folder of data files")
    if not stat.S_ISDIR(st.st_mode):
        raise LorasumError(f"data directory {d} is not a folder {where}; pass a folder of data files")
    if not os.access(d, os.R_OK | os.X_OK):
        raise LorasumError(f"data directory {d} is not readable by this user {where}; check its permissions")


def resolve_source(source: str, data_dir: str | None) -> str:
    """A domain name -> `<data_dir>/<name>.<ext>`; a path stays a path; `hf:` ids stay ids. Every file returned
    passed `check_file`."""
    if source.startswith("hf:"):
        return source
    if Path(source).suffix in EXTENSIONS or os.sep in source:
        return supported(check_file(source))
    d = data_dir_from(data_dir)
    if d is None:
        raise LorasumError(f"domain '{source}' needs a data directory: set data_dir (--data-dir DIR) or {DATA_DIR_ENV}")
    _check_dir(d)
    for name in (*(f"{source}{ext}" for ext in EXTENSIONS), source):
        if os.path.lexists(d / name):
            return supported(check_file(str(d / name)))
    try:
        found = sorted({f.stem for f in d.iterdir() if f.suffix in EXTENSIONS and f.is_file()})
    except OSError as e:
        raise LorasumError(f"cannot list data directory {d}: {e.strerror}; check its permissions") from None
    raise LorasumError(f"unknown domain '{source}' in {d}; found: {', '.join(found) or 'no .jsonl/.csv/.parquet files'}")


def supported(path: str) -> str:
    """A data file of a format lorasum reads; another extension (e.g. .json) is refused rather than read as empty."""
    if not path.endswith(EXTENSIONS):
        raise LorasumError(f"{path}: unsupported data file extension '{Path(path).suffix}'; use .jsonl (one JSON "
                           "object a line), .csv or .parquet")
    return path


def _lines(f: BinaryIO, path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded alone; a line over MAX_RECORD_BYTES is refused unread."""
    lineno = 0
    while raw := f.readline(MAX_RECORD_BYTES + 1):
        lineno += 1
        if len(raw) > MAX_RECORD_BYTES:
            raise LorasumError(f"{path}:{lineno}: line is over {MAX_RECORD_BYTES} bytes, the limit on one record; "
                               "check that the file has one record a line")
        try:
            yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is allowed
        except UnicodeDecodeError:
            raise LorasumError(f"{path}:{lineno}: line is not valid UTF-8; re-encode the file as UTF-8") from None


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise LorasumError(f"cannot read data file {path}: {e.strerror}; check its permissions") from None


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs; bad bytes, JSON or sizes name the file and line."""
    rows: list[tuple[int, dict]] = []
    if path.endswith(".jsonl"):
        with _open(path) as f:
            for lineno, line in _lines(f, path):
                if not line.strip():
                    continue
                row = parse_json(line, f"{path}:{lineno}", "write one JSON object per line")
                if not isinstance(row, dict):
                    raise LorasumError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                rows.append((lineno, row))
    elif path.endswith(".csv"):
        csv.field_size_limit(MAX_RECORD_BYTES)  # long answers are real, but one field is never more than a record
        with _open(path) as f:
            reader = csv.DictReader(line for _, line in _lines(f, path))
            try:
                for r in reader:
                    rows.append((reader.line_num, dict(r)))  # line_num: the record's last physical line
            except csv.Error as e:
                raise LorasumError(f"{path}:{reader.line_num}: not valid CSV ({e}); a field is limited to "
                                   f"{MAX_RECORD_BYTES} bytes") from None
    elif path.endswith(".parquet"):
        rows = _read_parquet(path)
    elif path.startswith("hf:"):
        rows = _read_hub(path[3:])
    return rows


def _read_parquet(path: str) -> list[tuple[int, dict]]:
    """A parquet file's rows, refused before decompression if they would exceed MAX_DATA_BYTES."""
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise LorasumError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    if size > MAX_DATA_BYTES:
        raise LorasumError(f"data file {path} holds {size} bytes uncompressed, over the {MAX_DATA_BYTES}-byte limit "
                           f"on a data file; {_FIX}")
    try:
        table = pf.read()
    except Exception as e:  # noqa: BLE001
        raise LorasumError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    return [(i, r) for i, r in enumerate(table.to_pylist(), 1)]


def _read_hub(dataset_id: str) -> list[tuple[int, dict]]:
    """A hub dataset (`hf:org/name` or `hf:org/name:config`); needs network access, so untested here."""
    import datasets  # only for hub domains: the package adds ~1 s to every process that imports this module

    name, _, config = dataset_id.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001
        raise LorasumError(f"cannot load hub dataset '{name}': {type(e).__name__}: {str(e).splitlines()[0]}") from None
    rows: list[tuple[int, dict]] = []
    for split in ds:  # all upstream splits are pooled: lorasum splits by content itself
        rows.extend((len(rows) + 1, dict(r)) for r in ds[split])
    return rows
