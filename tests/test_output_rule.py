"""One output rule for every command that writes a folder: a non-empty folder lorasum did not make (hidden names
included, e.g. a fresh git repository) is refused in one line with exit 2 and left as it was, with or without
--overwrite; --overwrite replaces only lorasum's own finished output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import color_rows, shape_rows, write_jsonl

TRAIN_CAPS = ["--max-train", "4", "--max-validation", "2", "--max-length", "16"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def ddir(tmp_path) -> Path:
    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(60))
    write_jsonl(tmp_path / "data" / "shapes.jsonl", shape_rows(60))
    return tmp_path / "data"


def _adapters(tmp_path: Path) -> tuple[Path, Path]:
    from test_fuzz_readers import _valid, _write_adapter

    return (_write_adapter(tmp_path / "a", *_valid([2, 2], [4, 4], 0)),
            _write_adapter(tmp_path / "b", *_valid([2, 2], [4, 4], 1)))


def command(name: str, ddir: Path, tmp_path: Path, out: Path) -> list:
    """`name` with every other argument valid, so only --out can be refused."""
    a, b = _adapters(tmp_path)
    model = ["--model", "tiny-gpt2"]
    return {
        "train": ["train", *model, "--data-dir", ddir, "--data", "colors", *TRAIN_CAPS, "--out", out],
        "demo": ["demo", *model, "--data-dir", ddir, "--domain", "colors", "--out", out],
        "compose": ["compose", a, b, "--out", out],
        "merge": ["merge", *model, "--adapter", a, "--out", out],
        "tune": ["tune", *model, "--data-dir", ddir, "--data", "colors", "--trials", "1", "--out", out],
        "search-weights": ["search-weights", a, b, *model, "--data-dir", ddir, "--data", "colors", "--trials", "1",
                           "--out", out],
        "experiment": ["experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir", ddir,
                       "--out", out],
    }[name]


OVERWRITES = {"train", "demo", "experiment"}


@pytest.mark.parametrize("name", ["train", "demo", "compose", "merge", "tune", "search-weights", "experiment"])
@pytest.mark.parametrize("content", ["notes.txt", ".git/HEAD"])
def test_every_output_folder_lorasum_did_not_make_is_refused(name, content, ddir, tmp_path, run_cli):
    out = tmp_path / "mine"
    (out / content).parent.mkdir(parents=True, exist_ok=True)
    (out / content).write_text("the user's")
    args = command(name, ddir, tmp_path, out)
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]) if name in OVERWRITES else ([],):
        rc, stdout, err, _ = run_cli(*args, *extra)
        assert rc == 2 and stdout == "" and err.count("\n") == 1 and err.startswith("lorasum: error: "), err
        assert str(out) in err and content.split("/")[0] in err, err
        assert snapshot(tmp_path) == before  # nothing written, nothing left beside it


def test_overwrite_replaces_only_lorasums_own_adapter(ddir, tmp_path, run_cli):
    out = tmp_path / "adapter"
    args = command("train", ddir, tmp_path, out)
    assert run_cli(*args)[0] == 0
    first = snapshot(out)
    rc, _, err, _ = run_cli(*args)  # a finished adapter: only with --overwrite
    assert rc == 2 and "finished adapter" in err and "--overwrite" in err and snapshot(out) == first
    rc, _, err, _ = run_cli(*args, "--seed", "7", "--overwrite")
    assert rc == 0, err
    assert set(snapshot(out)) == set(first) and snapshot(out) != first  # replaced by the new adapter
    (out / "notes.txt").write_text("the user's")  # now the folder holds something lorasum did not write
    rc, _, err, _ = run_cli(*args, "--overwrite")
    assert rc == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "the user's"


def test_compose_refuses_its_own_finished_adapter_it_has_no_overwrite(tmp_path, run_cli):
    out = tmp_path / "mm"
    args = command("compose", tmp_path, tmp_path, out)
    assert run_cli(*args)[0] == 0
    first = snapshot(out)
    rc, _, err, _ = run_cli(*args)
    assert rc == 2 and "finished adapter" in err and snapshot(out) == first
