"""Study inputs an attacker might write (configs, job specs, --params, run-folder artifacts, results.json): each is
one `lorasum: error:` line naming the file, field or value, exit 2 and nothing written; a damaged finished-job
artifact is removed and recomputed on resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error, snapshot, write_data_folder

from lorasum.errors import LorasumError
from lorasum.study.config import ExperimentConfig, load_config

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run on two domains: ROOT/run, ROOT/data."""
    from lorasum.cli.main import main

    root = tmp_path_factory.mktemp("finished")
    write_data_folder(root / "data")
    assert main(["experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                 str(root / "data"), "--out", str(root / "run")]) == 0
    return root


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    shutil.copytree(finished / "run", tmp_path / "run")
    return tmp_path / "run"


def experiment(run_cli, data: Path, out: Path, *extra, config=None, domains=("colors", "shapes")):
    args = ["experiment", "--preset", "smoke", "--data-dir", data, "--out", out, *extra]
    if domains:
        args += ["--domains", *domains]
    if config is not None:
        cfg = out.parent / ("cfg.json" if isinstance(config, str) and config.startswith("[") else "cfg.yaml")
        cfg.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        args += ["--config", cfg]
    return run_cli(*args)


# --- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, culprits", [
    (DEEP, ["cfg.json", "nested too deeply"]),
    ("a: " + DEEP, ["cfg.yaml", "nested too deeply"]),
    ("seeds: [" + "9" * 5000 + "]", ["cfg.yaml", "not valid YAML", "4300 digits"]),
])
def test_an_unreadable_config_file_is_named(text, culprits, ddir, tmp_path, run_cli):
    one_line_error(experiment(run_cli, ddir, tmp_path / "run", config=text), *culprits)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("domain, culprits", [
    ("sha$\npes", ["'domains'", "'sha$\\npes'", "a domain name is letters, digits"]),
    ("../shapes", ["'../shapes'"]),
    ("shapes[category=x$y]", ["'x$y'", "filter field or value"]),
])
def test_a_domain_name_that_is_not_plain_is_refused(domain, culprits, ddir, tmp_path, run_cli):
    before = snapshot(tmp_path)
    one_line_error(experiment(run_cli, ddir, tmp_path / "run", domains=("colors", domain)), *culprits)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("config, culprits", [
    ({"seeds": [2**64]}, ["'seeds' must be a whole number from 0 to 2**63 - 1", "18446744073709551616"]),
    ({"seeds": [-1]}, ["'seeds'", "got -1"]),
    ({"split_seed": -5}, ["'split_seed'", "got -5"]),
    ({"bootstrap_seed": 2**70}, ["'bootstrap_seed'"]),
    ({"tune": {"seed": -1}}, ["'tune.seed'"]),
    ({"tune": {"heartbeat": 0}}, ["'tune.heartbeat'", "got 0"]),
    ({"tune": {"heartbeat": 10**12}}, ["'tune.heartbeat'"]),
    ({"max_train": 2.5}, ["'max_train' must be an integer or null", "2.5"]),
    ({"max_train": 10**30}, ["'max_train' must be in [1, 1e+09]", "(31 digits)"]),
    ({"max_test": 0}, ["'max_test'", "got 0"]),
    ({"max_validation": ".nan"}, ["'max_validation'"]),
    ({"min_records": {"train": 1.5}}, ["'min_records' 'train'", "got 1.5"]),
    ({"min_records": {"train": -1}}, ["'min_records' 'train'", "got -1"]),
    ({"min_records": {"tests": 1}}, ["'min_records' names unknown split 'tests'"]),
    ({"bootstrap_samples": 10**9}, ["'bootstrap_samples' must be in [100, 100000]"]),
    ({"eval_batch_size": 0}, ["'eval_batch_size' must be at least 1"]),
    ({"max_ppl_ratio": -1}, ["'max_ppl_ratio' must be a ratio > 0"]),
    ({"threads": 10**6}, ["'threads' must be at least 1 and at most 1024"]),
])
def test_numbers_out_of_range_are_keyed_errors(config, culprits, ddir, tmp_path, run_cli):
    one_line_error(experiment(run_cli, ddir, tmp_path / "run", config=config), *culprits)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_is_accepted():
    cfg = ExperimentConfig.from_dict({"domains": ["a", "b"], "seeds": [0, 2**63 - 1]})
    assert cfg.seeds == [0, 2**63 - 1]


