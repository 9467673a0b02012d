"""Weight-space predictors (delta.predictors) against dense float64 references, and their all-pairs matrices."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch

from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.predictors import WEIGHT_PREDICTORS, cross_energy_layers, predictor_matrix
from lorasum.errors import LorasumError

SHAPES = {"m.layers.0.self_attn.q_proj": (6, 5), "m.layers.0.mlp.down_proj": (4, 9),
          "m.layers.1.self_attn.q_proj": (6, 5)}  # (out, in)
# per adapter: (rank per layer, scale, which layers have a zero B)
SPECS = [((2, 2, 2), 2.0, ()), ((3, 1, 4), 0.5, ()), ((1, 3, 2), -1.5, ()), ((2, 2, 2), 4.0, (1,)),
         ((2, 2, 2), 1.0, (0, 1, 2))]
TOL = 1e-6  # fp32 factors, float64 reference: the Gram route agrees to ~1e-9, the fp32 inputs are exact in float64


def _adapter(i: int, ranks, scale: float, zero=()) -> Adapter:
    g = torch.Generator().manual_seed(100 + i)
    layers = {}
    for li, (m, (out, inp)) in enumerate(SHAPES.items()):
        A, B = torch.randn(ranks[li], inp, generator=g), torch.randn(out, ranks[li], generator=g)
        layers[m] = LoraFactors(A, torch.zeros_like(B) if li in zero else B, scale)
    return Adapter(f"a{i}", "", {}, layers)


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    return [_adapter(i, *spec) for i, spec in enumerate(SPECS)]


def _dense(a: Adapter) -> dict[str, torch.Tensor]:
    return {m: f.scale * (f.B.double() @ f.A.double()) for m, f in a.layers.items()}  # (out, in)


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    den = float(x.norm() * y.norm())
    return 0.0 if den == 0 else float((x * y).sum()) / den


def _subspace(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cos² of the principal angles (scipy's), 0 for a zero matrix (every factor here has full rank or is 0)."""
    if not x.any() or not y.any():
        return 0.0
    angles = scipy.linalg.subspace_angles(x.double().numpy(), y.double().numpy())
    return float((torch.from_numpy(angles).cos() ** 2).mean())


def reference(name: str, a: Adapter, b: Adapter) -> float:
    """Each predictor from the dense float64 deltas (or, for the subspaces, scipy's principal angles)."""
    da, db = _dense(a), _dense(b)
    cos = [_cos(da[m], db[m]) for m in SHAPES]
    ea, eb = sum(float(d.norm()) ** 2 for d in da.values()), sum(float(d.norm()) ** 2 for d in db.values())
    cross = sum(float((da[m] * db[m]).sum()) for m in SHAPES)
    ratio = (1.0 if ea == 0 else math.inf) if eb == 0 else math.sqrt(ea / eb)
    return {
        "rms": math.sqrt(sum(c * c for c in cos) / len(cos)),
        "max_abs_cosine": max(abs(c) for c in cos),
        "cross_energy": 0.0 if ea + eb == 0 else 2 * cross / (ea + eb),
        "norm_ratio": ratio,
        "symmetric_norm_ratio": math.inf if ratio == 0 else max(ratio, 1 / ratio),
        "a_subspace": sum(_subspace(a.layers[m].A.T, b.layers[m].A.T) for m in SHAPES) / len(SHAPES),
        "b_subspace": sum(_subspace(a.layers[m].B, b.layers[m].B) for m in SHAPES) / len(SHAPES),
    }[name]


def close(got: float, want: float) -> bool:
    """Equal within TOL (relative for values above 1, as the norm ratios); infinities equal exactly."""
    if math.isinf(want):
        return got == want
    return abs(got - want) <= TOL * max(1.0, abs(want))


PAIRS = [(i, j) for i in range(len(SPECS)) for j in range(len(SPECS)) if i != j]


@pytest.mark.parametrize("name", list(WEIGHT_PREDICTORS))
def test_pairwise_against_dense_float64(adapters, name):
    for i, j in PAIRS:
        got, want = WEIGHT_PREDICTORS[name](adapters[i], adapters[j]), reference(name, adapters[i], adapters[j])
        assert not math.isnan(got), (name, i, j)
        assert close(got, want), (name, i, j, got, want)


@pytest.mark.parametrize("name", list(WEIGHT_PREDICTORS))
def test_matrix_entries_are_the_pairwise_values(adapters, name):
    mat = predictor_matrix(adapters, name)
    n = len(adapters)
    assert mat.shape == (n, n) and mat.dtype == torch.float64
    assert not torch.isnan(mat).any()
    for i, j in PAIRS:
        assert close(float(mat[i, j]), WEIGHT_PREDICTORS[name](adapters[i], adapters[j])), (name, i, j)
    if name == "norm_ratio":  # matrix[i, j] = ‖ΔW_i‖ / ‖ΔW_j‖
        live = [i for i in range(n) if i != 4]
        sub = mat[live][:, live]
        assert torch.allclose(sub * sub.T, torch.ones_like(sub), rtol=TOL, atol=0)
    else:
        assert torch.equal(mat, mat.T)


