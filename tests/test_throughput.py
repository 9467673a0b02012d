"""Serving cost (lm.throughput): every variant scores the same examples, the prompt router reads prompts with the
base model and scores each example once (top-1) or once per adapter (soft), Arrow is PEFT's router, the model is left
as it was, and the experiment puts the figures in timings.json and the report's speed section."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_smoke_domains
from lorasum.delta.peft_format import load_adapter
from lorasum.lm import throughput
from lorasum.lm.data import load_domain, tokenize_records
from lorasum.lm.models import load_model, weights_fingerprint
from lorasum.lm.prompt_routing import prompt_features
from lorasum.study.config import load_config
from lorasum.study.experiment import run_experiment


@pytest.fixture(scope="module")
def setting(tiny_adapters):
    t = tiny_adapters
    lm = load_model("tiny-llama", device="cpu")
    terms = [(load_adapter(t["tiny-llama"][d]), 1.0) for d in ("colors", "shapes")]
    examples = {d: tokenize_records(lm.tokenizer, load_domain(d, t["data"]).records["test"], 32)
                for d in ("colors", "shapes")}
    centroids = np.stack([prompt_features(lm, tokenize_records(lm.tokenizer, load_domain(d, t["data"]).records["train"],
                                                               32)).mean(0) for d in ("colors", "shapes")])
    return lm, terms, examples, centroids


def test_each_variant_scores_what_it_serves_and_the_model_is_left_as_it_was(setting, monkeypatch):
    lm, terms, examples, centroids = setting
    before = weights_fingerprint(lm.model)
    scored: list[tuple[str, int, bool]] = []  # (variant, examples scored, whether the model is PEFT's router)
    real = throughput.per_example_nll
    current = {}

    def spy(model, exs, *args, **kwargs):
        scored.append((current["v"], sum(len(v) for v in exs.values()), hasattr(model, "peft_config")))
        return real(model, exs, *args, **kwargs)

    monkeypatch.setattr(throughput, "per_example_nll", spy)
    for name, fn in list(throughput.VARIANTS.items()):
        monkeypatch.setitem(throughput.VARIANTS, name,
                            lambda *a, _n=name, _f=fn: (current.__setitem__("v", _n), _f(*a))[1])
    res = throughput.serving_throughput(lm, terms, examples, centroids, {"top_k": 1, "router_temperature": 1.0},
                                        rounds=2, batch_size=4)
    n = sum(len(v) for v in examples.values())
    assert res["tokens"] == sum(len(e.input_ids) for v in examples.values() for e in v)
    assert list(res["variants"]) == ["base", "merged", "arrow", "prompt_top1", "prompt_soft"]
    per_round = {}
    for v, count, routed in scored:
        per_round[v] = per_round.get(v, 0) + count
        assert routed == (v == "arrow")
    assert per_round["base"] == per_round["merged"] == per_round["arrow"] == per_round["prompt_top1"] == 2 * n
    assert per_round["prompt_soft"] == 2 * 2 * n  # every adapter scores every example
    base = res["variants"]["base"]
    assert base["x_base"] == 1.0 and len(base["seconds"]) == 2
    for v in res["variants"].values():
        assert v["tokens_per_s"] == pytest.approx(res["tokens"] / float(np.median(v["seconds"])))
    assert res["variants"]["arrow"]["setup_s"] > 0
    assert weights_fingerprint(lm.model) == before


def test_without_routes_only_base_and_merged_are_timed(setting):
    lm, terms, examples, _ = setting
    res = throughput.serving_throughput(lm, terms, examples, rounds=1, batch_size=4)
    assert list(res["variants"]) == ["base", "merged"]


def test_the_experiment_reports_the_serving_cost(tmp_path):
    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": ["sum", "arrow"]})
    run_experiment(cfg, tmp_path / "run")
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    entry = [t for t in timings.values() if t["kind"] == "throughput"]
    assert len(entry) == 1 and entry[0]["subset"] == ["alpha", "beta"]
    assert set(entry[0]["throughput"]["variants"]) == {"base", "merged", "arrow"}
    html = (tmp_path / "run" / "report.html").read_text()
    assert "eval tokens/s" in html and "routed per token by PEFT" in html
    assert html.index("the base model alone") < html.index("adapters merged into the weights") \
        < html.index("routed per token by PEFT")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "throughput" not in json.dumps(results.get("findings", []))  # wall times stay out of results.json

