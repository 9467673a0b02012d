"""`lorasum search-weights`: TPE over adapter weights on validation perplexity, checked against independent
evaluations (lm.evaluate on the validation split), resumed without repeating trials, never reading the test split."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import one_line_error

from lorasum.delta.methods import merge
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.combination import combine, layer_group
from lorasum.lm.data import DataConfig
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model
from lorasum.tune import weights as W

MODEL = "tiny-gpt2"


@pytest.fixture(scope="module")
def lm():
    return load_model(MODEL, device="cpu")


def _setup(tiny_adapters, tiny_data):
    data = DataConfig(str(tiny_data), max_records={"validation": 8, "test": 8})
    adapters = [load_adapter(tiny_adapters[MODEL][d]) for d in ("colors", "shapes")]
    return data, adapters


def _val_ppl(lm, terms, data) -> float:
    return evaluate(lm, ["colors", "shapes"], terms, data, split="validation")["results"]["pooled"]["perplexity"]


def test_best_weights_beat_all_ones_on_an_independent_validation_eval(lm, tiny_adapters, tiny_data, tmp_path):
    data, adapters = _setup(tiny_adapters, tiny_data)
    search = W.check_search(adapters, "sum", {}, 6)
    best = W.run_search(lm, search, ["colors", "shapes"], data, tmp_path / "s")
    w = [best["weights"]["w0"], best["weights"]["w1"]]
    ones = _val_ppl(lm, [(a, 1.0) for a in adapters], data)
    at_best = _val_ppl(lm, list(zip(adapters, w)), data)
    assert math.isclose(best["value"], at_best, rel_tol=1e-5)
    assert at_best <= ones * (1 + 1e-9)
    # the composed adapter is the exact weighted sum: evaluating it alone gives the same perplexity
    saved = tmp_path / "s" / "adapter"
    assert math.isclose(_val_ppl(lm, [(saved, 1.0)], data), at_best, rel_tol=1e-5)
    meta = json.loads((saved / "lorasum.json").read_text())
    assert meta["search"]["trial"] == best["trial"] and meta["composition"]["method"] == "sum"
    on_disk = json.loads((tmp_path / "s" / "best.json").read_text())
    assert on_disk["weights"] == best["weights"] and on_disk["value"] == best["value"]


def test_resume_adds_only_the_missing_trials(lm, tiny_adapters, tiny_data, tmp_path, monkeypatch):
    data, adapters = _setup(tiny_adapters, tiny_data)
    calls = []
    real = W.pooled_ppl
    monkeypatch.setattr(W, "pooled_ppl", lambda *a, **k: calls.append(1) or real(*a, **k))
    W.run_search(lm, W.check_search(adapters, "sum", {}, 3), ["colors", "shapes"], data, tmp_path / "s")
    assert len(calls) == 3
    best = W.run_search(lm, W.check_search(adapters, "sum", {}, 5), ["colors", "shapes"], data, tmp_path / "s")
    assert len(calls) == 5 and best["trials"] == 5
    W.run_search(lm, W.check_search(adapters, "sum", {}, 5), ["colors", "shapes"], data, tmp_path / "s")
    assert len(calls) == 5
    with pytest.raises(Exception, match="different setup"):  # another method on the same study is refused
        W.run_search(lm, W.check_search(adapters, "ties", {}, 6), ["colors", "shapes"], data, tmp_path / "s")


class _NoTest(dict):
    def __getitem__(self, split):
        if split == "test":
            raise AssertionError("the test split was read")
        return super().__getitem__(split)


def test_the_test_split_is_never_read(lm, tiny_adapters, tiny_data, tmp_path, monkeypatch):
    data, adapters = _setup(tiny_adapters, tiny_data)
    real = W.load_domain

    def guarded(spec, config=None):
        dom = real(spec, config)
        dom.records = _NoTest(dom.records)
        return dom

    monkeypatch.setattr(W, "load_domain", guarded)
    best = W.run_search(lm, W.check_search(adapters, "ties", {"density": 0.5}, 2, per_module=True),
                        ["colors", "shapes"], data, tmp_path / "s")
    assert set(best["weights"]) == {"w0.attn", "w0.mlp", "w1.attn", "w1.mlp"}


def test_per_module_weights_merge_each_group_at_its_own_weights(tiny_adapters, tiny_data):
    _, adapters = _setup(tiny_adapters, tiny_data)
    w = {"w0.attn": 0.3, "w1.attn": 1.7, "w0.mlp": 1.1, "w1.mlp": 0.4}
    got = combine(adapters, w, "ties", {"density": 0.5})
    attn = merge([(adapters[0], 0.3), (adapters[1], 1.7)], "ties", {"density": 0.5})
    mlp = merge([(adapters[0], 1.1), (adapters[1], 0.4)], "ties", {"density": 0.5})
    groups = {layer_group(n) for n in got.layers}
    assert groups == {"attn", "mlp"}
    for n, layer in got.layers.items():
        ref = (attn if layer_group(n) == "attn" else mlp).layers[n]
        assert torch.equal(layer.delta, ref.delta), n


@pytest.mark.parametrize("extra, message", [
    (["--trials", "0"], "trials"),
    (["--method", "tiez"], "did you mean 'ties'"),
    (["--method", "peft_linear"], "not a merge method"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(run_cli, tiny_adapters, tiny_data, tmp_path, extra, message):
    out = tmp_path / "out"
    args = ["search-weights", tiny_adapters[MODEL]["colors"], tiny_adapters[MODEL]["shapes"], "--model", MODEL,
            "--data-dir", tiny_data, "--data", "colors", "--trials", "2", "--out", out, *extra]
    one_line_error(run_cli(*args), message, absent=out)


def test_one_adapter_is_refused(run_cli, tiny_adapters, tiny_data, tmp_path):
    out = tmp_path / "out"
    one_line_error(run_cli("search-weights", tiny_adapters[MODEL]["colors"], "--model", MODEL, "--data-dir",
                           tiny_data, "--data", "colors", "--trials", "2", "--out", out), "at least 2 adapters",
                   absent=out)


def test_cli_writes_best_json_and_the_adapter(run_cli, tiny_adapters, tiny_data, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err, _ = run_cli("search-weights", tiny_adapters[MODEL]["colors"], tiny_adapters[MODEL]["shapes"],
                                 "--model", MODEL, "--data-dir", tiny_data, "--data", "colors", "--data", "shapes",
                                 "--max-validation", "8", "--trials", "2", "--out", out)
    assert rc == 0, err
    best = json.loads((out / "best.json").read_text())
    assert best["trials"] == 2 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "best trial" in stdout
