"""Crafted and inconsistent adapters: untrusted rank/alpha patterns never run unbounded, the config must describe
its tensors (target_modules, ranks, floating-point factors), and weights so large that a delta would overflow are
refused by name (or, for cosines, give the exact scale-invariant answer)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import one_line_error
from delta_fixtures import FAN_IN_FAN_OUT, make_adapter, set_config
from safetensors.torch import load_file, save_file

from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError
from lorasum.lm.models import load_model

# A key that backtracks exponentially against a name like `transformer.h.0.attn.c_attn` (seconds per layer under
# `re` and the `regex` module alike, growing ~1.8x per character of the name).
BACKTRACKING = r"(?:[\w.]|[\w.]{2}|[\w.]{3})*[^\w.]"


def peft_deltas(model: str, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own (out, in) delta per LoRA layer: get_delta_weight of the loaded module (transposed back for
    fan_in_fan_out), keyed by the base model's layer path."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(model, device="cpu").model, str(folder))
    out = {}
    for name, module in pm.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            d = module.get_delta_weight("default").detach().double()
            out[name.removeprefix("base_model.model.")] = d.T if FAN_IN_FAN_OUT[model] else d
    return out


def dense(folder: Path) -> dict[str, torch.Tensor]:
    a = load_adapter(folder)
    return {n: f.scale * (f.B.double() @ f.A.double()) for n, f in a.layers.items()}


# --- rank/alpha patterns --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, kwargs", [
    ("tiny-gpt2", {"rank_pattern": {"mlp.c_proj": 2, r"h\.1\.attn\.c_attn": 3},
                   "alpha_pattern": {"c_attn": 3, "h.0.mlp.c_proj": 5, r"h\.[01]\.attn\.c_proj": 7}}),
    ("tiny-llama", {"rank_pattern": {r"layers\.0\.self_attn\.(q|k)_proj": 2, "down_proj": 3},
                    "alpha_pattern": {r".*\.1\.self_attn\.[qv]_proj": 11, "o_proj": 6}}),
])
def test_peft_patterns_give_peft_deltas(tmp_path, model, kwargs):
    """Adapters PEFT saves with rank/alpha patterns (literal, dotted-suffix and real regular expressions) load with
    exactly PEFT's deltas, the ranks read from the tensors."""
    folder = make_adapter(tmp_path / "a", model=model, r=4, alpha=8, **kwargs)
    ours, theirs = dense(folder), peft_deltas(model, folder)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-9)
    ranks = {n: f.rank for n, f in load_adapter(folder).layers.items()}
    assert sorted(set(ranks.values())) == [2, 3, 4]


def test_backtracking_pattern_is_refused_quickly(tmp_path):
    folder = make_adapter(tmp_path / "a", r=4, alpha=8)
    set_config(folder, alpha_pattern={BACKTRACKING: 2})
    start = time.monotonic()
    with pytest.raises(LorasumError, match="takes too long") as e:
        load_adapter(folder)
    assert time.monotonic() - start < 3.0  # the 0.5 s budget, with room for a loaded machine; minutes without it
    assert "alpha_pattern" in str(e.value) and repr(BACKTRACKING) in str(e.value)


def test_backtracking_rank_pattern_is_never_run(tmp_path, run_cli):
    """Ranks come from the tensor shapes: a crafted rank_pattern key is never matched at all."""
    a, b = make_adapter(tmp_path / "a", r=4, alpha=8), make_adapter(tmp_path / "b", seed=1, r=4, alpha=8)
    set_config(a, rank_pattern={BACKTRACKING: 4})
    start = time.monotonic()
    rc, out, err, _ = run_cli("similarity", a, b, "--json")
    assert rc == 0, err
    assert time.monotonic() - start < 5.0  # loading two adapters; matching the key would take minutes


def test_backtracking_target_modules_string_is_refused(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, target_modules=BACKTRACKING)
    one_line_error(run_cli("similarity", a, b), "target_modules", "takes too long")


def test_escaped_literal_keys_from_save_adapter(tmp_path):
    """save_adapter writes re.escape'd layer names: they match only that layer (a '.' is not any character)."""
    folder = make_adapter(tmp_path / "a", r=4, alpha=8)
    set_config(folder, alpha_pattern={r"transformer\.h\.0\.attn\.c_attn": 2, r"h\.1\.mlp\.c_proj": 12})
    a = load_adapter(folder)
    assert a.layers["transformer.h.0.attn.c_attn"].scale == 2 / 4
    assert a.layers["transformer.h.1.mlp.c_proj"].scale == 12 / 4
    assert a.layers["transformer.h.1.attn.c_attn"].scale == 8 / 4


