"""Recovery and sweeping touch only names lorasum itself wrote, in the folder it wrote them: hostile journals
(absolute and `..` names, symlinked entries), a symlinked run lock and look-alike temp names planted beside every
kind of output (adapter, run folder, report, tune folder, weight-search folder) leave everything else as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import color_rows, one_line_error, snapshot, write_data_folder, write_jsonl

from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError

P = 4194400  # above the kernel's largest pid_max (2**22): a writer that can never be alive


def victim(tmp_path: Path) -> Path:
    """A user's folder outside every output: what a hostile journal names."""
    home = tmp_path / "home" / "thesis"
    home.mkdir(parents=True)
    (home / "chapter1.tex").write_text("years of work")
    return home


def plant(folder: Path, target: str, home: Path) -> dict[str, str]:
    """Beside `target` in `folder`: journals of dead writers whose names reach `home` (absolute, `..`, symlinked
    entries with lorasum's own temp names, a journal of the old name format) and user files that only look like
    temp names. Returns what must survive: the look-alikes and the symlinks, with their content."""
    folder.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(home, folder)
    (folder / f".{target}.lorasum-{P}.journal").write_text(
        json.dumps({"target": target, "new": "x", "old": str(home)}))
    (folder / f".{target}.lorasum-{P + 1}.journal").write_text(
        json.dumps({"target": target, "new": str(rel), "old": str(rel)}))
    new, old = f".{target}.lorasum-{P + 2}.abcdefgh.tmp", f".{target}.lorasum-{P + 2}.abcdefgh.old"
    (folder / new).symlink_to(home)
    (folder / old).symlink_to(home)
    (folder / f".{target}.lorasum-{P + 2}.journal").write_text(json.dumps({"target": target, "new": new, "old": old}))
    (folder / f".{target}.{P + 3}.journal").write_text(json.dumps({"target": target, "new": "x", "old": str(home)}))
    looks = [f".{target}.old-1", f".{target}.abcdefgh.tmp", f".{target}.12.x.old", f".{target}.{P + 3}.abcdefgh.tmp"]
    for name in looks:
        (folder / name).write_text("mine")
    return {n: v for n, v in snapshot(folder).items() if n in looks or n in (new, old)}


def survived(folder: Path, kept: dict[str, str], home: Path, home_before: dict[str, str]) -> None:
    now = snapshot(folder)
    assert {n: now.get(n) for n in kept} == kept
    assert snapshot(home) == home_before


# --- adapters: read and written -------------------------------------------------------------------------------------
def _adapter(folder: Path, seed: int) -> Path:
    from test_fuzz_readers import _valid, _write_adapter

    return _write_adapter(folder, *_valid([2, 2], [4, 4], seed))


def test_reading_a_missing_adapter_beside_hostile_journals_touches_nothing_outside(tmp_path, run_cli):
    home = victim(tmp_path)
    before = snapshot(home)
    kept = plant(tmp_path / "adapters", "math", home)
    with pytest.raises(LorasumError, match="adapter folder not found"):
        load_adapter(tmp_path / "adapters" / "math")
    one_line_error(run_cli("similarity", tmp_path / "adapters" / "math", _adapter(tmp_path / "b", 0)), "not found")
    survived(tmp_path / "adapters", kept, home, before)
    assert not (tmp_path / "adapters" / "math").exists()  # no symlinked "new folder" was rolled forward


def test_composing_beside_hostile_journals_writes_only_its_adapter(tmp_path, run_cli):
    home = victim(tmp_path)
    before = snapshot(home)
    kept = plant(tmp_path / "out", "mm", home)
    a, b = _adapter(tmp_path / "a", 0), _adapter(tmp_path / "b", 1)
    rc, _, err, _ = run_cli("compose", a, b, "--out", tmp_path / "out" / "mm")
    assert rc == 0, err
    survived(tmp_path / "out", kept, home, before)
    assert load_adapter(tmp_path / "out" / "mm").layers


# --- a run folder: resume, report, lock, adapters ---------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    from lorasum.cli.main import main

    root = tmp_path_factory.mktemp("run")
    write_data_folder(root / "data")
    assert main(["experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir", str(root / "data"),
                 "--out", str(root / "run")]) == 0
    return root


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def _experiment(run_cli, finished: Path, run: Path):
    return run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                   finished / "data", "--out", run)


def test_resuming_and_reporting_beside_hostile_journals_touch_nothing_outside(finished, run, tmp_path, run_cli):
    home = victim(tmp_path)
    before = snapshot(home)
    key = next((run / "adapters").iterdir()).name
    kept = {f"{where}:{n}": v for where, target in (("run", "results.json"), ("run", "report.html"),
                                                    ("run/adapters", key), ("run/evals", "x.json"))
            for n, v in plant(tmp_path / where, target, home).items()}
    sub = run / "evals" / "sub"  # below a folder lorasum writes: never swept
    sub.mkdir()
    (sub / f".a.json.lorasum-{P}.abcdefgh.tmp").write_text("mine")
    rc, _, err, _ = _experiment(run_cli, finished, run)
    assert rc == 0, err
    rc, _, err, _ = run_cli("report", run)
    assert rc == 0, err
    for where in ("run", "run/adapters", "run/evals"):
        survived(tmp_path / where, {n.split(":", 1)[1]: v for n, v in kept.items() if n.split(":")[0] == where},
                 home, before)
    assert (sub / f".a.json.lorasum-{P}.abcdefgh.tmp").read_text() == "mine"
    assert load_adapter(run / "adapters" / key).layers  # the real adapter is untouched


