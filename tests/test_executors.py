"""The grid on Ray: byte-identical results to the serial executor at the same threads per job, jobs really spread over
two workers (and over two nodes of a real cluster pinned to 127.0.0.1), a killed worker's job retried elsewhere, a
killed driver resumed without recomputing finished jobs, and bad executor options refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorasum.cluster import LOCAL_ENV

for _k, _v in LOCAL_ENV.items():  # before Ray is imported anywhere in this process: every address on 127.0.0.1
    os.environ.setdefault(_k, _v)

ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install 'lorasum[ray]'")

from conftest import free_port, one_line_error, write_smoke_domains  # noqa: E402

from lorasum.cli.main import main  # noqa: E402
from lorasum.study.config import load_config  # noqa: E402
from lorasum.cluster import ExecutorOptions  # noqa: E402
from lorasum.study.experiment import run_experiment  # noqa: E402

ENV = {**os.environ, "LORASUM_PROGRESS": "0"}
DOMAINS = ["alpha", "beta", "gamma"]


def _args(data: Path, out: Path, *extra) -> list[str]:
    """The CLI run matching the `serial` fixture: one thread per job, set in the config (so recorded with it)."""
    return ["experiment", "--preset", "smoke", "--config", str(data.parent / "threads.yaml"), "--domains", *DOMAINS,
            "--data-dir", str(data), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The smoke grid run serially with one thread per job: the reference bytes."""
    root = tmp_path_factory.mktemp("executors")
    write_smoke_domains(root / "data")
    (root / "threads.yaml").write_text("threads: 1\n")
    cfg = load_config(None, "smoke", {"domains": DOMAINS, "data_dir": str(root / "data"), "threads": 1})
    run_experiment(cfg, root / "serial")
    return root, (root / "serial" / "results.json").read_bytes()


