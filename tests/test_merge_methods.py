"""Merge methods: each equals its reference operation on independently computed dense deltas; dense results are
refactored exactly (cap ≥ min dim) or by the best rank-k approximation; PEFT's own rows; the CLI and its bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from delta_fixtures import FAN_IN_FAN_OUT, logits, make_adapter
from peft.utils import merge_utils
from safetensors.torch import load_file

from lorasum.delta.apply import apply_adapters, snapshot_weights
from lorasum.delta.compose import DenseDelta, factor_dense, to_factors
from lorasum.delta.methods import breadcrumbs_mask, kernel, merge, top_k_mask, trim
from lorasum.delta.registry import METHODS, method_params
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.models import load_model
from lorasum.lm.peft_merge import peft_combined

WEIGHTS = [1.0, 0.37, -0.61]
DENSITY = 0.3


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def trio(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mm-{request.param}")
    kinds = [dict(r=4, alpha=64), dict(r=2, alpha=5, use_rslora=True), dict(r=4, alpha=8)]
    return request.param, [make_adapter(root / f"a{i}", request.param, seed=30 + i, **kw)
                            for i, kw in enumerate(kinds)]


def raw_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Independent reference: each layer's α/r · B A (α/√r with rsLoRA), (out, in), float32, straight from the files."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            r = A.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            out[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = s * (B.float() @ A.float())
    return out


def reference(method: str, deltas: list[torch.Tensor], layer: str, seed: int = 0) -> torch.Tensor:
    """The paper operation on dense deltas: PEFT's merge_utils where it has it, a NumPy breadcrumbs otherwise."""
    w = torch.tensor(WEIGHTS)
    if method in ("sum", "mean", "task_arithmetic"):
        c = {"sum": 1.0, "mean": 1 / len(deltas), "task_arithmetic": 0.7}[method]
        return c * sum(wi * d.double() for wi, d in zip(WEIGHTS, deltas))
    if method in ("dare_linear", "dare_ties"):
        h = int.from_bytes(hashlib.sha256(f"{seed}\0{layer}".encode()).digest()[:8], "little") & (2**63 - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(h)
            return getattr(merge_utils, method)(deltas, w, DENSITY)
    if method == "breadcrumbs":
        total = np.zeros(deltas[0].shape)
        for wi, d in zip(WEIGHTS, deltas):
            flat = d.double().numpy().reshape(-1)
            order = np.argsort(-np.abs(flat), kind="stable")
            top, keep = int(0.05 * flat.size), int(DENSITY * flat.size)
            kept = np.zeros_like(flat)
            kept[order[top:top + keep]] = flat[order[top:top + keep]]
            total += wi * kept.reshape(d.shape)
        return torch.from_numpy(total)
    return getattr(merge_utils, method)(deltas, w, DENSITY)


PARAMS = {"sum": {}, "mean": {}, "task_arithmetic": {"lam": 0.7}, "ties": {"density": DENSITY},
          "dare_linear": {"density": DENSITY}, "dare_ties": {"density": DENSITY},
          "magnitude_prune": {"density": DENSITY}, "breadcrumbs": {"density": DENSITY, "gamma": 0.05}}


def test_every_registered_method_is_tested():
    assert set(PARAMS) == set(METHODS)


@pytest.mark.parametrize("method", list(PARAMS))
def test_method_equals_reference_on_dense_deltas_and_applies_in_layout(trio, method):
    model, folders = trio
    merged = merge([(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)], method, PARAMS[method])
    raw = [raw_deltas(f) for f in folders]
    assert set(merged.layers) == set(raw[0])
    lm = load_model(model, device="cpu")
    before = snapshot_weights(lm.model, merged.layers)
    apply_adapters(lm.model, [(merged, 1.0)])
    after = snapshot_weights(lm.model, merged.layers)
    moved = 0.0
    for layer, got in merged.layers.items():
        want = reference(method, [r[layer] for r in raw], layer).double()
        dense = got.delta if isinstance(got, DenseDelta) else got.scale * (got.B @ got.A)
        assert isinstance(got, DenseDelta) == METHODS[method].dense
        assert float((dense.double() - want).norm()) <= 1e-6 * float(want.norm())
        change = (after[layer] - before[layer]).double()  # the weight's own layout: (in, out) for Conv1D
        in_layout = want.T if FAN_IN_FAN_OUT[model] else want
        assert float((change - in_layout).norm()) <= 1e-5 * float(want.norm())
        moved = max(moved, float(want.abs().max()))
    assert moved > 1e-3  # the references are not all zero


def test_dense_methods_differ_from_the_sum(trio):
    """The methods do something: trimming and dropping change the delta (guards against a silent fallback)."""
    model, folders = trio
    ads = [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)]
    exact = merge(ads, "sum").layers
    for method in ("ties", "dare_linear", "magnitude_prune", "breadcrumbs"):
        got = merge(ads, method, PARAMS[method]).layers
        for layer, d in got.items():
            f = exact[layer]
            assert float((d.delta - f.B @ f.A).norm()) > 0.05 * float((f.B @ f.A).norm())


