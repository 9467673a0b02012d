"""Factor-subspace similarity and the random-null RMS, against scipy, numpy brute force and hand-worked numbers;
`lorasum similarity --factors`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from lorasum.cli.main import main
from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.peft_format import save_adapter
from lorasum.delta.subspace import factor_similarity, factor_summary, null_rms, subspace_similarity
from lorasum.errors import LorasumError


def _adapter(name: str, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0) -> Adapter:
    return Adapter(name, "", config={}, layers={m: LoraFactors(A, B, scale) for m, (A, B) in layers.items()})


def _scipy_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Independent reference: mean of cos² over scipy's principal angles."""
    return float(np.mean(np.cos(subspace_angles(x, y)) ** 2))


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    return q


# --- subspace_similarity ------------------------------------------------------------------------------------------
def test_identical_subspaces_give_one_and_orthogonal_give_zero():
    x = _randn(10, 3, seed=0)
    assert subspace_similarity(x, x) == pytest.approx(1.0, abs=1e-12)
    assert subspace_similarity(x, x @ _randn(3, 3, seed=1)) == pytest.approx(1.0, abs=1e-12)  # same span
    q = _orthogonal(10, seed=2)
    assert subspace_similarity(q[:, :3], q[:, 3:7] @ _randn(4, 4, seed=3)) == pytest.approx(0.0, abs=1e-12)
    # a subspace inside a larger one: every principal angle is 0
    assert subspace_similarity(q[:, :2], q[:, :5]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("theta", [0.0, 0.3, math.pi / 4, 1.2, math.pi / 2])
def test_hand_worked_principal_angle(theta):
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    # span{e1} vs span{cos θ e1 + sin θ e2}: one angle θ
    assert subspace_similarity(e1[:, None], (c * e1 + s * e2)[:, None]) == pytest.approx(c * c, abs=1e-12)
    # span{e1, e2} vs span{e1, cos θ e2 + sin θ e3}: angles 0 and θ, mean cos² = (1 + cos²θ) / 2
    x = torch.stack([e1, e2], dim=1)
    y = torch.stack([e1, c * e2 + s * e3], dim=1)
    assert subspace_similarity(x, y) == pytest.approx((1 + c * c) / 2, abs=1e-12)


@pytest.mark.parametrize("d,r1,r2", [(12, 3, 3), (40, 4, 8), (9, 5, 2), (64, 16, 16)])
def test_agrees_with_scipy_subspace_angles(d, r1, r2):
    for seed in range(3):
        x, y = _randn(d, r1, seed=seed), _randn(d, r2, seed=100 + seed)
        want = _scipy_similarity(x.numpy(), y.numpy())
        assert abs(subspace_similarity(x, y) - want) <= 1e-10
        assert abs(subspace_similarity(y, x) - want) <= 1e-10
        assert abs(subspace_similarity(x.float(), y.float()) - want) <= 1e-5  # float32 factors work too


def test_rank_deficient_and_zero_factors():
    d = 20
    u, v = _randn(d, 1, seed=0), _randn(1, 4, seed=1)
    y = _randn(d, 4, seed=2)
    assert subspace_similarity(torch.zeros(d, 4), y) == 0.0
    assert subspace_similarity(y, torch.zeros(d, 4)) == 0.0
    assert subspace_similarity(torch.zeros(d, 4), torch.zeros(d, 4)) == 0.0
    # rank 1 in a rank-4 slot: its true rank counts, not 4
    rank1 = u @ v  # (d, 4), rank 1
    want = _scipy_similarity(u.numpy(), y.numpy())
    assert abs(subspace_similarity(rank1, y) - want) <= 1e-10
    assert subspace_similarity(rank1, torch.cat([u, _randn(d, 3, seed=3)], dim=1)) == pytest.approx(1.0, abs=1e-12)
    assert abs(subspace_similarity(rank1.float(), y.float()) - want) <= 1e-5  # float32 round-off is not rank
    # duplicated and zero columns: rank 2
    w = _randn(d, 1, seed=4)
    x = torch.cat([u, u, w, torch.zeros(d, 1)], dim=1)
    assert abs(subspace_similarity(x, y) - _scipy_similarity(torch.cat([u, w], 1).numpy(), y.numpy())) <= 1e-10
    with pytest.raises(LorasumError, match="equal row counts"):
        subspace_similarity(torch.zeros(3, 2), torch.zeros(4, 2))


def test_invariant_to_factor_mixing_and_rotation():
    out, inp, r = 30, 24, 4
    A1, B1 = _randn(r, inp, seed=0), _randn(out, r, seed=1)
    A2, B2 = _randn(r, inp, seed=2), _randn(out, r, seed=3)
    M = _randn(r, r, seed=4) + 3 * torch.eye(r, dtype=torch.float64)  # invertible, well conditioned
    Q = _orthogonal(r, seed=5)
    base = factor_similarity(_adapter("a", {"l": (A1, B1)}), _adapter("b", {"l": (A2, B2)}))["l"]
    for T in (M, Q):
        A1m, B1m = T @ A1, B1 @ torch.linalg.inv(T)
        assert torch.allclose(B1m @ A1m, B1 @ A1, atol=1e-10)  # the same delta
        got = factor_similarity(_adapter("a", {"l": (A1m, B1m)}), _adapter("b", {"l": (A2, B2)}))["l"]
        assert abs(got["A"] - base["A"]) <= 1e-10 and abs(got["B"] - base["B"]) <= 1e-10
    assert abs(subspace_similarity(B1 @ M, B2 @ Q) - subspace_similarity(B1, B2)) <= 1e-10
    # and against the reference, so the invariant value is also the right one
    assert abs(base["B"] - _scipy_similarity(B1.numpy(), B2.numpy())) <= 1e-10
    assert abs(base["A"] - _scipy_similarity(A1.T.numpy(), A2.T.numpy())) <= 1e-10


# --- factor_similarity, factor_summary ----------------------------------------------------------------------------
def test_shared_A_is_flagged_and_independent_factors_are_not():
    out, inp, r = 96, 64, 4
    layers = ["h.0.attn.q", "h.1.attn.q"]
    A = {m: _randn(r, inp, seed=i) for i, m in enumerate(layers)}
    a = _adapter("a", {m: (A[m], _randn(out, r, seed=10 + i)) for i, m in enumerate(layers)})
    shared = _adapter("s", {m: (A[m], _randn(out, r, seed=20 + i)) for i, m in enumerate(layers)}, scale=-7.0)
    indep = _adapter("i", {m: (_randn(r, inp, seed=30 + i), _randn(out, r, seed=40 + i))
                           for i, m in enumerate(layers)})
    per = factor_similarity(a, shared)
    assert list(per) == sorted(layers)
    for m in layers:
        assert per[m]["A"] == pytest.approx(1.0, abs=1e-10)
        assert per[m]["B"] < 0.25  # random 4-dim subspaces of R^96: E mean cos² = r/out ≈ 0.04
        assert abs(per[m]["B"] - _scipy_similarity(a.layers[m].B.numpy(), shared.layers[m].B.numpy())) <= 1e-10
    for v in factor_similarity(a, indep).values():
        assert v["A"] < 0.3 and v["B"] < 0.25  # r/in ≈ 0.06, r/out ≈ 0.04
    s = factor_summary(per)
    assert s["A"] == pytest.approx(1.0, abs=1e-10)
    assert s["B"] == pytest.approx((per[layers[0]]["B"] + per[layers[1]]["B"]) / 2, abs=1e-15)


def test_factor_summary_hand_worked_and_empty():
    assert factor_summary({"x": {"A": 1.0, "B": 0.2}, "y": {"A": 0.5, "B": 0.4}}) == pytest.approx(
        {"A": 0.75, "B": 0.3})
    with pytest.raises(LorasumError):
        factor_summary({})


# --- null_rms -----------------------------------------------------------------------------------------------------
def _shape_adapter(name: str, shapes: list[tuple[int, int, int]]) -> Adapter:
    """Adapter with layer i of (out, in, r): only the shapes matter to null_rms."""
    return _adapter(name, {f"h.{i}.attn.q": (torch.zeros(r, i_), torch.zeros(o, r))
                           for i, (o, i_, r) in enumerate(shapes)})


def _dense_null(shapes_a, shapes_b, samples: int, seed: int) -> np.ndarray:
    """Independent brute force: numpy Gaussian factors, dense deltas, cosines, RMS over layers per sample."""
    rng = np.random.default_rng(seed)
    cos2 = np.zeros(samples)
    for (o, i, r1), (_, _, r2) in zip(shapes_a, shapes_b):
        d1 = rng.standard_normal((samples, o, r1)) @ rng.standard_normal((samples, r1, i))  # (samples, o, i)
        d2 = rng.standard_normal((samples, o, r2)) @ rng.standard_normal((samples, r2, i))
        inner = (d1 * d2).sum(axis=(1, 2))
        cos2 += inner**2 / ((d1 * d1).sum(axis=(1, 2)) * (d2 * d2).sum(axis=(1, 2)))
    return np.sqrt(cos2 / len(shapes_a))


# ranks may differ between the adapters; the shapes cover both ways of drawing a Gram (out or in below r₁ + r₂)
TINY = [([(3, 2, 1), (1, 3, 1), (4, 4, 2)], [(3, 2, 2), (1, 3, 1), (4, 4, 2)]),
        ([(2, 2, 1)], [(2, 2, 1)]),
        ([(64, 48, 4)], [(64, 48, 4)])]


@pytest.mark.parametrize("shapes_a,shapes_b", TINY)
def test_null_sampled_figures_match_dense_brute_force(shapes_a, shapes_b):
    n = 20000
    got = null_rms(_shape_adapter("a", shapes_a), _shape_adapter("b", shapes_b), samples=n, seed=1)
    ref = _dense_null(shapes_a, shapes_b, n, seed=2)
    se = math.sqrt((got["sd"] ** 2 + ref.std(ddof=1) ** 2) / n)
    assert abs(got["mean"] - ref.mean()) <= 5 * se
    assert got["sd"] == pytest.approx(ref.std(ddof=1), rel=0.05)
    assert got["samples"] == n


@pytest.mark.parametrize("shapes", [[(2, 2, 1)], [(8, 6, 2), (5, 7, 3)], [(64, 48, 4)] * 3,
                                    [(2304, 768, 4), (768, 768, 4), (768, 3072, 4)] * 12])
def test_null_closed_form_is_the_root_mean_square_of_the_sampled_rms(shapes):
    n = 4000
    a = _shape_adapter("a", shapes)
    got = null_rms(a, a, samples=n, seed=0)
    cf = math.sqrt(sum(1 / (o * i) for o, i, _ in shapes) / len(shapes))
    assert got["closed_form"] == pytest.approx(cf, rel=1e-12)
    # E RMS² = closed_form²; the sampled mean of RMS² is mean² + sd²·(n-1)/n, its standard error ≈ 2·mean·sd/√n
    mu, sd = got["mean"], got["sd"]
    m2 = mu * mu + sd * sd * (n - 1) / n
    assert abs(m2 - cf * cf) <= 6 * (2 * mu * sd + sd * sd) / math.sqrt(n)
    # with many layers the RMS concentrates, so its mean itself lies within a few per cent below the closed form
    if len(shapes) >= 30:
        assert 0.95 * cf <= mu <= cf


def test_null_is_deterministic_per_seed_and_fast():
    import time

    shapes = [(2304, 768, 4), (768, 768, 4), (768, 3072, 4)] * 12  # GPT-2 small, c_attn + c_proj, r = 4
    a = _shape_adapter("a", shapes)
    t = time.perf_counter()
    first = null_rms(a, a, samples=200, seed=3)
    assert time.perf_counter() - t < 1.0
    assert null_rms(a, a, samples=200, seed=3) == first
    assert null_rms(a, a, samples=200, seed=4)["mean"] != first["mean"]
    with pytest.raises(LorasumError, match="at least 2 samples"):
        null_rms(a, a, samples=1)


# --- lorasum similarity --factors ---------------------------------------------------------------------------------
def _save(tmp_path, name: str, layers: dict, scale: float = 1.0) -> str:
    return str(save_adapter(_adapter(name, layers, scale), tmp_path / name))


def test_cli_hand_worked_table_with_and_without_factors(tmp_path, capsys):
    # ΔW_a = [[1,0],[0,0]], ΔW_b = 3·[[1,1],[0,0]]: cos = 1/√2; row(A): e1 vs (e1+e2)/√2, cos² 45° = 0.5;
    # col(B): both e1, 1
    a = _save(tmp_path, "a", {"x.attn.q": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))})
    b = _save(tmp_path, "b", {"x.attn.q": (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]]))}, scale=3.0)
    assert main(["similarity", a, b]) == 0
    plain = ("layer     kind       a ~ b\n"
             "x.attn.q  attn      0.7071\n"
             "RMS                 0.7071\n")
    assert capsys.readouterr().out == plain  # unchanged without --factors
    assert main(["similarity", a, b, "--factors"]) == 0
    assert capsys.readouterr().out == plain + ("A-space             0.5000\n"
                                               "B-space             1.0000\n")
    assert main(["similarity", a, b, "--json"]) == 0
    assert "factors" not in json.loads(capsys.readouterr().out)["pairs"][0]


