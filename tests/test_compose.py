"""Composition: exact weighted sums as concatenated-rank LoRA, saved as stock PEFT folders; --max-rank SVD."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LOOSER, on_cpu64
from delta_fixtures import cos64, dense64, logits, make_adapter, moved, peft_merged_state

from lorasum.cli.main import main
from lorasum.delta.compose import compress, truncate_factors, weighted_sum
from lorasum.delta.similarity import cosine_matrices
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.apply import apply_adapters
from lorasum.lm.models import load_model

WEIGHTS = [1.0, 0.37, -0.61]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def trio(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    kinds = [dict(r=4, alpha=64), dict(r=2, alpha=5, use_rslora=True), dict(r=4, alpha=8)]
    return request.param, [make_adapter(root / f"a{i}", request.param, seed=20 + i, **kw)
                            for i, kw in enumerate(kinds)]


def _peft_load(model: str, folder):
    """Load a folder with stock PEFT; also return the key-level load result to check for missing/unexpected keys."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_model(model, device="cpu").model, str(folder))
    res = pm.load_adapter(str(folder), adapter_name="check")
    pm.set_adapter("default")
    return pm, res


def test_weighted_sum_vs_dense_float64(trio):
    model, folders = trio
    ads = [load_adapter(f) for f in folders]
    total = weighted_sum(list(zip(ads, WEIGHTS)))
    for m, f in total.layers.items():
        ref = sum(w * dense64(a, m) for a, w in zip(ads, WEIGHTS))
        got = dense64(total, m)
        assert f.rank == 10 and f.scale == 1.0
        assert float((got - ref).norm() / ref.norm()) <= 1e-6


def test_algebra_on_a_device_matches_float64_on_the_cpu(trio, device):
    """Factors held on `device`: the sum, its rank cap and the cosines stay there and match CPU float64 references."""
    model, folders = trio
    ads = [load_adapter(f) for f in folders]
    on = [moved(a, device) for a in ads]
    total = weighted_sum(list(zip(on, WEIGHTS)))
    small, _ = compress(total, 3)
    layers, cos = cosine_matrices(on)
    loose = LOOSER[device]
    for li, m in enumerate(layers):
        f = total.layers[m]
        assert f.A.device.type == f.B.device.type == small.layers[m].B.device.type == torch.device(device).type
        ref = sum(w * dense64(a, m) for a, w in zip(ads, WEIGHTS))
        got = on_cpu64(f.scale * (f.B @ f.A))
        # float32 products of rank 10: each entry ~10 eps32 of the factors' scale; 1e-6 of the norm leaves > 10x
        assert float((got - ref).norm() / ref.norm()) <= 1e-6 * loose
        u, s, vh = torch.linalg.svd(ref, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        g = small.layers[m]
        assert float((on_cpu64(g.scale * (g.B @ g.A)) - best).norm()) <= 1e-5 * loose * float(ref.norm())
        for i in range(3):
            for j in range(3):  # cosines in [-1, 1] from float32 Gram products: ~1e-7 off float64
                want = cos64(dense64(ads[i], m), dense64(ads[j], m))
                assert float(cos[li, i, j]) == pytest.approx(want, abs=1e-6 * loose)


def test_cli_compose_reloads_in_peft_with_equal_logits(trio, tmp_path, capsys):
    model, folders = trio
    out = tmp_path / "sum"
    args = [str(folders[0]), f"{folders[1]}:{WEIGHTS[1]}", f"{folders[2]}:{WEIGHTS[2]}"]
    assert main(["compose", *args, "--out", str(out)]) == 0
    assert "rank 10" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "lorasum.json"]
    pm, res = _peft_load(model, out)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    # reference 1: the base model with the summed deltas added by apply_adapters
    summed = load_model(model, device="cpu").model
    apply_adapters(summed, [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)])
    assert torch.allclose(logits(pm), logits(summed), atol=1e-5, rtol=0)
    # reference 2: stock PEFT cat + merge_and_unload on the original adapters
    ref = peft_merged_state(model, folders, WEIGHTS)
    merged = pm.merge_and_unload().state_dict()
    assert max(float((merged[k] - ref[k]).abs().max()) for k in ref) <= 1e-5
    meta = json.loads((out / "lorasum.json").read_text())["composition"]
    assert [a["weight"] for a in meta["adapters"]] == WEIGHTS


def test_subtraction_is_zero(trio, tmp_path):
    model, folders = trio
    a = load_adapter(folders[0])
    diff = weighted_sum([(a, 1.0), (a, -1.0)])
    for m in a.layers:
        assert float(dense64(diff, m).norm()) <= 1e-6 * float(dense64(a, m).norm())
    assert main(["compose", str(folders[0]), f"{folders[0]}:-1", "--out", str(tmp_path / "z")]) == 0
    pm, _ = _peft_load(model, tmp_path / "z")
    base = load_model(model, device="cpu").model
    assert torch.allclose(logits(pm), logits(base), atol=1e-5, rtol=0)


