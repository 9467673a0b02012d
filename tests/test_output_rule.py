"""One output rule for every command that writes a folder: a non-empty folder lorasum did not make (hidden names
included, e.g. a fresh git repository) is refused in one line with exit 2 and left as it was, with or without
--overwrite; --overwrite replaces only lorasum's own finished output."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import one_line_error, snapshot

TRAIN_CAPS = ["--max-train", "4", "--max-validation", "2", "--max-length", "16"]


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
        one_line_error(run_cli(*args, *extra), out, content.split("/")[0], quiet=True)
        assert snapshot(tmp_path) == before  # nothing written, nothing left beside it


def test_overwrite_replaces_only_lorasums_own_adapter(ddir, tmp_path, run_cli):
    out = tmp_path / "adapter"
    args = command("train", ddir, tmp_path, out)
    assert run_cli(*args)[0] == 0
    first = snapshot(out)
    one_line_error(run_cli(*args), "finished adapter", "--overwrite")  # a finished adapter: only with --overwrite
    assert snapshot(out) == first
    rc, _, err, _ = run_cli(*args, "--seed", "7", "--overwrite")
    assert rc == 0, err
    assert set(snapshot(out)) == set(first) and snapshot(out) != first  # replaced by the new adapter
    (out / "notes.txt").write_text("the user's")  # now the folder holds something lorasum did not write
    one_line_error(run_cli(*args, "--overwrite"), "notes.txt")
    assert (out / "notes.txt").read_text() == "the user's"


def test_compose_refuses_its_own_finished_adapter_it_has_no_overwrite(tmp_path, run_cli):
    out = tmp_path / "mm"
    args = command("compose", tmp_path, tmp_path, out)
    assert run_cli(*args)[0] == 0
    first = snapshot(out)
    one_line_error(run_cli(*args), "finished adapter")
    assert snapshot(out) == first
