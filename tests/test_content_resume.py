"""Resumes key on content: a study or job spec made from data or adapter files that have since changed at the same
paths is refused naming the file (search-weights, tune, job specs) or, inside an experiment, restarted with a note
(a weight_search job's study)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import color_rows, one_line_error, shape_rows, write_data_folder, write_jsonl
from safetensors.torch import load_file, save_file

from lorasum.errors import LorasumError
from lorasum.jsonfile import sha256_file
from lorasum.lm.models import load_model
from lorasum.study.config import load_config
from lorasum.study.experiment import plan
from lorasum.study.jobs import artifact_path, run_job

MODEL = "tiny-gpt2"


def _copy_inputs(tiny_adapters, tiny_data, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Writable copies of the shared data folder and both adapters (the session's own are left untouched)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    a, b = (tmp_path / n for n in ("colors", "shapes"))
    for dst, name in ((a, "colors"), (b, "shapes")):
        shutil.copytree(tiny_adapters[MODEL][name], dst)
    for p in [data, *data.iterdir(), a, b, *a.iterdir(), *b.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return data, a, b


def _scale_weights(adapter: Path, factor: float) -> None:
    """The same adapter path, other content: every LoRA tensor scaled."""
    f = adapter / "adapter_model.safetensors"
    save_file({k: v * factor for k, v in load_file(str(f)).items()}, str(f))


@pytest.mark.parametrize("change", ["data", "weights", "config"])
def test_search_weights_on_changed_data_or_adapter_is_refused_naming_the_file(run_cli, tiny_adapters, tiny_data,
                                                                              tmp_path, change):
    data, a, b = _copy_inputs(tiny_adapters, tiny_data, tmp_path)
    out = tmp_path / "out"
    args = ["search-weights", a, b, "--model", MODEL, "--data-dir", data, "--data", "colors", "--data", "shapes",
            "--max-validation", "8", "--trials", "2", "--out", out]
    assert run_cli(*args)[0] == 0
    if change == "data":
        changed = data / "shapes.jsonl"
        write_jsonl(changed, shape_rows(180))
    elif change == "weights":
        changed = b / "adapter_model.safetensors"
        _scale_weights(b, 0.5)
    else:
        changed = a / "adapter_config.json"
        cfg = json.loads(changed.read_text())
        changed.write_text(json.dumps({**cfg, "lora_alpha": cfg["lora_alpha"] * 2}))
    one_line_error(run_cli(*args[:-4], "--trials", "3", "--out", out), "other file contents", changed)
    study = optuna.load_study(study_name="weights", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2  # nothing was added to the old study


def test_tune_on_changed_data_is_refused_naming_it(run_cli, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "colors.jsonl", color_rows(80))
    args = ["tune", "--model", MODEL, "--data-dir", data, "--data", "colors", "--max-train", "24",
            "--max-validation", "8", "--trials", "1", "--out", tmp_path / "tune"]
    assert run_cli(*args)[0] == 0
    write_jsonl(data / "colors.jsonl", color_rows(81))
    one_line_error(run_cli(*args), "different setup", "data.sources.colors")


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A smoke plan over two domains the test writes, and the tiny model its jobs run on."""
    root = tmp_path_factory.mktemp("content")
    write_data_folder(root / "data")
    cfg = load_config(None, "smoke", {"domains": ["colors", "shapes"], "data_dir": str(root / "data")})
    return root, plan(cfg, root / "run"), load_model(cfg.model, device="cpu")


def test_a_data_stats_spec_on_changed_data_is_refused_naming_the_file(planned, run_cli, tmp_path):
    root, p, loaded = planned
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    spec = {**p.data_stats, "run_dir": str(tmp_path / "run"), "data_dir": str(data)}
    write_jsonl(data / "shapes.jsonl", shape_rows(59))
    with pytest.raises(LorasumError, match="shapes.jsonl changed since the job was planned"):
        run_job(spec, loaded)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    one_line_error(run_cli("job", spec_file), "shapes.jsonl", "sha256 differs")
    assert not artifact_path(spec).exists()
    write_jsonl(data / "shapes.jsonl", shape_rows(60))  # the planned content again: the job runs
    assert json.loads(run_job(spec, loaded).read_text())["rows"]


def test_a_weight_search_job_restarts_its_study_when_an_adapter_changed(planned, tiny_adapters, tmp_path, capfd):
    root, p, loaded = planned
    run = tmp_path / "run"
    keys = ["train-" + "0" * 20, "train-" + "1" * 20]
    for key, name in zip(keys, ("colors", "shapes")):
        shutil.copytree(tiny_adapters[MODEL][name], run / "adapters" / key)
        for f in (run / "adapters" / key).iterdir():
            f.chmod(0o644)
    stats = p.data_stats
    spec = {"kind": "weight_search", "run_dir": str(run), "model": MODEL, "data_dir": stats["data_dir"],
            "data": stats["data"], "domains": ["colors", "shapes"], "max_length": 32, "batch_size": 8,
            "loss_on": "all", "trials": 2, "method": "sum", "adapters": [{"train_key": k, "weight": 1.0} for k in keys]}
    out = run_job(spec, loaded)
    storage = f"sqlite:///{out.with_suffix('.study') / 'study.db'}"
    old_ones = optuna.load_study(study_name="weights", storage=storage).trials[0].value  # all weights 1
    out.unlink()  # as if the job had been stopped before its artifact was written
    _scale_weights(run / "adapters" / keys[1], 0.0)  # the adapter retrained at the same key, other content
    capfd.readouterr()
    best = json.loads(run_job(spec, loaded).read_text())
    err = capfd.readouterr().err
    assert "other file contents" in err and keys[1] in err and "starts again" in err
    study = optuna.load_study(study_name="weights", storage=storage)
    assert len(study.trials) == 2 and best["trials"] == 2
    assert study.trials[0].value != old_ones  # trial 0 was scored again, on the changed adapter
    inputs = study.user_attrs["lorasum.setup"]["inputs"]
    assert inputs[f"adapters/{keys[1]}/adapter_model.safetensors"] == \
        sha256_file(run / "adapters" / keys[1] / "adapter_model.safetensors")
    # a moved run keeps its study: inputs are named inside the run, not by path
    moved = tmp_path / "moved"
    run.rename(moved)
    (moved / "searches" / out.name).unlink()
    capfd.readouterr()
    assert json.loads(run_job({**spec, "run_dir": str(moved)}, loaded).read_text()) == best
    assert "starts again" not in capfd.readouterr().err