def test_dare_is_seeded_per_layer_and_independent_of_layer_order(trio):
    model, folders = trio
    ads = [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)]
    torch.manual_seed(123)
    a = merge(ads, "dare_linear", {"density": DENSITY, "seed": 5}).layers
    torch.manual_seed(999)  # the global RNG does not matter, and is left as it was
    state = torch.random.get_rng_state()
    b = merge(ads, "dare_linear", {"density": DENSITY, "seed": 5}).layers
    assert torch.equal(torch.random.get_rng_state(), state)
    c = merge(ads, "dare_linear", {"density": DENSITY, "seed": 6}).layers
    one = sorted(a)[-1]  # the last layer alone, merged first: the same mask
    alone = [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)]
    for ad, _ in alone:
        ad.layers = {one: ad.layers[one]}
    d = merge(alone, "dare_linear", {"density": DENSITY, "seed": 5}).layers
    assert torch.equal(d[one].delta, a[one].delta)
    for layer in a:
        assert torch.equal(a[layer].delta, b[layer].delta)
        assert not torch.equal(a[layer].delta, c[layer].delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_mask_is_a_stable_descending_sort_prefix_even_among_equal_magnitudes(dtype):
    gen = torch.Generator().manual_seed(5)
    for shape in [(1,), (7,), (4, 9), (33, 17)]:
        mag = torch.randint(0, 4, shape, generator=gen).to(dtype)  # few values: many ties at every threshold
        n = mag.numel()
        order = np.argsort(-mag.double().numpy().reshape(-1), kind="stable")
        for k in sorted({-1, 0, 1, n // 3, n // 2, n - 1, n, n + 3}):
            want = np.zeros(n, dtype=bool)
            want[order[:max(k, 0)]] = True
            got = top_k_mask(mag, k)
            assert got.dtype == torch.bool and got.shape == mag.shape
            assert np.array_equal(got.reshape(-1).numpy(), want), (shape, k)


def test_trim_equals_peft_magnitude_pruning():
    gen = torch.Generator().manual_seed(6)
    for shape, density in [((64, 48), 0.2), ((48, 64), 0.5), ((10, 3), 0.05), ((8, 8), 1.0)]:
        t = torch.randn(shape, generator=gen)
        assert torch.equal(trim(t, density), merge_utils.prune(t, density, "magnitude"))


def test_breadcrumbs_mask_by_hand():
    t = torch.tensor([[5.0, -1.0, 3.0], [0.5, -4.0, 2.0]])  # |t| ranked: 5, 4, 3, 2, 1, 0.5
    m = breadcrumbs_mask(t, density=0.5, gamma=1 / 6)  # drop the top 1 (5), keep the next 3 (4, 3, 2)
    assert m.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]
    assert breadcrumbs_mask(t, density=1 / 3, gamma=0.0).tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    merged = kernel("breadcrumbs")([t, -t], torch.tensor([1.0, 0.5]), 0.5, 1 / 6)
    assert merged.tolist() == [[0.0, 0.0, 1.5], [0.0, -2.0, 1.0]]  # (1 − 0.5)·(m ⊙ t)


# --- refactoring dense results -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_cap_at_or_above_min_dim_is_exact_and_truncation_error_is_the_svd_tail(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(shape, generator=g)
    for k in (min(shape), min(shape) + 7):
        f, err2, norm2 = factor_dense(DenseDelta(W), k)
        assert err2 == 0.0 and f.rank == min(shape) and torch.equal(f.scale * (f.B @ f.A), W)
    s = torch.linalg.svdvals(W.double())
    for k in (1, 5, 30):
        f, err2, norm2 = factor_dense(DenseDelta(W), k)
        u, sv, vh = torch.linalg.svd(W.double())
        best = (u[:, :k] * sv[:k]) @ vh[:k]
        assert f.rank == k
        assert float((f.B.double() @ f.A.double() - best).norm()) <= 1e-4 * float(s[0])
        assert err2 == pytest.approx(float(s[k:].square().sum()), rel=1e-4)
        assert norm2 == pytest.approx(float(s.square().sum()), rel=1e-5)


def test_to_factors_default_cap_is_the_sum_of_input_ranks_and_reports_errors(trio):
    model, folders = trio
    ads = [(load_adapter(f), w) for f, w in zip(folders, WEIGHTS)]
    merged = merge(ads, "ties", {"density": DENSITY})
    out, rep = to_factors(merged)
    assert {f.rank for f in out.layers.values()} == {10}
    num = den = 0.0
    for layer, d in merged.layers.items():
        s = torch.linalg.svdvals(d.delta.double())
        assert rep["layers"][layer] == pytest.approx(float(s[10:].square().sum().sqrt() / s.norm()), rel=1e-4)
        num, den = num + float(s[10:].square().sum()), den + float(s.square().sum())
    assert rep["overall"] == pytest.approx(math.sqrt(num / den), rel=1e-4) and rep["overall"] > 0.01
    full, rep = to_factors(merged, 10_000)
    assert rep["overall"] == 0.0
    for layer, d in merged.layers.items():
        f = full.layers[layer]
        assert torch.equal(f.B @ f.A, d.delta) and f.rank == min(d.shape)


# --- PEFT's own rows ---------------------------------------------------------------------------------------------
def test_peft_linear_is_peft_factorwise_and_leaves_the_model_alone(trio):
    model, folders = trio
    same = [folders[0], folders[2]]  # PEFT's linear needs equal ranks
    ads = [(load_adapter(f), w) for f, w in zip(same, [1.0, -0.61])]
    lm = load_model(model, device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    got = peft_combined(lm, ads, "linear")
    assert {k: v for k, v in lm.model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert not hasattr(lm.model, "peft_config")
    for layer, f in got.layers.items():
        # independent: A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ, from the files
        tensors = [load_file(str(d / "adapter_model.safetensors")) for d in same]
        scales = [64 / 4, 8 / 4]
        key = f"base_model.model.{layer}.lora_"
        A = sum(math.copysign(math.sqrt(abs(w * s)), w * s) * t[key + "A.weight"]
                for t, w, s in zip(tensors, [1.0, -0.61], scales))
        B = sum(math.sqrt(abs(w * s)) * t[key + "B.weight"] for t, w, s in zip(tensors, [1.0, -0.61], scales))
        assert f.scale == 1.0
        torch.testing.assert_close(f.B @ f.A, B @ A, rtol=1e-6, atol=1e-6)
        exact = raw_deltas(same[0])[layer] - 0.61 * raw_deltas(same[1])[layer]
        assert float((f.B @ f.A - exact).norm()) > 0.01 * float(exact.norm())  # the cross terms


def test_peft_cannot_combine_different_ranks(trio):
    from lorasum.errors import LorasumError

    model, folders = trio
    ads = [(load_adapter(f), 1.0) for f in folders[:2]]  # r = 4 and 2
    lm = load_model(model, device="cpu")
    with pytest.raises(LorasumError, match="cannot combine these adapters with combination_type 'linear'"):
        peft_combined(lm, ads, "linear")
    assert not hasattr(lm.model, "peft_config")


# --- the command line ----------------------------------------------------------------------------------------------
def test_cli_compose_ties_writes_a_stock_peft_adapter(trio, tmp_path, run_cli, strict_reload):
    model, folders = trio
    terms = [f"{f}:{w}" for f, w in zip(folders, WEIGHTS)]
    ref = {layer: reference("ties", [raw_deltas(f)[layer] for f in folders], layer) for layer in raw_deltas(folders[0])}
    for cap, exact in ((None, False), ("1000", True)):
        out = tmp_path / f"ties-{cap}"
        rc, stdout, err, _ = run_cli("compose", *terms, "--method", "ties", "--density", DENSITY,
                                     *(["--max-rank", cap] if cap else []), "--out", out)
        assert rc == 0, err
        assert "by ties(density=0.3)" in stdout and "relative error" in stdout
        meta = json.loads((out / "lorasum.json").read_text())["composition"]
        assert meta["method"] == "ties" and meta["params"] == {"density": DENSITY}
        assert set(meta["layer_errors"]) == set(ref)
        assert (meta["relative_error"] == 0.0) == exact and (exact or meta["relative_error"] > 0.01)
        pm = strict_reload(load_model(model, device="cpu").model, out)
        merged = pm.merge_and_unload()
        base = dict(load_model(model, device="cpu").model.named_modules())
        mods = dict(merged.named_modules())
        for layer, want in ref.items():
            change = (mods[layer].weight - base[layer].weight).detach().double()
            change = change.T if FAN_IN_FAN_OUT[model] else change
            rel = float((change - want.double()).norm() / want.norm())
            assert rel <= 1e-5 if exact else rel == pytest.approx(meta["layer_errors"][layer], rel=1e-2, abs=1e-5)


def test_cli_merge_and_eval_apply_the_method_exactly(trio, tmp_path, run_cli, tiny_data):
    model, folders = trio
    terms = [f"{f}:{w}" for f, w in zip(folders, WEIGHTS)]
    out = tmp_path / "merged"
    rc, _, err, _ = run_cli("merge", "--model", model, *sum((["--adapter", t] for t in terms), []),
                            "--method", "breadcrumbs", "--density", DENSITY, "--gamma", "0.05", "--out", out)
    assert rc == 0, err
    ref_model = load_model(model, device="cpu").model  # base + the reference deltas, added here by hand
    mods = dict(ref_model.named_modules())
    with torch.no_grad():
        for layer in raw_deltas(folders[0]):
            want = reference("breadcrumbs", [raw_deltas(f)[layer] for f in folders], layer).float()
            mods[layer].weight += want.T if FAN_IN_FAN_OUT[model] else want
    saved = load_model(str(out), device="cpu").model
    torch.testing.assert_close(logits(saved), logits(ref_model), rtol=0, atol=1e-5)
    args = ["eval", "--model", model, "--data-dir", tiny_data, "--data", "colors", "--max-test", "4", "--json"]
    rc, by_method, err, _ = run_cli(*args, *sum((["--adapter", t] for t in terms), []), "--method", "breadcrumbs",
                                    "--density", DENSITY, "--gamma", "0.05")
    assert rc == 0, err
    rc, by_model, err, _ = run_cli(*[str(out) if a == model else a for a in args])
    assert rc == 0, err
    got, want = json.loads(by_method)["results"]["colors"], json.loads(by_model)["results"]["colors"]
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)


def test_cli_generate_with_a_method(trio, run_cli):
    model, folders = trio
    rc, out, err, _ = run_cli("generate", "--model", model, "--adapter", str(folders[0]), "--adapter",
                              str(folders[2]), "--method", "dare_ties", "--density", "0.5", "--max-new-tokens", "4",
                              "red?")
    assert rc == 0 and out.strip() != "", err


@pytest.mark.parametrize("extra, word", [
    (["--method", "tie"], "--method 'tie' is not a merge method; did you mean 'ties'?"),
    (["--method", "ties", "--density", "0"], "--density must be in (0, 1], got 0.0"),
    (["--method", "ties", "--density", "1.01"], "--density must be in (0, 1]"),
    (["--method", "ties", "--density", "x"], "--density must be a number, got 'x'"),
    (["--method", "ties", "--max-rank", "0"], "--max-rank must be a whole number ≥ 1"),
    (["--density", "0.2"], "--density is not a hyperparameter of method 'sum' (it takes no hyperparameters)"),
    (["--method", "ties", "--lam", "2"], "--lam is not a hyperparameter of method 'ties' (it takes --density)"),
    (["--method", "magnitude_prune", "--seed", "1"], "--seed is not a hyperparameter of method 'magnitude_prune'"),
    (["--method", "peft_linear", "--density", "0.5"], "--density is not a hyperparameter of method 'peft_linear'"),
    (["--method", "breadcrumbs", "--density", "0.99", "--gamma", "0.05"], "--gamma 0.05 plus density 0.99 exceeds 1"),
    (["--method", "peft_linear"], "needs every adapter at one rank, got ranks 2, 4; use --method sum"),
])
def test_cli_bad_method_input_is_one_line_and_writes_nothing(trio, tmp_path, run_cli, extra, word):
    model, folders = trio
    out = tmp_path / "never"
    rc, _, err, _ = run_cli("compose", str(folders[0]), str(folders[1]), "--model", model, *extra, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and err.startswith("lorasum: error: ") and word in err
    assert list(tmp_path.iterdir()) == []
    if "--max-rank" in extra:
        return  # merge has no rank cap: it applies the method exactly
    rc, _, err, _ = run_cli("merge", "--model", model, "--adapter", str(folders[0]), "--adapter", str(folders[1]),
                            *extra, "--out", out)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and word in err
    assert list(tmp_path.iterdir()) == []


def test_method_params_defaults():
    assert method_params("ties", {}) == {"density": 0.2}
    assert method_params("dare_linear", {"seed": 3}) == {"density": 0.2, "seed": 3}
    assert method_params("breadcrumbs", {"density": None}) == {"density": 0.2, "gamma": 0.01}
    assert method_params("task_arithmetic", {}) == {"lam": 1.0}
    assert method_params("sum", {"density": None}) == {}
