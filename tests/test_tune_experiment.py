"""The experiment config's `tune` section on the smoke grid (tiny-gpt2, two domains the test writes): `shared`
tunes once on the pooled validation split and every partition trains with that set; `per_partition` tunes each
partition and the report says the comparison is confounded; a rerun reuses the cached tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_data_folder

SPACE = {"epochs": {"low": 1, "high": 2}, "lr": {"low": 1e-3, "high": 2e-2, "log": True}}


def run_experiment(run_cli, root: Path, mode: str) -> Path:
    data = root / "data"
    if not data.exists():
        write_data_folder(data)
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"domains": ["colors", "shapes"], "tune": {"mode": mode, "trials": 2,
                                                                           "space": SPACE}}))
    rc, out, err, _ = run_cli("experiment", "--preset", "smoke", "--config", cfg, "--data-dir", data,
                              "--out", root / "run")
    assert rc == 0, err
    return root / "run"


def study_best(run: Path, name: str):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'tune' / 'study.db'}")
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(done) == 2
    return min((t for t in done if t.state.name == "COMPLETE"), key=lambda t: t.value)


def adapters(run: Path) -> dict[str, dict]:
    metas = [json.loads(p.read_text()) for p in (run / "adapters").glob("*/lorasum.json")]
    return {m["partition"]: m["train"] for m in metas}


def test_shared_tuning_trains_every_partition_with_one_set_and_is_cached(tmp_path, run_cli, monkeypatch):
    run = run_experiment(run_cli, tmp_path, "shared")
    best = study_best(run, "shared:colors+shapes")
    trained = adapters(run)
    assert set(trained) == {"colors", "shapes", "colors+shapes"}
    for part, train in trained.items():  # the tuned set, found on the pooled split, in every partition
        assert {k: train[k] for k in SPACE} == best.params, part
        assert train["seed"] == 0
    r = json.loads((run / "results.json").read_text())
    t = r["tuning"]
    assert t["mode"] == "shared" and t["confounded"] is False and list(t["studies"]) == ["colors+shapes"]
    s = t["studies"]["colors+shapes"]
    # results.json rounds floats to 12 significant digits
    assert s["trial"] == best.number and s["tuned"] == pytest.approx(best.params, rel=1e-11)
    assert s["value"] == pytest.approx(best.value, rel=1e-11)
    assert len(s["history"]) == 2
    md = (run / "report.md").read_text()
    assert "## Tuning" in md and "CONFOUNDED" not in md and "shared, 2 trials" in md
    for name in ("tuning_history_0", "tuning_importance_0"):
        assert f"figures/{name}.png" in md
        assert (run / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == md.count("![")

    # a rerun reopens no study and loads no model; results.json is byte-identical
    before = (run / "results.json").read_bytes()

    def boom(*a, **k):
        raise AssertionError("tuning ran again")

    monkeypatch.setattr("lorasum.study.tuning.tune", boom)
    monkeypatch.setattr("lorasum.study.tuning.load_model", boom)
    run_experiment(run_cli, tmp_path, "shared")
    assert (run / "results.json").read_bytes() == before


def test_per_partition_tuning_is_marked_confounded(tmp_path, run_cli):
    run = run_experiment(run_cli, tmp_path, "per_partition")
    r = json.loads((run / "results.json").read_text())
    assert r["tuning"]["confounded"] is True
    assert set(r["tuning"]["studies"]) == {"colors", "shapes", "colors+shapes"}
    trained = adapters(run)
    for part in ("colors", "shapes", "colors+shapes"):  # each partition trained with its own study's best
        best = study_best(run, f"per_partition:{part}")
        assert {k: trained[part][k] for k in SPACE} == best.params
        assert r["tuning"]["studies"][part]["tuned"] == pytest.approx(best.params, rel=1e-11)
    md = (run / "report.md").read_text()
    assert "CONFOUNDED" in md and "confounded by tuning" in md and "per_partition, 2 trials (confounded)" in md
    # results.json has sorted keys ("colors+shapes" < "shapes"): the re-render keeps the grid's order of studies
    html = (run / "report.html").read_bytes()
    assert run_cli("report", run)[0] == 0
    assert (run / "report.md").read_text() == md and (run / "report.html").read_bytes() == html
    tuning = md[md.index("## Tuning"):]
    assert tuning.index("| colors |") < tuning.index("| shapes |") < tuning.index("| colors+shapes |")