@pytest.mark.parametrize("field, key, value", [
    ("alpha_pattern", "c_attn", -1), ("alpha_pattern", "c_attn", 0), ("alpha_pattern", "c_attn", "8"),
    ("alpha_pattern", "c_attn", 10**400), ("rank_pattern", "c_attn", 2.5), ("rank_pattern", "c_attn", None),
    ("alpha_pattern", "c_attn", True),
])
def test_pattern_value_must_be_a_positive_number(tmp_path, run_cli, field, key, value):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, **{field: {key: value}})
    one_line_error(run_cli("similarity", a, b), field, repr(key), "adapter_config.json")


def test_invalid_regular_expression_key(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, alpha_pattern={"c_(attn": 2})
    one_line_error(run_cli("similarity", a, b), "alpha_pattern", "c_(attn", "not a valid regular expression")


def test_rank_comes_from_the_tensors(tmp_path):
    """A rank_pattern that misstates a rank is not used for the scale: alpha / (the tensors' rank), as PEFT scales
    the module it builds from those tensors."""
    folder = make_adapter(tmp_path / "a", r=4, alpha=8)
    set_config(folder, rank_pattern={"c_attn": 7})
    assert all(f.rank == 4 and f.scale == 2.0 for f in load_adapter(folder).layers.values())


def test_lora_a_and_b_ranks_disagree(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    w = a / "adapter_model.safetensors"
    t = load_file(w)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key][:, :3].contiguous()
    save_file(t, w)
    one_line_error(run_cli("similarity", a, b), key.removesuffix(".lora_B.weight").removeprefix("base_model.model."),
                   "ranks disagree")


# --- target_modules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets, layer", [
    (["c_attn"], "transformer.h.0.attn.c_proj"),
    (["q_proj", "v_proj"], "transformer.h.0.attn.c_attn"),
    (r".*\.attn\.c_attn", "transformer.h.0.attn.c_proj"),
    ("c_attn", "transformer.h.0.attn.c_attn"),  # a string is matched in full, as PEFT does
])
def test_target_modules_must_cover_every_layer(tmp_path, run_cli, targets, layer):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, target_modules=targets)
    one_line_error(run_cli("similarity", a, b), "target_modules", f"'{layer}'", a / "adapter_config.json")


@pytest.mark.parametrize("targets", [r".*\.(c_attn|c_proj)", ["h.0.attn.c_attn", "c_proj", "transformer.h.1.attn.c_attn"],
                                     "all-linear", None])
def test_target_modules_that_cover_load(tmp_path, targets):
    folder = make_adapter(tmp_path / "a")
    set_config(folder, target_modules=targets)
    assert len(load_adapter(folder).layers) == 6


def test_target_modules_of_wrong_type(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, target_modules={"c_attn": 1})
    one_line_error(run_cli("similarity", a, b), "target_modules", "must be a list")


# --- tensors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_factors_are_refused(tmp_path, run_cli, dtype):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    w = a / "adapter_model.safetensors"
    t = load_file(w)
    key = sorted(t)[0]
    t[key] = (t[key] * 100).to(dtype)
    save_file(t, w)
    one_line_error(run_cli("similarity", a, b), key, str(dtype).removeprefix("torch."), "floating point")
    out = tmp_path / "sum"
    one_line_error(run_cli("compose", a, b, "--out", out), key)
    assert not out.exists()


# --- huge weights -------------------------------------------------------------------------------------------------
def similarity_json(run_cli, *terms) -> dict:
    rc, out, err, _ = run_cli("similarity", *terms, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.mark.parametrize("weight", ["1e300", "1e308", "1e-300", "3"])
def test_similarity_is_scale_invariant(tmp_path, run_cli, weight):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    ref = similarity_json(run_cli, a, b)["pairs"][0]
    got = similarity_json(run_cli, f"{a}:{weight}", b)["pairs"][0]
    assert got["rms"] == pytest.approx(ref["rms"], rel=1e-12) and ref["rms"] > 0
    assert got["layers"] == pytest.approx(ref["layers"], rel=1e-12)
    neg = similarity_json(run_cli, f"{a}:-{weight}", b)["pairs"][0]
    assert neg["layers"] == pytest.approx({k: -v for k, v in ref["layers"].items()}, rel=1e-12)


def test_compose_refuses_an_overflowing_weight(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    out = tmp_path / "sum"
    one_line_error(run_cli("compose", f"{a}:1e300", b, "--out", out), "1e+300", "'a'", "float32")
    assert not out.exists() and list(tmp_path.glob(".sum*")) == []
    one_line_error(run_cli("compose", f"{a}:1e300", "--out", out), "1e+300")
    assert not out.exists()
    rc, _, err, _ = run_cli("compose", f"{a}:1e30", b, "--out", out)  # large but representable: exact and written
    assert rc == 0, err
    assert all(torch.isfinite(t).all() for t in load_file(out / "adapter_model.safetensors").values())


@pytest.mark.parametrize("weight", ["1e30", "1e300"])
def test_eval_refuses_a_delta_that_overflows(tmp_path, run_cli, ddir, weight):
    a = make_adapter(tmp_path / "a")
    pe = tmp_path / "pe.jsonl"
    for extra in ([], ["--json"]):
        err = one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                     "--adapter", f"{a}:{weight}", "--per-example", pe, *extra), f"{float(weight):g}")
        assert "'a'" in err or "*a" in err
        assert not pe.exists()


