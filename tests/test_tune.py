"""`lorasum tune` on tiny-gpt2 with data the test writes: best.json reproduces its trial when retrained, a study
resumes up to --trials without redoing anything, a killed worker's trial is failed and retried, per-epoch values
reach the pruner, and bad input is one line (exit 2) with nothing written."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import conftest
import pytest
import yaml
from conftest import free_port

from lorasum.errors import LorasumError
from lorasum.tune.space import DEFAULT_SPACE, default_space, load_space, parse_space, space_yaml

CAPS = ["--max-train", "24", "--max-validation", "8"]


def tune_args(ddir: Path, out: Path, trials: int, *extra) -> list:
    return ["tune", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", *CAPS, "--trials", trials,
            "--out", out, *extra]


def load_study(out: Path, name: str = "tune:colors"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


one_line_error = partial(conftest.one_line_error, no_warnings=True)  # a refusal here also raises no warning


@pytest.fixture
def ddir_rows() -> dict[str, int]:
    """The shared `ddir` with 80 colors records only."""
    return {"colors": 80, "shapes": 0}


# --- the search ---------------------------------------------------------------------------------------------------
def test_best_json_reproduces_the_best_trial_when_retrained(ddir, tmp_path, run_cli):
    out = tmp_path / "tune"
    rc, stdout, err, _ = run_cli(*tune_args(ddir, out, 4))
    assert rc == 0, err
    best = json.loads((out / "best.json").read_text())
    study = load_study(out)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 4
    ref = min(done, key=lambda t: t.value)  # the best trial, found independently of lorasum
    assert best["trial"] == ref.number and best["value"] == ref.value and best["tuned"] == ref.params
    assert best["study"] == "tune:colors" and best["trials"]["requested"] == 4
    for name, p in DEFAULT_SPACE.items():  # sampled inside the default space
        v = best["tuned"][name]
        assert v in p["choices"] if "choices" in p else p["low"] <= v <= p["high"]

    rc, stdout, err, _ = run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", *CAPS,
                                 "--params", out / "best.json", "--out", tmp_path / "retrained")
    assert rc == 0, err
    meta = json.loads((tmp_path / "retrained" / "lorasum.json").read_text())
    assert {k: meta["train"][k] for k in ref.params} == ref.params
    retrained = min(e["val_loss"] for e in meta["epochs"])
    assert math.isclose(retrained, best["value"], rel_tol=1e-7, abs_tol=0), (retrained, best["value"])

    # every trial reported its running-best validation loss per epoch to the pruner
    for t in done:
        losses = t.user_attrs["val_losses"]
        assert len(losses) == t.params["epochs"]
        assert [t.intermediate_values[e] for e in range(1, len(losses) + 1)] == \
            [min(losses[:e]) for e in range(1, len(losses) + 1)]
        assert t.value == min(losses)

    # the summary: a row per trial, the best, and two PNG plots
    rows = (out / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,value,") and len(rows) == 5
    assert f"Best trial **{ref.number}**" in (out / "summary.md").read_text()
    for png in ("history.png", "importance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_space(str(out / "space.yaml")) == default_space()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_interrupted_study_resumes_with_only_the_missing_trials(ddir, tmp_path, run_cli):
    out = tmp_path / "tune"
    assert run_cli(*tune_args(ddir, out, 2))[0] == 0
    first = {t.number: (t.params, t.value, t.datetime_complete) for t in load_study(out).trials}
    assert sorted(first) == [0, 1]
    assert run_cli(*tune_args(ddir, out, 4))[0] == 0
    trials = load_study(out).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert {n: (t.params, t.value, t.datetime_complete) for n, t in enumerate(trials[:2])} == first
    # resumed trials draw fresh parameters (the sampler is not replayed from the start)
    assert trials[2].params not in [t.params for t in trials[:2]]
    assert trials[3].params not in [t.params for t in trials[:3]]
    assert run_cli(*tune_args(ddir, out, 4))[0] == 0  # reached: nothing runs
    assert run_cli(*tune_args(ddir, out, 3))[0] == 0  # fewer than held: nothing runs, nothing removed
    assert [(t.number, t.datetime_complete) for t in load_study(out).trials] == \
        [(t.number, t.datetime_complete) for t in trials]
    assert json.loads((out / "best.json").read_text())["trials"]["requested"] == 3


def test_killed_worker_trial_is_failed_and_retried_with_its_parameters(ddir, tmp_path, run_cli):
    """A worker is SIGKILLed inside a trial; the next run fails it after the heartbeat grace period, retries it
    with the same parameters, and still ends with exactly --trials finished trials."""
    out = tmp_path / "tune"
    space = tmp_path / "space.yaml"
    space.write_text("epochs: {low: 3, high: 4}\nbatch_size: {choices: [2]}\n")
    marker = tmp_path / "train.marker"  # the worker holds still inside a trial's training until it is killed
    env = {**os.environ, "LORASUM_PROGRESS": "0", "LORASUM_TEST_PAUSE": "train",
           "LORASUM_TEST_PAUSE_MARKER": str(marker)}
    args = [sys.executable, "-m", "lorasum.cli", *map(str, tune_args(ddir, out, 3, "--space", space, "--heartbeat",
                                                                     "1", "--threads", "1"))]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not marker.exists():
            time.sleep(0.05)
        assert proc.poll() is None and marker.exists(), "the worker ended before a trial was caught running"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    killed = [t for t in load_study(out).trials if t.state.name == "RUNNING"]
    assert len(killed) == 1 and set(killed[0].params) == {"epochs", "batch_size"}
    rc, stdout, err, _ = run_cli(*tune_args(ddir, out, 3, "--space", space, "--heartbeat", "1"))
    assert rc == 0, err
    trials = load_study(out).trials
    failed = [t for t in trials if t.number == killed[0].number][0]
    assert failed.state.name == "FAIL"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retry) == 1 and retry[0].params == failed.params and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert retry[0].user_attrs["worker"].endswith(f":{os.getpid()}")  # rerun by this process
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 3
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]


def test_parameters_that_diverge_are_pruned_trials_not_the_end_of_the_search(ddir, tmp_path, run_cli):
    out = tmp_path / "tune"
    space = tmp_path / "space.yaml"  # the seeded draws of lr 1e30 diverge at their second step
    space.write_text("lr: {choices: [1.0e+30, 1.0e-3]}\nepochs: {choices: [1]}\n")
    rc, _, err, _ = run_cli(*tune_args(ddir, out, 6, "--space", space))
    assert rc == 0, err
    trials = load_study(out).trials
    diverged = [t for t in trials if "diverged" in t.user_attrs]
    assert diverged and all(t.state.name == "PRUNED" and t.params["lr"] == 1e30 for t in diverged)
    assert "lower lr or alpha" in diverged[0].user_attrs["diverged"]
    assert all(t.state.name == "COMPLETE" for t in trials if t.params["lr"] == 1e-3)
    best = json.loads((out / "best.json").read_text())
    assert best["tuned"]["lr"] == 1e-3 and best["trials"]["pruned"] >= len(diverged)
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert {r["number"] for r in rows if r["diverged"] == "True"} == {str(t.number) for t in diverged}


# --- the search space ---------------------------------------------------------------------------------------------
def test_a_trial_clearly_worse_after_its_first_epoch_is_pruned(ddir, tmp_path, run_cli, monkeypatch):
    """Two trials with a useful learning rate complete; a third whose lr cannot move the weights (1e-7) reports a
    worse first-epoch validation loss than their median, so the median pruner stops it before epoch 2.

    Only the sampler is scripted (which lr each trial gets), so the outcome does not hang on TPE's random draws;
    training, the per-epoch reports, the pruner and the bookkeeping are lorasum's and Optuna's own.
    """
    import optuna

    script = {0: 5e-2, 1: 4e-2, 2: 1e-7}

    class Scripted(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return script[trial.number]

    monkeypatch.setattr("lorasum.tune.search._seeded_tpe", lambda seed, n_startup: Scripted())
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-7, high: 0.1, log: true}\n")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"epochs": 2, "dropout": 0.0}))
    out = tmp_path / "tune"
    rc, stdout, err, _ = run_cli(*tune_args(ddir, out, 3, "--space", space, "--params", params))
    assert rc == 0, err
    trials = load_study(out).trials
    assert [t.params["lr"] for t in trials] == [5e-2, 4e-2, 1e-7]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = trials[2]
    assert list(pruned.intermediate_values) == [1]  # stopped after epoch 1 of 2
    median = sorted(t.intermediate_values[1] for t in trials[:2])
    assert pruned.intermediate_values[1] > sum(median) / 2
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == {"requested": 3, "complete": 2, "pruned": 1} and best["trial"] in (0, 1)
    assert "1 pruned" in stdout
    assert (out / "trials.csv").read_text().splitlines()[3].startswith("2,PRUNED,")


def test_default_space_round_trips_through_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(space_yaml(default_space()))
    assert yaml.safe_load(path.read_text()) == DEFAULT_SPACE
    assert load_space(str(path)) == default_space()
    path.write_text("lr: {low: 1e-4, high: 3e-3, log: true}\n")  # YAML 1.1 reads these as strings
    assert load_space(str(path))["lr"].to_dict() == {"low": 1e-4, "high": 3e-3, "log": True}


@pytest.mark.parametrize("space, culprits", [
    ({"dropout": {"low": 0.1, "high": 0.1}}, ["'dropout'", "empty range"]),
    ({"lr": {"low": 1e-2, "high": 1e-4, "log": True}}, ["'lr'", "inverted range", "swap"]),
    ({"epochs": {"low": 3, "high": 1}}, ["'epochs'", "inverted range"]),
    ({"batch_size": {"choices": []}}, ["'batch_size'", "empty"]),
    ({"dropuot": {"low": 0, "high": 0.1}}, ["'dropuot'", "did you mean 'dropout'"]),
    ({"dropout": {"low": 0.0, "high": 1.5}}, ["'dropout'", "1.5"]),
    ({"epochs": {"low": 1.5, "high": 3}}, ["'epochs'", "integers"]),
    ({"weight_decay": {"low": 0, "high": 0.1, "log": True}}, ["'weight_decay'", "must be > 0"]),
    ({"r": {"low": 2, "high": 8}}, ["'r'", "tunable"]),
    ({}, ["non-empty"]),
])
def test_bad_space_file_is_one_line_naming_the_parameter(space, culprits, ddir, tmp_path, run_cli):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(LorasumError):
        parse_space(space)
    one_line_error(run_cli(*tune_args(ddir, tmp_path / "out", 2, "--space", path)), path, *culprits)
    assert not (tmp_path / "out").exists()


def test_trials_below_one_is_an_error(ddir, tmp_path, run_cli):
    one_line_error(run_cli(*tune_args(ddir, tmp_path / "out", 0)), "--trials", "at least 1")
    assert not (tmp_path / "out").exists()


def test_unreachable_storage_is_one_line_naming_it(ddir, tmp_path, run_cli):
    url = f"postgresql://lorasum:secret@127.0.0.1:{free_port()}/optuna"
    err = one_line_error(run_cli(*tune_args(ddir, tmp_path / "out", 2, "--storage", url)),
                         "cannot open --storage", f"127.0.0.1:{url.rsplit(':', 1)[1]}")
    assert "secret" not in err  # the password is masked
    url = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'study.db'}"
    one_line_error(run_cli(*tune_args(ddir, tmp_path / "out", 2, "--storage", url)), url)
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


def test_existing_study_with_another_space_or_setup_is_refused(ddir, tmp_path, run_cli):
    out = tmp_path / "tune"
    assert run_cli(*tune_args(ddir, out, 1, "--study", "s1"))[0] == 0
    summary = json.loads((out / "summary.json").read_text())  # one trial: no importances, said so
    assert summary["importances"] is None and "at least 2 completed trials" in summary["importance_note"]
    assert "at least 2 completed trials" in (out / "summary.md").read_text()
    assert (out / "importance.png").read_bytes()[:4] == b"\x89PNG"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**DEFAULT_SPACE, "lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    one_line_error(run_cli(*tune_args(ddir, out, 2, "--study", "s1", "--space", space)),
                   "study 's1'", "different search space", "lr.high")
    one_line_error(run_cli(*tune_args(ddir, out, 2, "--study", "s1", "--max-train", "16")),
                   "study 's1'", "different setup", "data.max_records.train")
    one_line_error(run_cli(*tune_args(ddir, out, 2, "--study", "s1", "--r", "8")), "train.r")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert len(load_study(out, "s1").trials) == 1


def test_a_failed_tune_removes_only_the_study_it_created_and_no_trial_finished_in(ddir, tmp_path, run_cli,
                                                                                    monkeypatch):
    import lorasum.tune.search as search

    def diverges(*a, **k):
        raise LorasumError("loss became NaN at step 3; lower it", key="lr")

    real = search.train_adapter
    monkeypatch.setattr(search, "train_adapter", diverges)
    one_line_error(run_cli(*tune_args(ddir, tmp_path / "new", 2)), "lr loss became NaN")
    assert not (tmp_path / "new").exists()  # this call made the folder and the study; no trial finished

    out = tmp_path / "kept"
    monkeypatch.setattr(search, "train_adapter", real)
    assert run_cli(*tune_args(ddir, out, 1))[0] == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = out / f".trial.lorasum-{dead.pid}.k2j4h5g6.tmp"  # the temp folder of a trial whose process was killed
    (leftover / "adapter").mkdir(parents=True)
    monkeypatch.setattr(search, "train_adapter", diverges)
    one_line_error(run_cli(*tune_args(ddir, out, 2)), "lr loss became NaN")
    assert len(load_study(out).trials) == 2  # the finished trial and the failed one: the study is kept
    assert not leftover.exists()
