"""`lorasum job SPEC.json` in a fresh process produces the same artifact as the in-process run, for train,
similarity and in-place (unlearning) jobs; the specs come from the experiment's own plan (smoke, two domains)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_data_folder

from lorasum.study.config import load_config
from lorasum.study.experiment import plan
from lorasum.study.plan import CheckKey, SimKey, TrainKey
from lorasum.study.jobs import artifact_path, run_job

# The subprocess uses this process's thread count: float reductions (and so the artifact bytes) depend on it.
ENV = {**os.environ, "LORASUM_PROGRESS": "0", "OMP_NUM_THREADS": str(__import__("torch").get_num_threads())}
# lorasum.json fields that measure the run rather than describe the result
MEASURED = ("wall_s", "tokens_per_s", "provenance")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """Both fundamental adapters, their pair similarity and an in-place unlearning check, run in this process."""
    from lorasum.lm.models import load_model

    root = tmp_path_factory.mktemp("jobs")
    write_data_folder(root / "data")
    cfg = load_config(None, "smoke", {"domains": ["colors", "shapes"], "data_dir": str(root / "data")})
    seed = cfg.seeds[0]
    p = plan(cfg, root / "run")
    specs = {"train": p.train[TrainKey("colors", seed)], "train2": p.train[TrainKey("shapes", seed)],
             "similarity": p.sims[SimKey("pair", ("colors", "shapes"), seed)],
             "inplace": p.checks[CheckKey("colors", seed)]}
    loaded = load_model(cfg.model, device="cpu")
    for spec in specs.values():
        run_job(spec, loaded)
    return root, specs


def run_fresh(spec: dict, run_dir: Path, tmp_path: Path, hash_seed: str | None = None) -> Path:
    """Run `spec` relocated to `run_dir` with `python -m lorasum.cli job` in a new process; its artifact path."""
    spec = {**spec, "run_dir": str(run_dir)}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = ENV if hash_seed is None else {**ENV, "PYTHONHASHSEED": hash_seed}
    res = subprocess.run([sys.executable, "-m", "lorasum.cli", "job", str(spec_file)], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 0, res.stderr
    out = artifact_path(spec)
    assert res.stdout.strip() == str(out)
    return out


def copy_adapters(root: Path, specs: dict, run_dir: Path) -> None:
    for name in ("train", "train2"):
        src = artifact_path(specs[name])
        shutil.copytree(src, run_dir / "adapters" / src.name)


@pytest.mark.parametrize("hash_seed", ["0", "1"])  # set iteration order differs between these two
def test_train_job_in_a_fresh_process(hash_seed, in_process, tmp_path):
    root, specs = in_process
    want = artifact_path(specs["train"])
    got = run_fresh(specs["train"], tmp_path / "run", tmp_path, hash_seed)
    assert got.name == want.name
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (got / f).read_bytes() == (want / f).read_bytes(), f
    a, b = (json.loads((d / "lorasum.json").read_text()) for d in (want, got))
    assert a["epochs"] and a["epochs"] == b["epochs"]  # the same losses, bit for bit
    assert {k: v for k, v in a.items() if k not in MEASURED} == {k: v for k, v in b.items() if k not in MEASURED}


@pytest.mark.parametrize("kind", ["similarity", "inplace"])
def test_similarity_and_inplace_jobs_in_a_fresh_process(kind, in_process, tmp_path):
    root, specs = in_process
    run_dir = tmp_path / "run"
    copy_adapters(root, specs, run_dir)  # the inputs they declare (by train key)
    want = artifact_path(specs[kind]).read_bytes()
    got = run_fresh(specs[kind], run_dir, tmp_path)
    assert got.read_bytes() == want
    body = json.loads(want)
    if kind == "inplace":  # a real check: removing a block in place equals adding only the others
        assert body["rel_error_weights"] < 1e-6
    else:
        assert body["layers"] and 0 < body["rms"] < 1