# --- experiment --threads ---------------------------------------------------------------------------------------
def test_experiment_threads_is_runtime_only(run_copy, finished, run_cli, monkeypatch):
    """--threads sets torch's threads and leaves the config (and its hash) alone: the finished run resumes."""
    import torch

    before = (run_copy / "config.json").read_text()
    ran: list = []
    monkeypatch.setattr("lorasum.study.executors.run_job", lambda spec, loaded=None, timings=None: ran.append(spec))
    threads = torch.get_num_threads()
    try:
        rc, out, err, _ = run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                                  finished / "data", "--out", run_copy, "--threads", 1)
        assert rc == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert ran == [] and (run_copy / "config.json").read_text() == before
    one_line_error(run_cli("experiment", "--preset", "smoke", "--out", run_copy, "--threads", 0), "--threads")


# --- tune --heartbeat -------------------------------------------------------------------------------------------
def test_tune_heartbeat_zero_is_refused(ddir, tmp_path, run_cli):
    before = snapshot(tmp_path)
    one_line_error(run_cli("tune", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--trials", 1,
                           "--out", tmp_path / "tuned", "--heartbeat", 0), "--heartbeat", "got 0")
    assert snapshot(tmp_path) == before


# --- --params -----------------------------------------------------------------------------------------------------
def test_deeply_nested_params_file_is_named(ddir, tmp_path, run_cli):
    params = tmp_path / "params.json"
    params.write_text(DEEP)
    before = snapshot(tmp_path)
    one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--out",
                           tmp_path / "ad", "--params", params), f"--params {params}", "nested too deeply")
    assert snapshot(tmp_path) == before


# --- job specs ------------------------------------------------------------------------------------------------------
KEY = "train-" + "0" * 20


def sim_spec(run_dir, **over) -> dict:
    return {"kind": "similarity", "run_dir": str(run_dir), "a": [{"train_key": KEY, "weight": 1.0}],
            "b": [{"train_key": KEY, "weight": 1.0}], **over}


@pytest.fixture
def eval_spec(finished) -> dict:
    from lorasum.study.experiment import plan

    cfg = load_config(str(finished / "run" / "config.json"))
    return next(s for s in plan(cfg, finished / "run").evals.values() if s["adapters"])


