"""Merge methods in the experiment: hyperparameters chosen on validation (checked against independent evals of the
same merges), the method and its hyperparameters in the eval key, the weight search's weights, the best-on-validation
finding, and a byte-identical results.json on rerun."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import torch

import pytest

from conftest import write_smoke_domains
from lorasum.delta.methods import merge
from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError
from lorasum.lm.data import DataConfig, load_domain
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model
from lorasum.study.config import load_config
from lorasum.study.experiment import plan, run_experiment
from lorasum.study.plan import EvalKey, TrainKey
from lorasum.study.findings import method_verdict

COMPS = ["sum", "mean", "best_single", "ties", "weight_search", "arrow", "prompt_router"]


@pytest.fixture(scope="module")
def method_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    data = write_smoke_domains(root / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": COMPS, "weight_search_trials": 3,
                                                 "method_grid": {"ties": {"density": [0.2, 0.5]},
                                                                 "arrow": {"top_k": [1, 2], "router_temperature": [1.0]}}})
    run = root / "run"
    return cfg, run, data, run_experiment(cfg, run)


def test_density_is_chosen_on_validation_and_reported_on_test(method_run):
    cfg, run, data, results = method_run
    p = plan(cfg, run.resolve())
    adapters = [load_adapter(run / "adapters" / p.train[TrainKey(d, 0)]["key"]) for d in ("alpha", "beta")]
    lm = load_model("tiny-gpt2", device="cpu")
    dc = DataConfig(str(data), max_records={"validation": cfg.max_validation, "test": cfg.max_test})

    def ppl(density, split):
        merged = merge([(a, 1.0) for a in adapters], "ties", {"density": density})
        return evaluate(lm, ["alpha", "beta"], [(merged, 1.0)], dc, split=split,
                        max_length=cfg.train.max_length)["results"]["pooled"]["perplexity"]

    val = {d: ppl(d, "validation") for d in (0.2, 0.5)}
    best = min(val, key=val.get)
    ties = results["compositions"][0]["baselines"]["ties"]
    assert ties["params"] == {"density": best} and ties["chosen_on"] == "validation"
    for d in (0.2, 0.5):
        assert math.isclose(ties["validation_perplexity"][f"ties(density={d:g})[alpha+beta]"], val[d], rel_tol=1e-6)
    assert math.isclose(ties["perplexity"]["mean"], ppl(best, "test"), rel_tol=1e-6)


def test_the_eval_key_carries_the_method_and_its_hyperparameters(method_run):
    cfg, run, _, _ = method_run
    evals = plan(cfg, run.resolve()).evals
    a, b = (evals[EvalKey(f"ties(density={d})[alpha+beta]", "alpha", 0)] for d in (0.2, 0.5))
    assert a["method"] == b["method"] == "ties" and a["params"] == {"density": 0.2}
    assert a["key"] != b["key"] and a["adapters"] == b["adapters"]
    ws = evals[EvalKey("weight_search[alpha+beta]", "alpha", 0)]
    assert ws["weights_from"].startswith("weight_search-")
    assert "method" not in evals[EvalKey("sum[alpha+beta]", "alpha", 0)]  # the exact sum's key is unchanged


def test_weight_search_and_the_method_finding(method_run):
    _, _, _, results = method_run
    row = results["compositions"][0]
    ws = row["baselines"]["weight_search"]
    assert ws["weights"][0].keys() == {"w0", "w1"} and ws["search_value"][0] <= \
        row["method_choice"]["validation_perplexity"]["sum"] * (1 + 1e-9)
    choice = row["method_choice"]
    assert choice["best"] == min(choice["validation_perplexity"], key=choice["validation_perplexity"].get)
    (f,) = [f for f in results["findings"] if f["claim"] == "best merge method on validation vs the exact sum"]
    assert f["verdict"] == method_verdict(choice)


def test_rerun_is_byte_identical(method_run):
    cfg, run, _, _ = method_run
    before = (run / "results.json").read_bytes()
    run_experiment(cfg, run)
    assert (run / "results.json").read_bytes() == before
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "| combination | method (hyperparameters chosen on validation) |" in md
    assert (run / "figures" / "method_ranking.png").is_file()


def test_method_verdicts():
    base = {"validation_perplexity": {}, "best_model": "x"}
    assert method_verdict({**base, "best": "sum", "vs_sum": None}).startswith("the exact naive sum is the best")
    assert method_verdict({**base, "best": "ties", "vs_sum": {"ci": [-2.0, 0.5]}}) == \
        "the exact naive sum is within the CI of the best"
    assert method_verdict({**base, "best": "ties", "vs_sum": {"ci": [-2.0, -0.5]}}) == "ties beats the exact sum"


@pytest.mark.parametrize("grid, message", [({"tiez": {"density": [0.2]}}, "not a merge method"),
                                           ({"ties": {"density": [2.0]}}, "density"),
                                           ({"ties": {"density": []}}, "non-empty list"),
                                           ({"sum": {"lam": [1.0]}}, "not a merge method")])
def test_bad_method_grid_is_refused(grid, message):
    with pytest.raises(LorasumError, match=message):
        load_config(preset="smoke", overrides={"domains": ["a", "b"], "compositions": ["sum", "ties"],
                                               "method_grid": grid})


def test_where_the_cost_lands_follows_the_composition_chosen_on_validation(method_run):
    _, _, _, results = method_run
    choice = results["compositions"][0]["method_choice"]
    (cost,) = results["cost_by_domain"]
    assert cost["models"]["sum"]["model"] == "sum[alpha+beta]"
    if choice["best"] == "sum":
        assert "best_on_validation" not in cost["models"]
    else:
        best = cost["models"]["best_on_validation"]
        assert best["model"] == choice["best_model"] and best["method"] == choice["best"]
        for d in ("alpha", "beta"):  # its per-domain test perplexity is the matrix's cell of that model
            assert best["domains"][d]["perplexity"]["mean"] == pytest.approx(
                results["perplexity"][choice["best_model"]][d]["mean"], rel=1e-12)


def test_arrow_is_chosen_on_validation_and_the_test_split_never_decides(method_run, tmp_path):
    """Arrow's top_k is the grid point with the lowest pooled validation perplexity, each figure as `evaluate` routes
    it; making the chosen point's test NLL far worse (a copy of the run, reassembled) changes its test figures and
    never the choice."""
    cfg, run, data, results = method_run
    p = plan(cfg, run.resolve())
    folders = [run / "adapters" / p.train[TrainKey(d, 0)]["key"] for d in ("alpha", "beta")]
    lm = load_model("tiny-gpt2", device="cpu")
    dc = DataConfig(str(data), max_records={"validation": cfg.max_validation, "test": cfg.max_test})

    def ppl(top_k, split):
        return evaluate(lm, ["alpha", "beta"], [(str(f), 1.0) for f in folders], dc, split=split,
                        max_length=cfg.train.max_length, batch_size=cfg.eval_batch_size, route="arrow",
                        params={"top_k": top_k, "router_temperature": 1.0})["results"]["pooled"]["perplexity"]

    val = {k: ppl(k, "validation") for k in (1, 2)}
    assert abs(val[1] - val[2]) > 1e-6 * val[1]  # the two points differ: the choice means something
    best = min(val, key=val.get)
    arrow = results["compositions"][0]["baselines"]["arrow"]
    assert arrow["params"] == {"router_temperature": 1.0, "top_k": best} and arrow["chosen_on"] == "validation"
    for k in (1, 2):
        assert math.isclose(arrow["validation_perplexity"][f"arrow(router_temperature=1, top_k={k})[alpha+beta]"],
                            val[k], rel_tol=1e-6)
    assert math.isclose(arrow["perplexity"]["mean"], ppl(best, "test"), rel_tol=1e-6)

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for d in ("alpha", "beta"):  # the chosen point's test evals, 10x its NLL
        spec = p.evals[EvalKey(arrow["model"], d, 0)]
        f = copy / "evals" / f"{spec['key']}.json"
        art = json.loads(f.read_text())
        f.write_text(json.dumps({**art, "nll": [10 * x for x in art["nll"]]}))
    again = run_experiment(cfg, copy)["compositions"][0]["baselines"]["arrow"]
    assert again["params"] == arrow["params"] and again["validation_perplexity"] == arrow["validation_perplexity"]
    assert again["perplexity"]["mean"] > 100 * arrow["perplexity"]["mean"]


def _features(lm, questions: list[str]) -> np.ndarray:
    """The base model's last hidden state averaged over `Question: q\nAnswer:`, one question at a time (no padding),
    computed here with transformers directly."""
    out = []
    for q in questions:
        ids = lm.tokenizer(f"Question: {q}\nAnswer:", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # (n, hidden)
        out.append(h.double().mean(0).numpy())
    return np.stack(out)


def test_prompt_router_rows_follow_the_question_features_and_the_fundamentals_losses(method_run):
    """Distances from features computed here; top-1 and soft rows recomputed from the run's per-example losses; the
    soft temperature chosen on validation alone."""
    cfg, run, data, results = method_run
    p = plan(cfg, run.resolve())
    art = json.loads((run / "checks" / f"{p.prompt_route['key']}.json").read_text())
    lm = load_model("tiny-gpt2", device="cpu")
    dc = DataConfig(str(data), max_records={"train": cfg.max_train, "validation": cfg.max_validation,
                                            "test": cfg.max_test})
    doms = {d: load_domain(d, dc) for d in ("alpha", "beta")}
    centroids = np.stack([_features(lm, [r.question for r in doms[d].records["train"]]).mean(0) for d in doms])
    for split in ("validation", "test"):
        for d in doms:
            x = _features(lm, [r.question for r in doms[d].records[split]])
            mine = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
            assert np.allclose(np.asarray(art["distances"][split][d]), mine, rtol=1e-4, atol=1e-6 * mine.max())

    def losses(split):  # (n, k) per-example NLL of each fundamental, and the tokens
        nll = np.stack([np.concatenate([json.loads((run / "evals" / f"{p.evals[EvalKey(f'adapter[{k}]', d, 0, split)]['key']}.json").read_text())["nll"] for d in doms]) for k in doms], -1)
        tok = np.concatenate([json.loads((run / "evals" / f"{p.evals[EvalKey(f'adapter[{d}]', d, 0, split)]['key']}.json").read_text())["tokens"] for d in doms])
        dist = np.concatenate([np.asarray(art["distances"][split][d]) for d in doms])
        return nll, np.asarray(tok, float), dist

    nll, tok, dist = losses("test")
    own = np.concatenate([np.full(len(art["distances"]["test"][d]), i) for i, d in enumerate(doms)])
    row = next(x for x in results["routing"] if x["subset"] == ["alpha", "beta"])["prompt"]
    choice = dist.argmin(1)
    assert row["accuracy"] == pytest.approx(np.mean(choice == own), abs=1e-12)
    top1 = math.exp(nll[np.arange(len(choice)), choice].sum() / tok.sum())
    assert row["top1"]["perplexity"]["mean"] == pytest.approx(top1, rel=1e-9)

    def soft(nll, dist, t):  # -log Σ_k w_k exp(-NLL_k), w = softmax(-d² / (τ σ²))
        w = np.exp(-dist / (t * art["scale"]))
        w /= w.sum(1, keepdims=True)
        return -np.log((w * np.exp(-(nll - nll.min(1, keepdims=True)))).sum(1)) + nll.min(1)

    vnll, vtok, vdist = losses("validation")
    val = {t: math.exp(soft(vnll, vdist, t).sum() / vtok.sum()) for t in (0.1, 0.3, 1.0, 3.0)}
    assert row["soft"]["temperature"] == min(val, key=val.get) and row["soft"]["chosen_on"] == "validation"
    assert row["soft"]["perplexity"]["mean"] == pytest.approx(
        math.exp(soft(nll, dist, row["soft"]["temperature"]).sum() / tok.sum()), rel=1e-9)


def test_the_prompt_routers_choice_never_reads_the_answers(tmp_path):
    """The same questions with other answers give the same features, bit for bit."""
    from lorasum.lm.data import Record, tokenize_records
    from lorasum.lm.prompt_routing import prompt_features

    lm = load_model("tiny-gpt2", device="cpu")
    qs = [f"{i}+{i + 3}?" for i in range(6)]
    a = tokenize_records(lm.tokenizer, [Record(q, f"it is {2 * i + 3}", "x", 0.5) for i, q in enumerate(qs)], 32)
    b = tokenize_records(lm.tokenizer, [Record(q, "no idea at all, sorry " * (i + 1), "x", 0.5) for i, q in enumerate(qs)], 32)
    assert [x.input_ids for x in a] != [x.input_ids for x in b]
    assert np.array_equal(prompt_features(lm, a, batch_size=4), prompt_features(lm, b, batch_size=4))