def test_mixed_ranks_saved_with_rank_pattern(tmp_path):
    """Layers of different summed rank are saved with rank/alpha patterns that stock PEFT reads back."""
    a = make_adapter(tmp_path / "a", seed=1, r=4, alpha=7, rank_pattern={"mlp.c_proj": 2}, alpha_pattern={"c_attn": 3})
    b = make_adapter(tmp_path / "b", seed=2)
    out = tmp_path / "ab"
    assert main(["compose", str(a), f"{b}:0.5", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["rank_pattern"].values()) == {6}
    pm, res = _peft_load("tiny-gpt2", out)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    summed = load_model("tiny-gpt2", device="cpu").model
    apply_adapters(summed, [(load_adapter(a), 1.0), (load_adapter(b), 0.5)])
    assert torch.allclose(logits(pm), logits(summed), atol=1e-5, rtol=0)
    back = load_adapter(out)  # our own loader reads the patterns back with scale 1
    assert {f.rank for n, f in back.layers.items() if "mlp" in n} == {6}
    assert {f.scale for f in back.layers.values()} == {1.0}


# --- --max-rank ------------------------------------------------------------------------------------------------
def test_truncation_vs_dense_svd(trio):
    """Factored truncated SVD = dense Eckart–Young best rank-k approximation; errors from the dense singular values."""
    model, folders = trio
    total = weighted_sum([(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)])
    k = 3
    small, report = compress(total, k)
    tot_err2 = tot_norm2 = 0.0
    for m, f in total.layers.items():
        dense = dense64(total, m)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert small.layers[m].rank == k
        assert float((dense64(small, m) - best).norm()) <= 1e-5 * float(dense.norm())
        want = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        assert report["layers"][m] == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert report["layers"][m] > 0.01
        tot_err2 += float(s[k:].square().sum())
        tot_norm2 += float(s.square().sum())
    assert report["overall"] == pytest.approx((tot_err2 / tot_norm2) ** 0.5, rel=1e-5)


def test_max_rank_at_or_above_summed_rank_is_exact(trio, tmp_path, capsys):
    model, folders = trio
    ads = [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)]
    total = weighted_sum(ads)
    same, report = compress(total, 10)
    assert report["overall"] == 0.0 and all(v == 0.0 for v in report["layers"].values())
    assert all(same.layers[m] is f for m, f in total.layers.items())
    # numerically rank-deficient input: a rank-4 adapter concatenated with itself has summed rank 8, true rank 4
    double = weighted_sum([ads[0], ads[0]])
    f4, err2, norm2 = truncate_factors(next(iter(double.layers.values())), 4)
    assert err2 <= 1e-12 * norm2
    out = tmp_path / "k3"
    assert main(["compose", *[f"{f}:{w}" for f, w in zip(folders, WEIGHTS)], "--max-rank", "3", "--json",
                 "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rank"] == 3 and 0 < rep["relative_error"] < 1 and set(rep["layer_errors"]) == set(total.layers)
    pm, res = _peft_load(model, out)
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3


# --- bad input through the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, word", [
    (["--max-rank", "0"], "--max-rank"), (["--max-rank", "-2"], "--max-rank"), (["--max-rank", "x"], "--max-rank"),
    (["WEIGHT:x"], "is not a finite number"), (["WEIGHT:nan"], "is not a finite number"),
    (["WEIGHT:inf"], "is not a finite number"),
])
def test_cli_bad_input_leaves_nothing(trio, tmp_path, capsys, extra, word):
    model, folders = trio
    extra = [e.replace("WEIGHT", str(folders[1])) for e in extra]
    out = tmp_path / "never"
    assert main(["compose", str(folders[0]), *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_out_not_empty(trio, tmp_path, capsys):
    model, folders = trio
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compose", str(folders[0]), str(folders[1]), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_base_identity_carries_over(tmp_path, capsys):
    rec = {"base_model": {"id": "tiny-gpt2", "weights_sha256": "ab" * 32}, "training": {"steps": 10}}
    folders = [make_adapter(tmp_path / n, seed=i, base="tiny-gpt2") for i, n in enumerate(["x", "y"])]
    for f in folders:
        (f / "lorasum.json").write_text(json.dumps(rec))
    out = tmp_path / "xy"
    assert main(["compose", str(folders[0]), f"{folders[1]}:-1", "--out", str(out)]) == 0
    meta = json.loads((out / "lorasum.json").read_text())
    assert meta["base_model"] == rec["base_model"] and "training" not in meta
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-gpt2"
    back = load_adapter(out)
    assert back.base_id == "tiny-gpt2" and back.base_sha256 == "ab" * 32