def test_cli_shared_A_shows_in_the_factor_rows_and_json(tmp_path, capsys):
    out, inp, r = 24, 16, 4
    layers = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    A = {m: _randn(r, inp, seed=i).float() for i, m in enumerate(layers)}
    a = _save(tmp_path, "a", {m: (A[m], _randn(out, r, seed=10 + i).float()) for i, m in enumerate(layers)})
    b = _save(tmp_path, "b", {m: (A[m], _randn(out, r, seed=20 + i).float()) for i, m in enumerate(layers)})
    c = _save(tmp_path, "c", {m: (_randn(r, inp, seed=30 + i).float(), _randn(out, r, seed=40 + i).float())
                              for i, m in enumerate(layers)})
    assert main(["similarity", a, b, c, "--factors"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["A-space"][0] == "1.0000"  # pair order: a~b, a~c, b~c
    assert all(float(v) < 0.9 for v in rows["A-space"][1:]) and all(float(v) < 0.9 for v in rows["B-space"])
    assert main(["similarity", a, b, c, "--factors", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ab = report["pairs"][0]
    assert (ab["a"], ab["b"]) == ("a", "b")
    assert set(ab["factors"]) == {"A", "B", "mean_A", "mean_B"}
    assert set(ab["factors"]["A"]) == set(layers) == set(ab["factors"]["B"])
    assert ab["factors"]["mean_A"] == pytest.approx(1.0, abs=1e-6)
    for m in layers:
        assert ab["factors"]["A"][m] == pytest.approx(1.0, abs=1e-6)
        assert ab["factors"]["B"][m] == pytest.approx(
            _scipy_similarity(_randn(out, r, seed=10 + layers.index(m)).numpy(),
                              _randn(out, r, seed=20 + layers.index(m)).numpy()), abs=1e-5)
    assert report["pairs"][1]["factors"]["mean_A"] < 0.9
