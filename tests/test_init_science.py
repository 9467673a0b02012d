"""Interference science: LoRA initialisation as a recorded choice, factor diagnostics and references in a run, the
unlearning weight chosen on validation, the claims, schema 2 beside schema-1 results."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import snapshot as listing
from conftest import write_smoke_domains
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.subspace import factor_similarity, factor_summary
from lorasum.lm import train as train_mod
from lorasum.lm.data import DataConfig
from lorasum.lm.models import load_model
from lorasum.lm.train import TrainConfig, init_seed, train_adapter, train_stream_seed
from lorasum.report.render import write_report
from lorasum.study.config import load_config
from lorasum.study.experiment import run_experiment
from lorasum.study.units.unlearning import choose_weight
from test_experiment_errors import experiment, one_line_error


def test_init_seeds_are_stable_hashes_and_dropout_does_not_depend_on_the_mode():
    shared, indep = TrainConfig(seed=3, init="shared"), TrainConfig(seed=3, init="independent")
    assert init_seed("math+finance", shared) == 3 == init_seed("medicine", shared)
    want = int.from_bytes(hashlib.sha256("lorasum-init\x00math+finance\x003".encode()).digest()[:8], "big") % 2**63
    assert init_seed("math+finance", indep) == want != init_seed("math", indep)
    assert train_stream_seed(shared) == train_stream_seed(indep) != train_stream_seed(TrainConfig(seed=4))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = write_smoke_domains(tmp_path_factory.mktemp("initdata"))
    caps = {"train": 16, "validation": 8, "test": 8}
    return load_model("tiny-gpt2", device="cpu"), DataConfig(str(data), max_records=caps)


def _train(lm, data, part, folder, init, **kw):
    train_adapter(lm, part, folder, TrainConfig(epochs=1, lr=5e-3, max_length=32, init=init, **kw), data)
    return load_adapter(folder)


def test_independent_adapters_do_not_share_a_and_shared_ones_do(tiny, tmp_path):
    lm, data = tiny
    a_sim = {}
    for mode in ("independent", "shared"):
        a, b = (_train(lm, data, p, tmp_path / f"{mode}-{p}", mode) for p in ("alpha", "beta"))
        a_sim[mode] = factor_summary(factor_similarity(a, b))["A"]
        meta = json.loads((tmp_path / f"{mode}-alpha" / "lorasum.json").read_text())
        assert meta["init"] == {"mode": mode, "seed": init_seed("alpha", TrainConfig(init=mode))}
    assert a_sim["shared"] > 0.95 and a_sim["independent"] < 0.5, a_sim


def test_the_two_modes_differ_only_in_the_initial_a(tiny, tmp_path, monkeypatch):
    """With the init seed forced equal, an adapter trained in either mode is the same bits (dropout on)."""
    lm, data = tiny
    monkeypatch.setattr(train_mod, "init_seed", lambda partition, cfg, sample="": 1234)
    x, y = (load_file(_train(lm, data, "alpha", tmp_path / m, m, dropout=0.1).path + "/adapter_model.safetensors")
            for m in ("independent", "shared"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_choose_weight_by_hand():
    removed = {0.25: 12.0, 0.5: 10.5, 1.0: 9.0}  # target 10: λ = 0.5 is closest in log ratio
    others = {0.25: {"b": 5.0}, 0.5: {"b": 5.2}, 1.0: {"b": 6.0}}  # before 5.0: λ = 1 breaks retention at δ = 0.05
    assert choose_weight(removed, others, 10.0, {"b": 5.0}, 0.05)[0] == 0.5
    assert choose_weight(removed, others, 10.0, {"b": 5.0}, 0.0)[0] == 0.25
    assert choose_weight(removed, others, 9.0, {"b": 5.0}, 0.5)[0] == 1.0
    weight, why = choose_weight(removed, {w: {"b": 9.0} for w in removed}, 10.0, {"b": 5.0}, 0.05)
    assert weight is None and "no λ keeps every other domain within 1.05×" in why


@pytest.fixture(scope="module")
def both_modes(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    data = write_smoke_domains(root / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta", "gamma"],
                                                 "init_modes": ["independent", "shared"]})
    return root / "run", run_experiment(cfg, root / "run")


def test_a_run_compares_the_modes_with_factor_diagnostics_and_references(both_modes):
    run, r = both_modes
    assert r["schema"] == "lorasum.results/2" and r["init"] == {"modes": ["independent", "shared"],
                                                                "primary": "independent"}
    comp = r["init_comparison"]["pairs"]
    for pair in ("alpha|beta", "alpha|gamma", "beta|gamma"):
        assert comp[pair]["shared"]["factors"]["A"] > 0.95 > 0.5 > comp[pair]["independent"]["factors"]["A"]
        assert comp[pair]["independent"]["rms"] == r["pairs"][pair]["rms"]
        null = r["pairs"][pair]["null"]
        assert 0 < null["mean"] < r["references"]["alpha"]["split"] and null["samples"] == 200
    modes = {json.loads(p.read_text())["init"]["mode"] for p in run.glob("adapters/*/lorasum.json")}
    assert modes == {"independent", "shared"} and len(list(run.glob("adapters/*"))) == 20  # 2 × (7 + 3 ceilings)
    claims = {c["claim"]: c["verdict"] for c in r["claims"]}
    assert claims["RMS similarity predicts %Δ perplexity linearly"] == "cannot be decided here"
    assert r["fit"]["relation"] == {"n": 3, "decidable": False, "reason": "too few pairs (n = 3) to test the RMS → "
                                                                           "%Δ relation; at least 8 needed"}
    assert all(set(c) == {"claim", "verdict", "evidence", "rule"} for c in r["claims"]) and len(claims) == 5
    u = r["unlearning"][0]
    assert [s["weight"] for s in u["sweep"]] == [0.25, 0.5, 0.75, 1.0] and u["chosen"]["tolerance"] == 0.05
    assert u["sweep"][-1]["removed"] == u["removed_domain"]["after"]  # λ = 1 is the paper's subtraction
    md = (run / "report.md").read_text(encoding="utf-8")
    assert md.index("## Claims of the paper") < md.index("## Findings") < md.index("## LoRA initialisation")
    assert "| pair | RMS (independent) | A sim (independent) |" in md and "## Table 1 — sample LoRA layers" in md
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Speed — composing instead of training" in html and "Speed" not in md
    timings = json.loads((run / "timings.json").read_text())
    assert any(t.get("model", "").startswith("sum[") and t["apply_s"] > 0 for t in timings.values())


def test_schema_1_results_still_render(both_modes, tmp_path):
    run, r = both_modes
    old = json.loads((run / "results.json").read_text())
    for k in ("claims", "init", "init_comparison", "references", "table1"):
        old.pop(k)
    old["schema"] = "lorasum.results/1"
    old.pop("digest")  # schema-1 files predate the digest
    old["fit"].pop("relation")
    for p in old["pairs"].values():
        p.pop("null"), p.pop("factors")
    for u in old["unlearning"]:
        u.pop("sweep"), u.pop("chosen"), u.pop("validation_reference")
    (tmp_path / "results.json").write_text(json.dumps(old))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Claims of the paper" not in md and "## Table 3" in md and "every adapter of that run started" in md


def test_a_run_folder_from_before_init_modes_is_refused(tmp_path, run_cli):
    data = write_smoke_domains(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "tiny-gpt2", "domains": ["alpha", "beta"]}))
    before = listing(tmp_path)
    one_line_error(experiment(run_cli, data, run, "--overwrite", domains=("alpha", "beta")),
                   "made before LoRA initialisation became a recorded choice", "choose a new run folder")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("config, culprits", [
    ({"init_modes": []}, ["'init_modes' must be a non-empty list of distinct modes"]),
    ({"init_modes": ["shared", "shared"]}, ["'init_modes' must be a non-empty list"]),
    ({"init_modes": ["random"]}, ["'init_modes' names unknown mode 'random'; known: independent, shared"]),
    ({"train": {"init": "random"}}, ["'train.init' must be independent or shared, got 'random'"]),
    ({"unlearn_weights": [0.5, 0]}, ["'unlearn_weights' must be distinct weights in (0, 2]"]),
    ({"unlearn_weights": [2.5]}, ["'unlearn_weights' must be distinct weights in (0, 2], got [2.5]"]),
    ({"retention_tolerance": -0.1}, ["'retention_tolerance' must be >= 0, got -0.1"]),
])
def test_bad_init_and_unlearning_settings(config, culprits, tmp_path, run_cli):
    data = write_smoke_domains(tmp_path / "data")
    before = listing(tmp_path)
    one_line_error(experiment(run_cli, data, tmp_path / "run", config=config, domains=("alpha", "beta")),
                   *culprits)
    after = listing(tmp_path)
    after.pop("cfg.yaml")
    assert after == before


def test_train_init_flag_is_checked_first(tmp_path, run_cli):
    data = write_smoke_domains(tmp_path / "data")
    one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data", "alpha", "--data-dir", data, "--out",
                           tmp_path / "out", "--init", "bogus"), "--init must be independent or shared, got 'bogus'")
    assert not (tmp_path / "out").exists()


def test_evidence_preset_plans_15_pairs_with_own_domain_evals(tmp_path):
    from lorasum.study.experiment import plans

    data = tmp_path / "data"
    from conftest import write_jsonl

    cats = {"math": ["general", "physics"], "medicine": ["GHR", "GARD"],
            "finance": ["AAPL", "AXP"]}
    for parent, cs in cats.items():
        write_jsonl(data / f"{parent}.jsonl", [{"question": f"{parent} {c} q{i}?", "answer": f"a{i}", "category": c}
                                               for c in cs for i in range(700)])
    cfg = load_config(preset="evidence", overrides={"data_dir": str(data), "domains": [
        "math[category=general]", "math[category=physics]", "medicine[category=GHR]", "medicine[category=GARD]",
        "finance[category=AAPL]", "finance[category=AXP]"]})
    p = plans(cfg, tmp_path / "run")["independent"]
    assert cfg.seeds == [0, 1] and cfg.train.init == "independent" and cfg.eval_scope == "own"
    assert len([k for k in p.train if not k.sample]) == 2 * (6 + 15)
    assert len([k for k in p.train if k.sample == "second"]) == 12
    repairs = sorted({k.sample for k in p.train if k.sample and k.sample.startswith("repair@")})
    assert repairs == ["repair@0.1", "repair@0.25"] and cfg.repair_budgets == [0.1, 0.25]
    assert len([k for k in p.train if k.sample in repairs]) == 2 * 15 * 2  # each pair, each budget, per seed
    sums = [k for k in p.evals if k.model.startswith("sum[") and k.split == "test"]  # (validation: arrow's ranking)
    assert len(sums) == 2 * 15 * 2  # each summed model on its two domains only, per seed
    assert all(k.domain in k.model and k.split == "test" for k in sums)


CATEGORIES = {"math": ["general", "physics"], "medicine": ["GHR", "GARD"], "finance": ["AAPL", "AXP"]}


@pytest.mark.parametrize("rows, culprits", [
    (lambda c, i: {"question": f"q{c}{i}?", "answer": f"a{i}"},  # no category field
     ["math[category=general]", "filters on field 'category', which no record of", "fields present: answer, "
      "question"]),
    (lambda c, i: {"question": f"q{c}{i}?", "answer": f"a{i}", "category": c if c != "general" or i < 300 else "x"},
     ["sub-domain 'math[category=general]' has", "records", "needs at least 100 train, 50 test"]),
])
def test_evidence_preset_refuses_missing_or_small_sub_domains(rows, culprits, tmp_path, run_cli):
    from conftest import write_jsonl

    data = tmp_path / "data"
    for parent, cats in CATEGORIES.items():
        write_jsonl(data / f"{parent}.jsonl", [rows(c, i) for c in cats for i in range(700)])
    before = listing(tmp_path)
    one_line_error(run_cli("experiment", "--preset", "evidence", "--data-dir", data, "--out", tmp_path / "run"),
                   *culprits)
    assert listing(tmp_path) == before


def test_eval_scope_own_evaluates_each_model_on_its_domains_and_the_report_leaves_the_rest_blank(tmp_path):
    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta", "gamma"],
                                                 "eval_scope": "own"})
    r = run_experiment(cfg, tmp_path / "run")
    mat = r["perplexity"]
    assert set(mat["sum[alpha+beta]"]) == {"alpha", "beta"} and "pooled" not in mat["sum[alpha+beta]"]
    assert set(mat["base"]) == set(mat["adapter[alpha]"]) == set(mat["unlearn[alpha+beta+gamma-alpha]"]) == \
        {"alpha", "beta", "gamma", "pooled"}
    assert "alpha" in mat["adapter[beta+gamma]"]  # the block trained without alpha, judged on alpha
    md = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| sum[alpha+beta] |"))
    assert row.endswith("|  |  |")  # gamma and pooled left blank


def test_the_second_sample_reference_gets_an_init_of_its_own(both_modes):
    """The same-domain ceiling must not share A with the fundamental in independent mode (else it is inflated)."""
    run, r = both_modes
    metas = [json.loads(p.read_text()) for p in run.glob("adapters/*/lorasum.json")]
    for mode in ("independent", "shared"):
        fund = next(m for m in metas if m["partition"] == "alpha" and m["init"]["mode"] == mode
                    and m["data"]["skip"] == {})
        second = next(m for m in metas if m["partition"] == "alpha" and m["init"]["mode"] == mode
                      and m["data"]["skip"] == {"train": 24})
        same = fund["init"]["seed"] == second["init"]["seed"]
        assert same == (mode == "shared")