def test_zero_delta_values(adapters):
    """Adapter 4 is all zero: no direction, no energy; its diagonal has cosine 0, the ratio of zero to zero is 1."""
    z, a = adapters[4], adapters[0]
    for name in ("rms", "max_abs_cosine", "cross_energy", "b_subspace"):  # a zero B spans nothing
        assert WEIGHT_PREDICTORS[name](a, z) == 0.0, name
    assert WEIGHT_PREDICTORS["norm_ratio"](a, z) == math.inf and WEIGHT_PREDICTORS["norm_ratio"](z, a) == 0.0
    assert WEIGHT_PREDICTORS["symmetric_norm_ratio"](z, a) == math.inf
    assert WEIGHT_PREDICTORS["norm_ratio"](z, z) == 1.0 and WEIGHT_PREDICTORS["cross_energy"](z, z) == 0.0
    diag = {name: predictor_matrix(adapters, name).diagonal() for name in WEIGHT_PREDICTORS}
    # adapter 3 has one zero layer of three: its self-RMS is sqrt(2/3), its B spaces match on 2 layers of 3
    for name, self3 in (("rms", math.sqrt(2 / 3)), ("max_abs_cosine", 1.0), ("cross_energy", 1.0),
                        ("b_subspace", 2 / 3)):
        want = torch.tensor([1.0, 1.0, 1.0, self3, 0.0], dtype=torch.float64)
        assert torch.allclose(diag[name], want, rtol=0, atol=TOL), name
    assert float(diag["norm_ratio"][4]) == 1.0 and float(diag["symmetric_norm_ratio"][4]) == 1.0


def test_cross_energy_per_layer_against_dense(adapters):
    for i, j in PAIRS:
        per = cross_energy_layers(adapters[i], adapters[j])
        da, db = _dense(adapters[i]), _dense(adapters[j])
        assert sorted(per) == sorted(SHAPES)
        for m in SHAPES:
            den = float(da[m].norm()) ** 2 + float(db[m].norm()) ** 2
            want = 0.0 if den == 0 else 2 * float((da[m] * db[m]).sum()) / den
            assert abs(per[m] - want) <= TOL and -1.0 <= per[m] <= 1.0, (i, j, m)


def test_negative_scale_flips_the_signed_predictors(adapters):
    a, b = adapters[0], adapters[1]
    neg = Adapter("neg", "", {}, {m: LoraFactors(f.A, f.B, -f.scale) for m, f in b.layers.items()})
    for name in ("rms", "max_abs_cosine", "norm_ratio", "a_subspace", "b_subspace"):
        assert close(WEIGHT_PREDICTORS[name](a, neg), WEIGHT_PREDICTORS[name](a, b)), name
    assert close(WEIGHT_PREDICTORS["cross_energy"](a, neg), -WEIGHT_PREDICTORS["cross_energy"](a, b))


def test_unknown_predictor_and_incompatible_layers(adapters):
    with pytest.raises(LorasumError, match="unknown predictor 'cosine'"):
        predictor_matrix(adapters, "cosine")
    other = Adapter("other", "", {}, {"m.layers.0.self_attn.q_proj": adapters[0].layers["m.layers.0.self_attn.q_proj"]})
    for name in WEIGHT_PREDICTORS:
        with pytest.raises(LorasumError, match="adapters must target the same layers"):
            predictor_matrix([adapters[0], other], name)


def test_torch_free_names_match_the_registry():
    from lorasum.delta.registry import PREDICTOR_NAMES, RATIO_PREDICTORS

    assert PREDICTOR_NAMES == tuple(WEIGHT_PREDICTORS) and RATIO_PREDICTORS <= set(PREDICTOR_NAMES)


def test_rank_deficient_factors_count_their_true_rank(adapters):
    """A rank-1 A in a rank-2 slot (two equal rows) spans one direction, as subspace._basis counts it."""
    a = adapters[0]
    layers = {m: LoraFactors(torch.cat([f.A[:1], f.A[:1]]), f.B, f.scale) for m, f in a.layers.items()}
    low = Adapter("low", "", {}, layers)
    for name in ("a_subspace", "b_subspace"):
        mat = predictor_matrix([a, low, adapters[1]], name)
        for i, j in [(0, 1), (1, 2)]:
            x, y = [a, low, adapters[1]][i], [a, low, adapters[1]][j]
            assert close(float(mat[i, j]), WEIGHT_PREDICTORS[name](x, y)), (name, i, j)
    assert float(predictor_matrix([a, low], "a_subspace")[0, 1]) == pytest.approx(1.0, abs=TOL)  # row(low) ⊂ row(a)


def test_non_finite_factors_are_refused(adapters):
    a = adapters[0]
    layers = {m: LoraFactors(f.A.clone().fill_(math.nan), f.B, f.scale) for m, f in a.layers.items()}
    bad = Adapter("bad", "", {}, layers)
    with pytest.raises(LorasumError, match="NaN or infinite"):
        predictor_matrix([a, bad], "a_subspace")
