"""`lorasum experiment`, `report` and `job` on bad input, through the CLI: exit 2, exactly one `lorasum: error:`
line naming the culprit, and nothing written (no run folder when there was none; an existing one unchanged).
Also: a rerun with a relative --data-dir (or LORASUM_DATA_DIR) from the same folder resumes."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import snapshot, split_of, write_data_folder, write_jsonl

from lorasum.study.config import load_config


one_line_error = partial(conftest.one_line_error, no_warnings=True)  # a refusal here also raises no warning


@pytest.fixture
def ddir(ddir: Path) -> Path:
    """The shared `ddir` and two more domains: empty.jsonl (no records) and trainonly.jsonl (train records only)."""
    write_jsonl(ddir / "empty.jsonl", [])
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(100) if split_of(f"q{i}", f"a{i}") == "train"]
    write_jsonl(ddir / "trainonly.jsonl", rows[:10])
    return ddir


def experiment(run_cli, ddir: Path, out: Path, *extra, config: dict | None = None, domains=("colors", "shapes")):
    args = ["experiment", "--preset", "smoke", "--data-dir", ddir, "--out", out]
    if domains:
        args += ["--domains", *domains]
    if config is not None:
        cfg = out.parent / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
        args += ["--config", cfg]
    return run_cli(*args, *extra)


# --- refused before anything is written -----------------------------------------------------------------------
@pytest.mark.parametrize("domains, culprits", [
    (["colors"], ["'domains' needs at least 2 domains"]),
    (["colors", "colors"], ["'domains' names colors more than once"]),
    (["colors", "nosuch"], ["unknown domain 'nosuch'", "found: colors, empty, shapes, trainonly"]),
    (["colors", "empty"], ["domain 'empty'", "empty train split"]),
    (["colors", "trainonly"], ["domain 'trainonly'", "empty validation split"]),
    (["colors", "shapes[category=circle]"], ["shapes[category=circle]", "selects no records"]),
])
def test_bad_domains(domains, culprits, ddir, tmp_path, run_cli, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the domains were checked")

    monkeypatch.setattr("lorasum.study.executors.load_model", no_model)
    before = snapshot(tmp_path)
    one_line_error(experiment(run_cli, ddir, tmp_path / "run", domains=domains), *culprits)
    assert snapshot(tmp_path) == before  # no run folder, no config.json, no timings.json


def test_unknown_preset_suggests_the_closest(ddir, tmp_path, run_cli):
    one_line_error(run_cli("experiment", "--preset", "smok", "--data-dir", ddir, "--out", tmp_path / "run"),
                   "unknown preset 'smok'", "did you mean 'smoke'?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, culprits", [
    ({"max_trian": 3}, ["unknown config key 'max_trian'", "did you mean 'max_train'?"]),
    ({"train": {"lrr": 0.1}}, ["unknown config key 'train.lrr'", "did you mean 'train.lr'?"]),
    ({"tune": {"trails": 3}}, ["unknown config key 'tune.trails'", "did you mean 'tune.trials'?"]),
    ("max_train: abc\n", ["'max_train' must be an integer or null, got 'abc'"]),
    ("seeds: 3\n", ["'seeds' must be a list of integers, got 3"]),
    ("seeds: [0, x]\n", ["'seeds' must be a list of integers"]),
    ("train: [1]\n", ["'train' must be a mapping of TrainConfig keys", "got [1]"]),
    ("train: {epochs: x}\n", ["'train.epochs' must be an integer, got 'x'"]),
    ("train: {lr: fast}\n", ["'train.lr' must be a number, got 'fast'"]),
    ("train: {targets: c_attn}\n", ["'train.targets' must be a list of strings or null, got 'c_attn'"]),
    ("train: {use_rslora: 1}\n", ["'train.use_rslora' must be true or false, got 1"]),
    ("bootstrap_samples: 1e2.5\n", ["'bootstrap_samples' must be an integer, got '1e2.5'"]),
    ("max_test: 2.5\n", ["'max_test' must be an integer or null, got 2.5"]),
    ("ci_level: .nan\n", ["'ci_level' must be a number, got nan"]),
    ("model: [tiny-gpt2]\n", ["'model' must be a string"]),
    ("max_level: 1\n", ["'max_level' must be between 2", "got 1"]),
    ("max_level: 3\n", ["'max_level' must be between 2", "and 2 (the number of domains)", "got 3"]),
    ("threads: -2\n", ["'threads' must be at least 1", "got -2"]),
    ("threads: 0\n", ["'threads' must be at least 1", "got 0"]),
])
def test_bad_config_values_name_the_key(config, culprits, ddir, tmp_path, run_cli):
    before = snapshot(tmp_path)
    err = one_line_error(experiment(run_cli, ddir, tmp_path / "run", config=config), *culprits)
    assert "cfg.yaml" in err  # the file is named
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "cfg.yaml"} == before  # no run folder


def test_yaml_numeric_strings_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 and 1e3 as strings; the config accepts them as the numbers they spell."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("domains: [a, b]\nbootstrap_samples: 1e3\nci_level: 9e-1\ntrain: {lr: 1e-3, alpha: 64}\n")
    assert yaml.safe_load(cfg.read_text())["train"]["lr"] == "1e-3"  # the premise
    c = load_config(str(cfg), "smoke")
    assert c.train.lr == 0.001 and c.bootstrap_samples == 1000 and c.ci_level == 0.9
    assert c.train.alpha == 64 and isinstance(c.train.alpha, int)  # non-strings are kept as written (job keys)


def test_out_that_is_a_file(ddir, tmp_path, run_cli):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(experiment(run_cli, ddir, f), str(f), "exists and is not a folder")
    assert f.read_text() == "x"
    one_line_error(experiment(run_cli, ddir, f / "run"), str(f / "run"), f"{f} is a file, not a folder")


# --- an existing run folder -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run on two domains, made from its own folder with a relative --data-dir."""
    from lorasum.cli.main import main

    root = tmp_path_factory.mktemp("finished")
    write_data_folder(root / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir", "data",
                     "--out", "run"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A private copy of the finished run (same data folder), so a test may change it."""
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def no_jobs(monkeypatch) -> list[str]:
    ran: list[str] = []
    monkeypatch.setattr("lorasum.study.executors.run_job", lambda spec, loaded=None, timings=None: ran.append(spec["kind"]))
    return ran


def test_rerun_with_a_relative_data_dir_resumes(finished, run_cli, monkeypatch):
    before = snapshot(finished / "run")
    ran = no_jobs(monkeypatch)
    monkeypatch.chdir(finished)
    rc, _, err, _ = run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                            "data", "--out", "run")
    assert rc == 0, err
    monkeypatch.setenv("LORASUM_DATA_DIR", "data")  # the same through the environment
    rc, _, err, _ = run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--out", "run")
    assert rc == 0, err
    assert ran == []
    after = snapshot(finished / "run")
    assert after["results.json"] == before["results.json"]
    assert json.loads((finished / "run" / "config.json").read_text())["data_dir"] == str(finished / "data")


def test_different_config_is_refused_then_accepted_with_overwrite(finished, run_copy, run_cli, monkeypatch):
    data = str(finished / "data")
    before = snapshot(run_copy)
    one_line_error(experiment(run_cli, data, run_copy, config={"max_test": 5}), "differs in: max_test",
                   "--overwrite")
    assert snapshot(run_copy) == before
    ran = []
    real = __import__("lorasum.study.executors", fromlist=["run_job"]).run_job
    monkeypatch.setattr("lorasum.study.executors.run_job", lambda spec, loaded=None, timings=None: (ran.append(spec["kind"]),
                                                                                    real(spec, loaded))[1])
    rc, _, err, _ = experiment(run_cli, data, run_copy, "--overwrite", config={"max_test": 5})
    assert rc == 0, err
    assert ran and set(ran) == {"eval", "data_stats"}  # an eval cap retrains nothing
    assert json.loads((run_copy / "config.json").read_text())["max_test"] == 5


def test_moved_data_dir_is_refused_naming_both_folders(finished, run_copy, tmp_path, run_cli, monkeypatch):
    moved = tmp_path / "moved"
    shutil.copytree(finished / "data", moved)
    before = snapshot(run_copy)
    one_line_error(experiment(run_cli, moved, run_copy), "differs in: data_dir", str(finished / "data"),
                   str(moved), "--overwrite")
    assert snapshot(run_copy) == before
    ran = no_jobs(monkeypatch)  # the same files elsewhere: every job is reused
    rc, _, err, _ = experiment(run_cli, moved, run_copy, "--overwrite")
    assert rc == 0, err
    assert ran == []


def test_corrupt_config_json_is_refused_then_replaced_with_overwrite(finished, run_copy, run_cli, monkeypatch):
    (run_copy / "config.json").write_text('{"model": ')
    before = snapshot(run_copy)
    one_line_error(experiment(run_cli, finished / "data", run_copy), str(run_copy / "config.json"), "corrupt",
                   "--overwrite")
    assert snapshot(run_copy) == before
    ran = no_jobs(monkeypatch)
    rc, _, err, _ = experiment(run_cli, finished / "data", run_copy, "--overwrite")
    assert rc == 0, err
    assert ran == [] and json.loads((run_copy / "config.json").read_text())["domains"] == ["colors", "shapes"]


def test_folder_that_is_not_a_run_is_refused(ddir, tmp_path, run_cli):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    one_line_error(experiment(run_cli, ddir, tmp_path / "other"), "is not a lorasum run folder")
    assert snapshot(tmp_path) == before


# --- lorasum report / lorasum job ---------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, culprit", [
    (None, "not found"),
    ("{", "not valid JSON"),
    ("[]", "a JSON list, not an object"),
    ("drop:fit", "missing fit"),
    ("set:fit", "was changed after lorasum wrote it (its digest no longer matches its content)"),
    ("big:fit", "was changed after lorasum wrote it"),
])
def test_report_on_a_damaged_results_json(damage, culprit, run_copy, run_cli):
    path = run_copy / "results.json"
    if damage is None:
        path.unlink()
    elif damage.startswith(("drop:", "set:", "big:")):
        r = json.loads(path.read_text())
        op, key = damage.split(":")
        r.pop(key) if op == "drop" else r.__setitem__(key, "garbage" if op == "set" else 10**400)
        path.write_text(json.dumps(r))
    else:
        path.write_text(damage)
    before = snapshot(run_copy)
    err = one_line_error(run_cli("report", run_copy), str(path), culprit)
    if damage is not None:
        assert "regenerate it with `lorasum experiment" in err
    assert snapshot(run_copy) == before  # no figure or report rewritten


@pytest.mark.parametrize("text, culprits", [
    ("not json", ["not valid JSON"]),
    ("[1, 2]", ["expected a JSON object", "got list"]),
    ('{"kind": "bake", "run_dir": "r"}', ["'kind' must be one of", "'bake'"]),
    ('{"kind": "eval", "run_dir": "r", "domain": "colors"}', ["an eval job spec needs model, adapters, data"]),
    ('{"kind": "train", "model": "tiny-gpt2", "partition": "colors", "data": {}, "train": {}}',
     ["a train job spec needs run_dir, data.question_field"]),
    ('{"kind": "similarity", "run_dir": "r", "a": 1, "b": 2}', ["'a' must be a list of", "got 1"]),
    ('{"kind": "similarity", "run_dir": "r", "a": [{"train_key": "k", "weight": "1"}], "b": []}',
     ["'a.weight' must be a number", "got '1'"]),
])
def test_job_with_a_bad_spec(text, culprits, tmp_path, run_cli):
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    before = snapshot(tmp_path)
    one_line_error(run_cli("job", spec), str(spec), *culprits)
    assert snapshot(tmp_path) == before


def test_job_whose_key_does_not_match_its_content(finished, tmp_path, run_cli):
    from lorasum.study.experiment import plan

    cfg = load_config(str(finished / "run" / "config.json"))
    spec = next(iter(plan(cfg, tmp_path / "run").sims.values()))
    spec["b"][0]["weight"] = 2.0  # edited after planning: the artifact would land under the wrong key
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    one_line_error(run_cli("job", tmp_path / "spec.json"), "does not match the spec's content")
    assert not (tmp_path / "run").exists()


def test_a_test_split_with_nothing_to_predict_is_refused(ddir, tmp_path, run_cli):
    """eval_loss_on: answer with answers truncated away would give NaN perplexities: one line naming the split."""
    cfg = {"eval_loss_on": "answer", "train": {"max_length": 8}}
    one_line_error(experiment(run_cli, ddir, tmp_path / "run", config=cfg), "test: no answer tokens left",
                   "--max-length 8")
