"""A dense merge method is applied one layer at a time: its merged ΔW for a layer is computed, added and dropped
before the next layer's is made, so at most one layer's dense delta is alive; the results are those of the eager
merge, bit for bit, and `applied` restores the weights exactly."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import color_rows, write_jsonl
from delta_fixtures import make_adapter

from lorasum.delta import methods
from lorasum.delta.apply import applied, apply_adapters, snapshot_weights
from lorasum.delta.compose import DenseDelta, to_factors
from lorasum.delta.methods import MergedLayers, merge
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.combination import method_terms
from lorasum.lm.data import DataConfig
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model

PARAMS = {"density": 0.3}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("layerwise")
    return [load_adapter(make_adapter(root / f"a{i}", "tiny-llama", seed=50 + i)) for i in range(2)]


@pytest.fixture
def dense_alive(monkeypatch) -> dict:
    """Counts the DenseDelta layers the merge makes and how many are alive at once (by weak reference)."""
    seen = {"made": 0, "alive": 0, "peak": 0}
    real = methods.merge_layer

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        if isinstance(out, DenseDelta):
            seen["made"] += 1
            seen["alive"] += 1
            seen["peak"] = max(seen["peak"], seen["alive"])
            weakref.finalize(out, lambda: seen.__setitem__("alive", seen["alive"] - 1))
        return out

    monkeypatch.setattr(methods, "merge_layer", counted)
    return seen


def test_a_ties_eval_holds_one_dense_layer_delta_at_a_time(pair, dense_alive, tmp_path):
    data = DataConfig(data_dir=str(write_jsonl(tmp_path / "colors.jsonl", color_rows(30)).parent))
    lm = load_model("tiny-llama", device="cpu")
    terms = method_terms(pair, [1.0, 0.6], "ties", PARAMS)
    assert isinstance(terms[0][0].layers, MergedLayers) and dense_alive["made"] == 0  # nothing merged yet
    got = evaluate(lm, ["colors"], adapters=terms, data=data)
    layers = len(terms[0][0].layers)
    assert layers > 1 and dense_alive["made"] == layers and dense_alive["peak"] == 1
    eager = merge(list(zip(pair, [1.0, 0.6])), "ties", PARAMS)
    assert dense_alive["peak"] == layers  # the counter sees the eager merge hold every layer at once
    want = evaluate(lm, ["colors"], adapters=[(eager, 1.0)], data=data)
    assert got["results"] == want["results"]


def test_layerwise_apply_equals_the_eager_merge_bit_for_bit_and_is_restored_exactly(pair):
    lm, ref = load_model("tiny-llama", device="cpu"), load_model("tiny-llama", device="cpu")
    (lazy, w), = method_terms(pair, {"w0.attn": 0.3, "w1.attn": 1.7, "w0.mlp": 1.1, "w1.mlp": 0.4}, "ties", PARAMS)
    names = sorted(lazy.layers)
    before = snapshot_weights(lm.model, names)
    with applied(lm.model, [(lazy, w)]):
        inside = snapshot_weights(lm.model, names)
    for n, t in snapshot_weights(lm.model, names).items():
        assert torch.equal(t, before[n]), n
    eager = {n: f for n, f in lazy.layers.items()}  # one merge per layer, kept: the old route
    apply_adapters(ref.model, [(type(lazy)(lazy.name, "", lazy.config, eager, lazy.base_record()), 1.0)])
    for n, t in snapshot_weights(ref.model, names).items():
        assert torch.equal(t, inside[n]), n


def test_refactoring_a_lazy_merge_equals_the_eager_one(pair):
    (lazy, _), = method_terms(pair, [1.0, -0.5], "magnitude_prune", PARAMS)
    got, got_err = to_factors(lazy, 3)
    want, want_err = to_factors(merge(list(zip(pair, [1.0, -0.5])), "magnitude_prune", PARAMS), 3)
    assert got_err == want_err
    for n, f in want.layers.items():
        assert torch.equal(f.A, got.layers[n].A) and torch.equal(f.B, got.layers[n].B), n


def test_an_error_at_a_later_layer_is_restored_exactly_by_applied(pair, monkeypatch):
    lm = load_model("tiny-llama", device="cpu")
    (lazy, w), = method_terms(pair, [1.0, 0.6], "ties", PARAMS)
    names = list(lazy.layers)
    before = snapshot_weights(lm.model, names)
    real, asked = MergedLayers.__getitem__, []

    def failing(self, layer):
        asked.append(layer)
        if len(asked) == 3:
            raise RuntimeError("merge failed")
        return real(self, layer)

    monkeypatch.setattr(MergedLayers, "__getitem__", failing)
    with pytest.raises(RuntimeError, match="merge failed"), applied(lm.model, [(lazy, w)]):
        pass
    assert asked == names[:3]  # two layers were added before the third failed
    for n, t in snapshot_weights(lm.model, names).items():
        assert torch.equal(t, before[n]), n
