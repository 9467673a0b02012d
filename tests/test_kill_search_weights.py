"""`lorasum search-weights` SIGKILLed while it writes its results: the rerun finishes the same search (no trial
repeated) and writes the same bytes as an uninterrupted one, with no leftovers beside them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_when_paused

from lorasum import files

ENV = {**os.environ, "LORASUM_PROGRESS": "0"}
MODEL = "tiny-gpt2"


def _search(adapters: dict, data: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "lorasum.cli", "search-weights", str(adapters["colors"]), str(adapters["shapes"]),
            "--model", MODEL, "--device", "cpu", "--data-dir", str(data), "--data", "colors", "--data", "shapes",
            "--max-validation", "8", "--trials", "3", "--out", str(out)]
    return subprocess.Popen(args, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _results(out: Path) -> dict[str, bytes]:
    """What a search publishes: best.json and the composed adapter's files (the study database is its journal)."""
    return {"best.json": (out / "best.json").read_bytes(),
            **{f"adapter/{p.name}": p.read_bytes() for p in sorted((out / "adapter").iterdir())}}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if files.is_temp_name(p.name))


@pytest.mark.parametrize("point,part", [("write", "best.json"), ("publish", "adapter")])
def test_search_weights_killed_while_writing_resumes_to_the_same_bytes(tiny_adapters, tiny_data, tmp_path, point,
                                                                       part):
    adapters = tiny_adapters[MODEL]
    clean = tmp_path / "clean"
    proc = _search(adapters, tiny_data, clean)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()

    out, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**ENV, files.PAUSE_ENV: f"{point}:{out.name}/{part}", files.PAUSE_MARKER_ENV: str(marker)}
    proc = _search(adapters, tiny_data, out, env)
    kill_when_paused(proc, marker, "search", point)
    assert _leftovers(out), "the kill left no in-flight write to test"

    proc = _search(adapters, tiny_data, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    assert _results(out) == _results(clean)
    assert _leftovers(out) == []
