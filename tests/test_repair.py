"""Repair: the exact sum of adapters trained further on merged data. Zero steps is the exact sum; the steps, rank
and LoRA scale are what the recipe says; the experiment's repair rows follow the run's own losses."""

import json
import math

import pytest

from conftest import TINY_CAPS
from lorasum.delta.compose import weighted_sum
from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model, weights_fingerprint
from lorasum.lm.train import TrainConfig, train_adapter
from lorasum.study.config import load_config


def _ppl(lm, adapters, data) -> float:
    return evaluate(lm, ["colors", "shapes"], adapters, data, max_length=32, batch_size=4)["results"]["pooled"][
        "perplexity"]


@pytest.mark.parametrize("model_id", ["tiny-gpt2", "tiny-llama"])
def test_a_repair_of_zero_steps_is_the_exact_sum(tiny_adapters, tmp_path, model_id):
    t = tiny_adapters
    parts = [load_adapter(t[model_id][d]) for d in ("colors", "shapes")]
    lm = load_model(model_id, device="cpu")
    before = weights_fingerprint(lm.model)
    cfg = TrainConfig(epochs=1, lr=2e-2, batch_size=8, dropout=0.0, max_length=32)
    train_adapter(lm, "colors+shapes", tmp_path / "r0", cfg, t["data"], start=weighted_sum([(a, 1.0) for a in parts]),
                  max_steps=0)
    repaired = load_adapter(tmp_path / "r0")
    assert {f.rank for f in repaired.layers.values()} == {2 * cfg.r}
    assert {f.scale for f in repaired.layers.values()} == {cfg.scale}  # the recipe's LoRA scale, not 1
    summed = _ppl(lm, [(str(t[model_id][d]), 1.0) for d in ("colors", "shapes")], t["data"])
    base = _ppl(lm, [], t["data"])
    assert abs(summed - base) > 1e-3 * base  # the sum is far from the base model: the equality below can fail
    assert _ppl(lm, [(str(tmp_path / "r0"), 1.0)], t["data"]) == pytest.approx(summed, rel=1e-4)
    assert weights_fingerprint(lm.model) == before


def test_a_repair_takes_its_steps_and_moves_the_sum(tiny_adapters, tmp_path):
    t = tiny_adapters["tiny-gpt2"]
    parts = [load_adapter(t[d]) for d in ("colors", "shapes")]
    lm = load_model("tiny-gpt2", device="cpu")
    cfg = TrainConfig(epochs=1, lr=2e-2, batch_size=8, dropout=0.0, max_length=32)
    res = train_adapter(lm, "colors+shapes", tmp_path / "r3", cfg, tiny_adapters["data"],
                        start=weighted_sum([(a, 1.0) for a in parts]), max_steps=3)
    meta = json.loads((tmp_path / "r3" / "lorasum.json").read_text())
    assert res.steps == 3 and meta["start"] == {"adapter": "sum", "rank": 2 * cfg.r, "scale": cfg.scale,
                                                "max_steps": 3, "steps": 3}
    summed = _ppl(lm, [(str(t[d]), 1.0) for d in ("colors", "shapes")], tiny_adapters["data"])
    assert abs(_ppl(lm, [(str(tmp_path / "r3"), 1.0)], tiny_adapters["data"]) - summed) > 1e-4 * summed


@pytest.mark.parametrize("budgets", [[], [0.0], [1.5], [0.1, 0.1], ["a"]])
def test_bad_repair_budgets_are_refused_naming_the_key(budgets):
    with pytest.raises(LorasumError, match="repair_budgets"):
        load_config(preset="smoke", overrides={"domains": ["a", "b"], "repair_budgets": budgets})


def test_the_experiments_repair_rows_follow_its_steps_and_losses(tmp_path):
    from conftest import write_smoke_domains
    from lorasum.lm.data import DataConfig, load_domain
    from lorasum.study.experiment import plan, run_experiment
    from lorasum.study.plan import EvalKey

    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": ["sum", "repair"], "repair_budgets": [0.25, 1.0]})
    results = run_experiment(cfg, tmp_path / "run")
    p = plan(cfg, (tmp_path / "run").resolve())
    (row,) = results["repair"]
    dc = DataConfig(str(data), max_records={"train": cfg.max_train})
    full = math.ceil(sum(len(load_domain(d, dc).records["train"]) for d in ("alpha", "beta")) / cfg.train.batch_size)

    def pooled(model):
        arts = [json.loads((tmp_path / "run" / "evals" / f"{p.evals[EvalKey(model, d, 0)]['key']}.json").read_text())
                for d in ("alpha", "beta")]
        return math.exp(sum(sum(a["nll"]) for a in arts) / sum(sum(a["tokens"]) for a in arts))

    merged, summed = pooled("adapter[alpha+beta]"), pooled("sum[alpha+beta]")
    for b, f in zip(row["budgets"], (0.25, 1.0)):
        assert b["fraction"] == f and b["steps"] == [max(1, round(f * full * cfg.train.epochs))]
        rep = pooled(f"repair({f:g})[alpha+beta]")
        assert b["perplexity"]["mean"] == pytest.approx(rep, rel=1e-9)
        assert b["gap_closed"] == pytest.approx(1 - math.log(rep / merged) / math.log(summed / merged), rel=1e-9)
    assert any(f["claim"] == "a short repair of the sum vs merged" for f in results["findings"])
    assert "Repair — the exact sum" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("yaml_text, culprits", [
    ("repair_budgets: [0.0]\n", ["repair_budgets", "(0, 1]"]),
    ("repair_budgets: [0.1, 0.1]\n", ["repair_budgets"]),
    ("repair_budgets: []\n", ["repair_budgets"]),
    ("compositions: [sum, arrow]\nmethod_grid: {arrow: {top_k: [0]}}\n", ["top_k"]),
    ("compositions: [sum, arrow]\nmethod_grid: {arrow: {router_temperature: [-1]}}\n", ["router_temperature"]),
    ("compositions: [sum, prompt_routr]\n", ["prompt_routr"]),
])
def test_the_experiments_new_keys_refuse_bad_values_in_one_line(run_cli, tmp_path, yaml_text, culprits):
    from conftest import one_line_error

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    one_line_error(run_cli("experiment", "--preset", "smoke", "--domains", "a", "b", "--config", cfg,
                           "--out", tmp_path / "run"), *culprits, quiet=True, absent=tmp_path / "run")


def test_an_unknown_route_is_refused_in_one_line(run_cli, tmp_path):
    from conftest import one_line_error

    one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data", "a", "--route", "arow"), "--route", "arow", quiet=True)