def _overlap(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_ray_with_two_workers_gives_the_serial_results_byte_for_byte(serial):
    root, want = serial
    cfg = load_config(None, "smoke", {"domains": DOMAINS, "data_dir": str(root / "data"), "threads": 1})
    placements: list[dict] = []
    run_experiment(cfg, root / "ray", executor=ExecutorOptions("ray", workers=2), placements=placements)
    assert (root / "ray" / "results.json").read_bytes() == want
    pids = {p["pid"] for p in placements}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, not the driver
    assert _overlap([(p["start"], p["end"]) for p in placements])  # at the same time, not one after another
    assert not ray.is_initialized()  # the local runtime this run started is gone


def test_weight_searches_and_the_evals_that_read_them_run_on_workers_with_identical_results(serial):
    root, _ = serial
    over = {"domains": ["alpha", "beta"], "data_dir": str(root / "data"), "threads": 1,
            "compositions": ["sum", "ties", "weight_search"], "weight_search_trials": 3}
    run_experiment(load_config(None, "smoke", over), root / "ws-serial")
    placements: list[dict] = []
    run_experiment(load_config(None, "smoke", over), root / "ws-ray", executor=ExecutorOptions("ray", workers=2),
                   placements=placements)
    jobs = json.loads((root / "ws-ray" / "timings.json").read_text())  # every job this run did
    assert {p["key"] for p in placements} == set(jobs)  # all of them on workers, searches and their evals too
    assert {j["kind"] for j in jobs.values()} >= {"weight_search", "eval"}
    assert (root / "ws-ray" / "results.json").read_bytes() == (root / "ws-serial" / "results.json").read_bytes()


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """The CLI in its own session (so the test can kill it with all its Ray processes), stderr to a file."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "lorasum.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for(marker: Path, proc: subprocess.Popen, log: Path) -> None:
    t0 = time.time()
    while not marker.exists():
        assert proc.poll() is None, log.read_text()
        assert time.time() - t0 < 240, log.read_text()
        time.sleep(0.05)


def test_a_worker_killed_mid_job_is_replaced_and_the_results_are_identical(serial, tmp_path):
    root, want = serial
    marker, log = tmp_path / "train.marker", tmp_path / "stderr.txt"
    env = {**ENV, "LORASUM_TEST_PAUSE": "train", "LORASUM_TEST_PAUSE_MARKER": str(marker)}
    out = tmp_path / "run"
    proc = _start(_args(root / "data", out, "--executor", "ray", "--workers", "2"), env, log)
    try:
        _wait_for(marker, proc, log)
        worker = int(marker.read_text())
        assert worker != proc.pid
        os.kill(worker, signal.SIGKILL)  # the actor's process, inside its first training job
        assert proc.wait(timeout=600) == 0, log.read_text()
    finally:
        _kill_group(proc)
    assert (out / "results.json").read_bytes() == want


@pytest.mark.parametrize("point, where", [
    ("publish", "adapters/"),  # an adapter folder a worker trained, renamed into place
    ("write", "sims/"),
    ("write", "evals/"),
    ("write", "timings.json"),  # after a job, beside the artifacts
    ("write", "results.json"),  # every job done, the assembly being published
])
def test_a_killed_driver_resumes_on_either_executor_without_recomputing_finished_jobs(serial, tmp_path, point, where):
    from lorasum.files import is_temp_name

    root, want = serial
    marker, log = tmp_path / "write.marker", tmp_path / "stderr.txt"
    out = tmp_path / "run"
    # Only the driver writes below OUT (a worker writes in a private temp run folder, with the same env).
    target = f"{out.resolve()}/{where}"
    env = {**ENV, "LORASUM_TEST_PAUSE": f"{point}:{target}", "LORASUM_TEST_PAUSE_MARKER": str(marker)}
    proc = _start(_args(root / "data", out, "--executor", "ray", "--workers", "2"), env, log)
    try:
        _wait_for(marker, proc, log)
        assert marker.read_text().startswith(str(out.resolve()))  # the pause held a temp name inside the run
    finally:
        _kill_group(proc)  # the driver while publishing at this point, and its Ray processes
    finished = {p: p.stat().st_mtime_ns for p in out.glob("adapters/[!.]*/adapter_model.safetensors")}
    assert not (out / "results.json").exists()
    res = subprocess.run([sys.executable, "-m", "lorasum.cli", *_args(root / "data", out)], env=ENV,
                         capture_output=True, text=True, timeout=900)  # resumed serially
    assert res.returncode == 0, res.stderr
    assert (out / "results.json").read_bytes() == want
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # no adapter was trained again
    assert [p for p in out.rglob("*") if is_temp_name(p.name)] == []  # the interrupted write left nothing behind


def test_the_grid_spreads_over_two_nodes_of_a_real_cluster_all_on_127_0_0_1(serial):
    from ray.cluster_utils import Cluster

    root, want = serial
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                             "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes(timeout=120)
        nodes = ray.nodes()
        assert len(nodes) == 2
        assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert ray.util.get_node_ip_address() == "127.0.0.1"  # the driver too
        cfg = load_config(None, "smoke", {"domains": DOMAINS, "data_dir": str(root / "data"), "threads": 1})
        placements: list[dict] = []
        run_experiment(cfg, root / "cluster", executor=ExecutorOptions("ray", address=cluster.address),
                       placements=placements)
        assert {p["node"] for p in placements} == {n["NodeID"] for n in nodes}
        assert (root / "cluster" / "results.json").read_bytes() == want
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("extra,culprits", [
    (["--executor", "ray", "--address", "127.0.0.1:{port}"], ["--address 127.0.0.1:{port}: no Ray cluster answers"]),
    (["--executor", "ray", "--workers", "0"], ["--workers must be at least 1 and at most 4096, got 0"]),
    (["--workers", "2"], ["--workers and --address apply to --executor ray only"]),
    (["--executor", "ray", "--address", "nohost"], ["--address must be HOST:PORT"]),
])
def test_bad_executor_options_are_one_line_within_seconds(serial, tmp_path, capsys, extra, culprits):
    root, _ = serial
    port = free_port()
    t0 = time.time()
    rc = main(_args(root / "data", tmp_path / "run", *[a.format(port=port) for a in extra]))
    out, err = capsys.readouterr()
    one_line_error((rc, out, err), *[c.format(port=port) for c in culprits], absent=tmp_path / "run")
    assert time.time() - t0 < 10


def test_ray_not_installed_says_how_to_install_it(serial, tmp_path, capsys, monkeypatch):
    root, _ = serial
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(_args(root / "data", tmp_path / "run", "--executor", "ray")) == 2
    assert "pip install 'lorasum[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_worker_that_cannot_load_the_model_stops_the_run_naming_the_job(serial, tmp_path, capsys):
    root, _ = serial
    rc = main(_args(root / "data", tmp_path / "run", "--executor", "ray", "--workers", "1", "--model",
                    str(tmp_path / "no-such-model")))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lorasum: error: job ") and "no-such-model" in err, err


def test_tune_on_two_ray_workers_fills_one_study_in_parallel(tmp_path, capsys, monkeypatch):
    import optuna
    from conftest import color_rows, write_jsonl

    (tmp_path / "barrier").mkdir()  # both workers start their trials together, whichever loaded first
    monkeypatch.setenv("LORASUM_TEST_BARRIER", f"{tmp_path / 'barrier'}:2")

    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(80))
    out = tmp_path / "tune"
    args = ["tune", "--model", "tiny-gpt2", "--data-dir", str(tmp_path / "data"), "--data", "colors", "--max-train",
            "24", "--max-validation", "8", "--trials", "4", "--out", str(out)]
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="tune:colors", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 4
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers ran trials
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in done]
    assert _overlap(spans)  # at the same time
    best = __import__("json").loads((out / "best.json").read_text())
    assert best["trials"]["requested"] == 4 and best["value"] == min(t.value for t in done if t.value is not None)
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0  # reached: a rerun adds nothing
    assert len(optuna.load_study(study_name="tune:colors", storage=study._storage).trials) == len(study.trials)
    assert not [p for p in out.iterdir() if p.name.startswith(".trial")]


def test_a_tuning_worker_killed_mid_trial_is_relaunched_and_its_trial_failed(tmp_path):
    import optuna
    from conftest import color_rows, write_jsonl

    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(80))
    out, marker, log = tmp_path / "tune", tmp_path / "train.marker", tmp_path / "stderr.txt"
    env = {**ENV, "LORASUM_TEST_PAUSE": "train", "LORASUM_TEST_PAUSE_MARKER": str(marker)}
    proc = _start(["tune", "--model", "tiny-gpt2", "--data-dir", str(tmp_path / "data"), "--data", "colors",
                   "--max-train", "24", "--max-validation", "8", "--trials", "3", "--out", str(out),
                   "--executor", "ray", "--workers", "1"], env, log)
    try:
        _wait_for(marker, proc, log)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the Ray task's process, inside its first trial
        assert proc.wait(timeout=600) == 0, log.read_text()
    finally:
        _kill_group(proc)
    study = optuna.load_study(study_name="tune:colors", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    states = [(t.state.name, t.user_attrs.get("worker", "")) for t in study.trials]
    assert states[0][0] == "FAIL" and states[0][1].endswith(":0.0"), states  # the killed task's trial
    done = [w for s, w in states if s in ("COMPLETE", "PRUNED")]
    assert len(done) == 3 and all(w.endswith(":0.1") for w in done), states  # all by the relaunched task
    assert not [s for s, _ in states if s in ("RUNNING", "WAITING")]


def test_tune_on_a_cluster_without_shared_storage_is_refused(tmp_path, capsys):
    from conftest import H2_SETTINGS_FRAME, color_rows, socket_server, write_jsonl

    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(40))
    with socket_server(H2_SETTINGS_FRAME) as port:  # answers like a Ray head, so the storage rule speaks
        rc = main(["tune", "--model", "tiny-gpt2", "--data-dir", str(tmp_path / "data"), "--data", "colors",
                   "--trials", "2", "--out", str(tmp_path / "out"), "--executor", "ray", "--address",
                   f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and "tuning on a Ray cluster needs a study every node reaches: pass --storage postgresql://" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_reduced_quick_run_on_ray_matches_serial_byte_for_byte(real_data_dir, smollm2, tmp_path):
    """The embedded SmolLM2 on two real domains (bf16 autocast as in the preset): the same bytes on both executors."""
    cfg = {"domains": ["math", "finance"], "data_dir": str(real_data_dir), "max_train": 12, "max_validation": 6,
           "max_test": 8, "threads": 1, "bootstrap_samples": 200}
    run_experiment(load_config(None, "quick", cfg), tmp_path / "serial")
    placements: list[dict] = []
    run_experiment(load_config(None, "quick", cfg), tmp_path / "ray", executor=ExecutorOptions("ray", workers=2),
                   placements=placements)
    assert len({p["pid"] for p in placements}) == 2
    assert (tmp_path / "ray" / "results.json").read_bytes() == (tmp_path / "serial" / "results.json").read_bytes()


def test_a_run_with_fixed_threads_leaves_the_callers_thread_count_alone(serial, tmp_path):
    import torch

    root, _ = serial
    before = torch.get_num_threads()
    cfg = load_config(None, "smoke", {"domains": DOMAINS, "data_dir": str(root / "data"),
                                      "threads": 1 if before != 1 else 2})
    run_experiment(cfg, tmp_path / "run")
    assert torch.get_num_threads() == before