def test_a_symlinked_run_lock_is_refused_and_its_target_kept(finished, run, tmp_path, run_cli):
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate")
    (run / ".lorasum.lock").unlink()
    (run / ".lorasum.lock").symlink_to(precious)
    one_line_error(_experiment(run_cli, finished, run), ".lorasum.lock is a symbolic link")
    assert precious.read_text() == "do not truncate"


def test_a_symlinked_adapter_in_a_run_is_refused(finished, run, tmp_path, run_cli):
    key = next((run / "adapters").iterdir()).name
    outside = tmp_path / "elsewhere"
    shutil.move(run / "adapters" / key, outside)
    (run / "adapters" / key).symlink_to(outside)
    before = snapshot(outside)
    one_line_error(_experiment(run_cli, finished, run), f"{key} is a symbolic link")
    assert snapshot(outside) == before
    from lorasum.study.jobspec import adapter_dir

    with pytest.raises(LorasumError, match="symbolic link"):
        adapter_dir(run, key)  # `lorasum job` derives adapter paths the same way


def test_a_run_refused_for_max_length_leaves_nothing(tmp_path, run_cli):
    write_data_folder(tmp_path / "data")
    (tmp_path / "cfg.yaml").write_text("train:\n  max_length: 300\n")
    one_line_error(run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                           tmp_path / "data", "--config", tmp_path / "cfg.yaml", "--out", tmp_path / "run"),
                   "max_length 300", "256", absent=tmp_path / "run")


def only_lorasum_names(folder: Path, kept: dict[str, str]) -> dict[str, str]:
    """Leave only the planted entries in lorasum's name space (look-alikes would make the folder someone else's,
    which the output rule refuses: see the next test)."""
    for p in folder.iterdir():
        if p.name.startswith(".") and ".lorasum-" not in p.name:
            p.unlink()
    return {n: v for n, v in kept.items() if ".lorasum-" in n}


# --- tune and search-weights folders ----------------------------------------------------------------------------
TUNE = ["--model", "tiny-gpt2", "--data", "colors", "--max-train", "16", "--max-validation", "8", "--trials", "1"]


def test_tune_recovers_only_its_own_names_in_its_own_folder(tmp_path, run_cli):
    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(60))
    home = victim(tmp_path)
    before = snapshot(home)
    out = tmp_path / "tune"
    assert run_cli("tune", *TUNE, "--data-dir", tmp_path / "data", "--out", out)[0] == 0
    journals = only_lorasum_names(out, plant(out, "trial", home))
    rc, _, err, _ = run_cli("tune", *TUNE, "--data-dir", tmp_path / "data", "--out", out)
    assert rc == 0, err
    survived(out, journals, home, before)


def test_tune_refuses_a_folder_of_look_alikes_and_keeps_them(tmp_path, run_cli):
    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(60))
    out = tmp_path / "notes"
    for name in (".notes.old-1", "sub/.draft.abcdefgh.tmp", ".bashrc.12.x.old", f".trial.lorasum-{P}.abcdefgh.tmp"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    before = snapshot(out)
    one_line_error(run_cli("tune", *TUNE, "--data-dir", tmp_path / "data", "--out", out), "lorasum did not write")
    assert snapshot(out) == before


def test_search_weights_never_replaces_an_adapter_folder_holding_a_users_file(tmp_path, tiny_adapters, tiny_data,
                                                                              run_cli):
    out = tmp_path / "search"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "thesis.txt").write_text("years of work")
    args = ["search-weights", tiny_adapters["tiny-gpt2"]["colors"], tiny_adapters["tiny-gpt2"]["shapes"], "--model",
            "tiny-gpt2", "--data-dir", tiny_data, "--data", "colors", "--max-validation", "8", "--trials", "1"]
    one_line_error(run_cli(*args, "--out", out), "adapter/thesis.txt")
    assert (out / "adapter" / "thesis.txt").read_text() == "years of work"
    fresh = tmp_path / "fresh"
    home = victim(tmp_path)
    before = snapshot(home)
    journals = only_lorasum_names(fresh, plant(fresh, "adapter", home))
    rc, _, err, _ = run_cli(*args, "--out", fresh)
    assert rc == 0, err
    survived(fresh, journals, home, before)
    assert load_adapter(fresh / "adapter").layers
    # a refused storage leaves no empty --out
    one_line_error(run_cli(*args, "--out", tmp_path / "bad", "--storage", "nosuch://x"), absent=tmp_path / "bad")
