"""`lorasum compose` killed with SIGKILL while it publishes its adapter, for every merge method: the output path is
absent (never half-written), and the rerun writes the same bytes as an uninterrupted compose and leaves nothing
else beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import file_bytes, kill_when_paused
from delta_fixtures import make_adapter

from lorasum import files
from lorasum.delta.registry import METHODS

ENV = {**os.environ, "LORASUM_PROGRESS": "0"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("kill-compose")
    return [make_adapter(root / f"a{i}", "tiny-llama", seed=60 + i) for i in range(2)]


def _compose(pair: list[Path], method: str, out: Path, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "lorasum.cli", "compose", f"{pair[0]}", f"{pair[1]}:0.5", "--model", "tiny-llama",
            "--device", "cpu", "--method", method, "--out", str(out)]
    return subprocess.Popen(args, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)



@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("point", ["write", "publish"])
def test_compose_killed_while_publishing_leaves_no_adapter_and_the_rerun_matches(pair, tmp_path, method, point):
    clean = tmp_path / "clean"
    proc = _compose(pair, method, clean)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    out, marker = tmp_path / "composed-adapter", tmp_path / "marker"
    env = {**ENV, files.PAUSE_ENV: f"{point}:{out.name}", files.PAUSE_MARKER_ENV: str(marker)}
    proc = _compose(pair, method, out, env)
    kill_when_paused(proc, marker, "compose", point)
    assert not out.exists(), "a killed compose published a folder"
    assert any(files.is_temp_name(p.name) for p in tmp_path.iterdir()), "the kill left no in-flight write to test"

    proc = _compose(pair, method, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert file_bytes(out) == file_bytes(clean)  # every file byte for byte, lorasum.json included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "composed-adapter", "marker"]