@pytest.mark.parametrize("edit, culprits", [
    (lambda s: s.update(max_length="64"), ["'max_length' must be an integer", "'64'"]),
    (lambda s: s.update(batch_size=0), ["'batch_size' must be at least 1"]),
    (lambda s: s.update(domain=5), ["'domain' must be a string", "got 5"]),
    (lambda s: s.update(model=None), ["'model' must not be null"]),
    (lambda s: s.update(loss_on="some"), ["'loss_on' must be 'all' or 'answer'"]),
    (lambda s: s.update(split="dev"), ["'split' must be one of"]),
    (lambda s: s.update(extra=1), ["unknown config key 'extra'"]),
    (lambda s: s["data"].update(split_seed="0"), ["'data.split_seed' must be an integer"]),
    (lambda s: s["data"]["max_records"].update(test="8"), ["'data.max_records' must map splits", "'8'"]),
    (lambda s: s["data"]["sources"].update(colors=7), ["'data.sources' must map each source"]),
    (lambda s: s["adapters"][0].update(train_key="/etc"), ["'adapters.train_key' must be a train job's key",
                                                          "'/etc'"]),
    (lambda s: s["adapters"][0].update(train_key="../../x"), ["'adapters.train_key'", "'../../x'"]),
    (lambda s: s.update(domain="/etc/passwd.jsonl"), ["'domain' names domain '/etc/passwd.jsonl'"]),
])
def test_a_wrongly_typed_or_escaping_job_spec_is_refused(edit, culprits, eval_spec, tmp_path, run_cli):
    spec = json.loads(json.dumps(eval_spec))
    spec.pop("key")
    edit(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    before = snapshot(tmp_path)
    one_line_error(run_cli("job", tmp_path / "spec.json"), str(tmp_path / "spec.json"), *culprits)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spec, culprits", [
    (lambda r: sim_spec(r, a=[{"train_key": "/abs/adapter", "weight": 1.0}]), ["'a.train_key'", "'/abs/adapter'"]),
    (lambda r: {"kind": "inplace", "run_dir": str(r), "model": "tiny-gpt2", "all": [KEY, "../x"], "removed": KEY},
     ["'all' must be a train job's key", "'../x'"]),
    (lambda r: {"kind": "inplace", "run_dir": str(r), "model": "tiny-gpt2", "all": [KEY], "removed": 3},
     ["'removed' must be a string"]),
    (lambda r: {"kind": "train", "run_dir": str(r), "model": "tiny-gpt2", "partition": "colors+/etc/x",
                "data": {"question_field": "q", "answer_field": "a", "split_seed": 0, "max_records": {},
                         "sources": {}}, "train": {}}, ["'partition' names domain '/etc/x'"]),
    (lambda r: {"kind": "train", "run_dir": str(r), "model": "tiny-gpt2", "partition": "colors",
                "data": {"question_field": "q", "answer_field": "a", "split_seed": 0, "max_records": {},
                         "sources": {}}, "train": {"lr": "fast"}}, ["'train.lr' must be a number", "'fast'"]),
    (lambda r: DEEP, ["nested too deeply"]),
])
def test_job_spec_paths_stay_in_the_run_folder(spec, culprits, tmp_path, run_cli):
    body = spec(tmp_path / "run")
    (tmp_path / "spec.json").write_text(body if isinstance(body, str) else json.dumps(body))
    before = snapshot(tmp_path)
    one_line_error(run_cli("job", tmp_path / "spec.json"), str(tmp_path / "spec.json"), *culprits)
    assert snapshot(tmp_path) == before


def test_a_planned_spec_passes_the_strict_check(finished):
    from lorasum.study.experiment import plans
    from lorasum.study.jobs import check_spec

    cfg = load_config(str(finished / "run" / "config.json"))
    for p in plans(cfg, finished / "run").values():
        for spec in p.jobs():
            check_spec(json.loads(json.dumps(spec)), "planned")


# --- run-folder artifacts -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ['{"domain": "colors", "nll": [1.0, ', "", DEEP])
def test_a_corrupt_eval_artifact_is_removed_and_recomputed_on_resume(damage, run_copy, finished, run_cli):
    evals = sorted((run_copy / "evals").glob("*.json"))
    victim = evals[0]
    good = victim.read_bytes()
    victim.write_text(damage)
    rc, out, err, _ = run_cli("experiment", "--preset", "smoke", "--domains", "colors", "shapes", "--data-dir",
                              finished / "data", "--out", run_copy)
    assert rc == 0, err
    removed = [line for line in err.splitlines() if str(victim) in line]
    assert len(removed) == 1 and "removed: its job runs again" in removed[0], err
    assert json.loads(victim.read_bytes()) == json.loads(good)  # recomputed (same numbers)


def test_a_corrupt_artifact_read_while_assembling_is_named(run_copy, finished):
    from lorasum.study.experiment import plans
    from lorasum.study.jobs import artifact_path
    from lorasum.study.scores import load

    cfg = load_config(str(run_copy / "config.json"))
    spec = next(iter(plans(cfg, run_copy)[cfg.modes[0]].evals.values()))
    artifact_path(spec).write_text(DEEP)
    with pytest.raises(LorasumError, match=r"finished-job artifact .*: JSON nested too deeply to read; rerun"):
        load(spec)


def test_a_damaged_tuning_best_json_is_not_a_cached_study(tmp_path):
    from lorasum.study.tuning import _cached

    (tmp_path / "experiment_key").write_text("k\n")
    for text in (DEEP, '{"trials": {"complete": "1"}}', '{"trials": 3}', "[]"):
        (tmp_path / "best.json").write_text(text)
        assert _cached(tmp_path, "k") is None
    (tmp_path / "best.json").write_text('{"trials": {"complete": 2, "pruned": 0, "requested": 2}}')
    assert _cached(tmp_path, "k") is not None