def test_merge_refuses_a_delta_that_overflows(tmp_path, run_cli):
    a = make_adapter(tmp_path / "a")
    out = tmp_path / "merged"
    one_line_error(run_cli("merge", "--model", "tiny-gpt2", "--adapter", f"{a}:1e300", "--out", out),
                   "adapter 'a' at weight 1e+300", "Inf or NaN")
    assert not out.exists()


def test_overflow_check_leaves_the_model_unchanged(tmp_path):
    from lorasum.delta.apply import apply_adapters
    from lorasum.delta.peft_format import load_terms

    lm = load_model("tiny-gpt2", device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    a = make_adapter(tmp_path / "a")
    with pytest.raises(LorasumError, match="Inf or NaN"):
        apply_adapters(lm.model, load_terms([(a, 1e300)]))
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())


# --- which layers PEFT adapts: the same rule as stock PEFT ----------------------------------------------------------
LAYER_NAMES = ["transformer.h.0.attn.c_attn", "transformer.h.3.attn.c_proj", "transformer.h.12.mlp.c_proj",
               "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj",
               "model.layers.1.experts.0.w1", "h.2.attn.c_attn", "blocks.4.attn.qkv", "encoder.layer.2.attention.q",
               "model.layers.x.q_proj", "layers.7.q_proj"]
TARGET_CONFIGS = [
    {"target_modules": ["c_attn", "q_proj"]},
    {"target_modules": r".*\.(c_attn|q_proj|qkv)"},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "down_proj", "w1", "qkv", "q"],
     "exclude_modules": ["h.3.attn.c_proj", "down_proj"]},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "w1"], "exclude_modules": r".*\.1\..*"},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "down_proj", "w1", "qkv", "q"], "layers_to_transform": [0, 1, 4]},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "down_proj", "w1"], "layers_to_transform": 12},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "w1", "qkv", "q"], "layers_to_transform": [0, 1, 2, 4, 7],
     "layers_pattern": "layers"},
    {"target_modules": ["c_attn", "c_proj", "q_proj", "w1", "qkv"], "layers_to_transform": [2, 3, 4],
     "layers_pattern": ["blocks", "h"]},
    {"target_modules": ["c_attn", "q_proj", "q"], "layers_to_transform": [1, 2], "layers_pattern": "lay.rs?"},
    {"target_modules": ["c_attn", "q_proj"], "layers_to_transform": [], "layers_pattern": "h"},
    {"target_modules": ["model.layers.1.self_attn.q_proj", "c_attn"], "layers_to_transform": [2]},  # a full name
    {"target_modules": ["c_attn", "q_proj", "qkv"], "layers_to_transform": [0, 1, 4], "layers_pattern": "h|layers"},
    {"target_modules": ["c_attn", "qkv", "q_proj"], "layers_to_transform": [0, 2, 4], "layers_pattern": "(h|blocks)"},
]


@pytest.mark.parametrize("config", TARGET_CONFIGS, ids=range(len(TARGET_CONFIGS)))
def test_which_layers_are_adapted_follows_stock_peft(config):
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists

    from lorasum.delta.peft_format import _Matcher, _not_adapted_by

    peft_config = SimpleNamespace(**{"exclude_modules": None, "modules_to_save": None, "target_parameters": None,
                                     "layers_to_transform": None, "layers_pattern": None, **config})
    for layer in LAYER_NAMES:
        found = check_target_module_exists(peft_config, layer)
        want = bool(found) and type(found).__name__ != "_ExcludedModule"
        assert (_not_adapted_by(config, layer, _Matcher("cfg")) is None) == want, layer


def test_a_layer_the_config_excludes_or_leaves_out_is_refused_naming_the_field(tmp_path, run_cli):
    a, b = make_adapter(tmp_path / "a"), make_adapter(tmp_path / "b", seed=1)
    set_config(a, exclude_modules=["h.1.attn.c_attn"])
    one_line_error(run_cli("similarity", a, b), "'exclude_modules'", "'transformer.h.1.attn.c_attn'")
    set_config(a, exclude_modules=None, layers_to_transform=[0], layers_pattern="h")
    one_line_error(run_cli("similarity", a, b), "'layers_to_transform'", "'transformer.h.1.attn.c_attn'")
    set_config(a, layers_to_transform=[0, 1])
    assert len(load_adapter(a).layers) == 6
    set_config(a, layers_to_transform=["0"])
    one_line_error(run_cli("similarity", a, b), "'layers_to_transform' must be a layer index")
