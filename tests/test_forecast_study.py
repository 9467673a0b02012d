"""The experiment's forecast (composition `forecast`): every predictor per pair from a predictors job, equal to the
library run directly on the same adapters and prompts, ranked against the pairs' %Δ, with no verdict under 8 pairs;
and the report's table."""

from __future__ import annotations

import math

import pytest

from conftest import write_smoke_domains
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.predictors import WEIGHT_PREDICTORS
from lorasum.lm.data import load_domain
from lorasum.lm.interference import pair_interference, question_prompts
from lorasum.lm.models import load_model
from lorasum.study.config import load_config
from lorasum.study.experiment import plan, run_experiment
from lorasum.study.plan import TrainKey
from lorasum.study.units.forecast import FORECAST_INPUTS


@pytest.fixture(scope="module")
def forecast_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    data = write_smoke_domains(root / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta", "gamma"],
                                                 "compositions": ["sum", "forecast"], "max_level": 2})
    return cfg, root / "run", run_experiment(cfg, root / "run")


def test_each_pairs_predictors_are_the_library_run_directly(forecast_run):
    cfg, run, results = forecast_run
    fc = results["forecast"]
    assert fc["n_pairs"] == 3 and fc["inputs_per_domain"] == FORECAST_INPUTS
    p = plan(cfg, run.resolve())
    lm = load_model("tiny-gpt2", device="cpu")
    a, b = (load_adapter(run / "adapters" / p.train[TrainKey(d, 0)]["key"]) for d in ("alpha", "beta"))
    got = fc["values"]["alpha|beta"]
    for name, f in WEIGHT_PREDICTORS.items():
        if name in got:
            assert got[name] == pytest.approx(f(a, b), rel=1e-9, abs=1e-12)
    prompts = [question_prompts([r.question for r in load_domain(d, cfg.data_config()).records["train"]
                                 [:FORECAST_INPUTS]]) for d in ("alpha", "beta")]
    direct = pair_interference(lm, a, b, prompts[0], prompts[1], cfg.train.max_length, cfg.eval_batch_size)
    for name in ("delta_ratio", "delta_cosine", "delta_cosine_rms", "kl_sum"):
        assert got[name] == pytest.approx(direct[name], rel=1e-6, abs=1e-9)
    row = next(c for c in results["compositions"] if c["subset"] == ["alpha", "beta"])
    assert fc["pct_change"]["alpha|beta"] == row["pct_change"]["mean"]
    assert math.isclose(got["rms"], row["rms"], rel_tol=1e-9)  # the paper's RMS, as the similarity job has it


def test_three_pairs_get_no_verdict_and_the_costs_are_counted(forecast_run):
    _, run, results = forecast_run
    fc = results["forecast"]
    assert {r["verdict"] for r in fc["predictors"]} == {"too few pairs (n<8)"}
    assert fc["tested"] == len(fc["predictors"]) >= 10
    assert fc["cost"]["weight"]["forward_tokens"] == 0
    assert fc["cost"]["function"]["forward_tokens"] == pytest.approx(2 * fc["cost"]["activation"]["forward_tokens"])
    assert fc["cost"]["activation"]["forward_tokens"] > 0
    md = (run / "report.md").read_text()
    assert "What predicts the summing cost" in md and "too few pairs" in md
