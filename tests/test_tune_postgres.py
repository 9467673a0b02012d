"""Two `lorasum tune` worker processes share one study on a real PostgreSQL server (Debian's packages, started
here on 127.0.0.1 with a temporary data folder, as a non-root user). Under CI=true a missing PostgreSQL fails the
test; elsewhere it is skipped with the reason. `.ci/run` installs the server."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import color_rows, free_port, unavailable, write_jsonl

TRIALS = 8


def _server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found and Path(found[-1]).with_name("postgres").exists() else None


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on a free port; yields the URL of an empty database, stops it afterwards."""
    bindir = _server_binaries()
    if bindir is None:
        unavailable("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (install Debian's "
                    "postgresql package, as .ci/run does)")
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no 'postgres' user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lorasum-pg-"))
    data, started = root / "data", False
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        if prefix:
            shutil.chown(root, "postgres", "postgres")
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "lorasum", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        port = free_port()
        opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        start = subprocess.run([*pg_ctl, "-l", str(root / "server.log"), "-o", opts, "-w", "-t", "60", "start"],
                               capture_output=True, text=True)
        started = start.returncode == 0
        assert started, f"PostgreSQL did not start: {start.stderr} {(root / 'server.log').read_text()[-2000:]}"
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="lorasum", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
        yield f"postgresql://lorasum@127.0.0.1:{port}/optuna"
    finally:
        if started:
            subprocess.run([*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_and_stop_at_exactly_the_requested_trials(postgres_url, tmp_path):
    import optuna

    ddir = tmp_path / "data"
    write_jsonl(ddir / "colors.jsonl", color_rows(120))
    space = tmp_path / "space.yaml"  # trials of ~1 s, so both workers are busy at once
    space.write_text("dropout: {low: 0.0, high: 0.2}\nepochs: {low: 2, high: 3}\nbatch_size: {choices: [4]}\n"
                     "lr: {low: 1.0e-4, high: 3.0e-3, log: true}\n")
    (tmp_path / "barrier").mkdir()  # both workers start their trials together, whichever loaded first
    env = {**os.environ, "LORASUM_PROGRESS": "0", "LORASUM_TEST_BARRIER": f"{tmp_path / 'barrier'}:2"}
    workers = []
    for i in range(2):
        cmd = [sys.executable, "-m", "lorasum.cli", "tune", "--model", "tiny-gpt2", "--data-dir", str(ddir),
               "--data", "colors", "--max-train", "48", "--max-validation", "8", "--trials", str(TRIALS),
               "--space", str(space), "--storage", postgres_url, "--study", "shared", "--out", str(tmp_path / f"w{i}"),
               "--threads", "1", "--heartbeat", "5"]
        workers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials()
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == TRIALS
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # a FAIL can only be a trial that lost the race for the last slot (nothing crashed, nothing was killed)
    assert all(t.user_attrs.get("lorasum.surplus") for t in trials if t.state.name == "FAIL")
    # each finished trial ran once, in one of the two workers, and both workers ran some
    ids = {f"{socket.gethostname()}:{w.pid}" for w in workers}
    ran = [t.user_attrs.get("worker") for t in done]
    assert set(ran) == ids, (ran, ids)
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == len(params), "two finished trials drew identical parameters"
    assert len({t.number for t in done}) == TRIALS
    # both workers wrote the same best.json: the study's best trial
    best = min((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)
    for i in range(2):
        b = json.loads((tmp_path / f"w{i}" / "best.json").read_text())
        assert (b["trial"], b["value"], b["tuned"]) == (best.number, best.value, best.params)
        assert b["trials"]["complete"] + b["trials"]["pruned"] == TRIALS
        assert "postgresql://lorasum@127.0.0.1" in b["storage"]
