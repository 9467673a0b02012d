"""Factored similarity against dense float64 references and hand-worked numbers; the `similarity` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from delta_fixtures import cos64, dense64, make_adapter

from lorasum.cli.main import main
from lorasum.delta.compose import weighted_sum
from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.similarity import (cosine_matrices, gram_matrices, cosine_of_sum, factored_inner, layer_cosines, layer_inner,
                                layer_norms, norm_ratios, rms, rms_matrix, similarity_report)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return [load_adapter(make_adapter(root / f"g{i}", "tiny-gpt2", seed=i, r=r, alpha=alpha, use_rslora=rs))
            for i, (r, alpha, rs) in enumerate([(4, 64, False), (2, 8, False), (8, 16, True), (4, 3, False)])]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return [load_adapter(make_adapter(root / f"l{i}", "tiny-llama", seed=10 + i)) for i in range(3)]


def _hand(name: str, a: list[list[float]], b: list[list[float]], scale: float = 1.0) -> Adapter:
    return Adapter(name, "", {}, {"x.attn.q": LoraFactors(torch.tensor(a), torch.tensor(b), scale)})


def test_hand_worked_numbers():
    # ΔW1 = [[1,0],[0,0]], ΔW2 = 3·[[1,1],[0,0]]: <.,.> = 3, ‖ΔW1‖ = 1, ‖ΔW2‖ = 3√2, cos = 1/√2
    a = _hand("a", [[1.0, 0.0]], [[1.0], [0.0]])
    b = _hand("b", [[1.0, 1.0]], [[1.0], [0.0]], scale=3.0)
    assert layer_inner(a, b)["x.attn.q"] == pytest.approx(3.0, abs=1e-12)
    assert factored_inner(a.layers["x.attn.q"], b.layers["x.attn.q"]) == pytest.approx(3.0, abs=1e-12)
    assert layer_norms(b)["x.attn.q"] == pytest.approx(3 * math.sqrt(2), abs=1e-12)
    assert layer_cosines(a, b)["x.attn.q"] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert norm_ratios(a, b)["x.attn.q"] == pytest.approx(1 / (3 * math.sqrt(2)), abs=1e-12)
    assert rms([1 / math.sqrt(2), 1.0]) == pytest.approx(math.sqrt(0.75), abs=1e-12)
    assert rms({"x": -0.5, "y": 0.5}) == pytest.approx(0.5)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_cosines_norms_vs_dense_float64(request, which):
    ads = request.getfixturevalue(which)
    for x, y in [(ads[0], ads[1]), (ads[1], ads[2]), (ads[0], ads[2])]:
        cos = layer_cosines(x, y)
        norms = layer_norms(x)
        for layer in x.layers:
            dx, dy = dense64(x, layer), dense64(y, layer)
            assert abs(cos[layer] - cos64(dx, dy)) <= 1e-6
            assert abs(norms[layer] - float(dx.norm())) <= 1e-6 * float(dx.norm())
            assert abs(layer_inner(x, y)[layer] - float((dx * dy).sum())) <= 1e-6 * float(dx.norm() * dy.norm())
        ref_rms = math.sqrt(sum(cos64(dense64(x, m), dense64(y, m)) ** 2 for m in x.layers) / len(x.layers))
        assert abs(rms(cos) - ref_rms) <= 1e-6


def test_self_and_negation(gpt2):
    a = gpt2[2]  # rsLoRA adapter
    neg = weighted_sum([(a, -1.0)])
    assert all(c == pytest.approx(1.0, abs=1e-9) for c in layer_cosines(a, a).values())
    # neg folds -s into B (one fp32 rounding) and the Gram products run in fp32: agreement to 1e-6
    assert all(c == pytest.approx(-1.0, abs=1e-6) for c in layer_cosines(a, neg).values())
    assert rms(layer_cosines(a, neg)) == pytest.approx(1.0, abs=1e-6)
    # float64 products: exact to float64 round-off
    layers, g = gram_matrices([a, neg], compute_dtype=torch.float64)
    cos64 = g[:, 0, 1] / (g[:, 0, 0] * g[:, 1, 1]).sqrt()
    assert float((cos64 + 1).abs().max()) <= 1e-9
    assert all(r == pytest.approx(1.0, abs=1e-6) for r in norm_ratios(a, neg).values())  # fp32 scale folding


def test_zero_delta_has_cosine_zero(gpt2):
    a = gpt2[0]
    zero = weighted_sum([(a, 1.0), (a, -1.0)])  # a − a: cancels exactly in the Gram, but B is not zero
    empty = Adapter("z", "", {}, {n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in a.layers.items()})
    assert all(v == 0.0 for v in layer_cosines(empty, a).values())
    assert all(v == 0.0 for v in layer_norms(empty).values())
    assert all(v <= 1e-6 * n for v, n in zip(layer_norms(zero).values(), layer_norms(a).values()))
    _, cos = cosine_matrices([empty, a])
    assert torch.equal(cos[:, 0, 1], torch.zeros(len(a.layers), dtype=cos.dtype))


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_batched_matrix_vs_pairwise_and_dense(request, which):
    """The batched (L, N, N) cosines (mixed ranks 2/4/8 in one stack) equal the dense float64 pairwise values."""
    ads = request.getfixturevalue(which)
    layers, cos = cosine_matrices(ads)
    assert layers == sorted(ads[0].layers)
    for i, x in enumerate(ads):
        for j, y in enumerate(ads):
            for li, m in enumerate(layers):
                assert abs(float(cos[li, i, j]) - cos64(dense64(x, m), dense64(y, m))) <= 1e-6
    R = rms_matrix(ads)
    assert torch.allclose(R, R.T) and torch.allclose(R.diagonal(), torch.ones(len(ads), dtype=R.dtype))
    # fp32 Gram products: the batched stack may accumulate in another order than the pair alone
    assert float(R[0, 1]) == pytest.approx(rms(layer_cosines(ads[0], ads[1])), abs=1e-7)


def test_cosine_of_sum_vs_dense(gpt2):
    a, b, c, d = gpt2
    per = cosine_of_sum([(a, 1.0), (b, 0.7), (c, -0.3)], d)
    for m in a.layers:
        ref = cos64(dense64(a, m) + 0.7 * dense64(b, m) - 0.3 * dense64(c, m), dense64(d, m))
        assert abs(per[m] - ref) <= 1e-6
    # a sum against a sum (Table 5: level-2 block vs a fundamental block, and block sums on both sides)
    per2 = cosine_of_sum([(a, 1.0), (b, 1.0)], [(c, 1.0), (d, 2.0)])
    for m in a.layers:
        ref = cos64(dense64(a, m) + dense64(b, m), dense64(c, m) + 2 * dense64(d, m))
        assert abs(per2[m] - ref) <= 1e-6


def test_report_and_cli_json(gpt2, capsys):
    paths = [a.path for a in gpt2[:3]]
    assert main(["similarity", *paths, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"] == ["g0", "g1", "g2"]
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [("g0", "g1"), ("g0", "g2"), ("g1", "g2")]
    for p in out["pairs"]:
        x, y = gpt2[int(p["a"][1])], gpt2[int(p["b"][1])]
        assert set(p["layers"]) == set(x.layers)
        for m, v in p["layers"].items():
            assert abs(v - cos64(dense64(x, m), dense64(y, m))) <= 1e-6
        assert p["rms"] == pytest.approx(rms(p["layers"]))
    assert out["kinds"]["transformer.h.0.mlp.c_proj"] == "mlp"
    assert similarity_report(gpt2[:3])["pairs"][0]["rms"] == pytest.approx(out["pairs"][0]["rms"])


def test_cli_table(gpt2, capsys):
    assert main(["similarity", gpt2[0].path, gpt2[1].path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "g0 ~ g1" in lines[0] and "kind" in lines[0]
    row = next(ln for ln in lines if ln.startswith("transformer.h.1.mlp.c_proj"))
    assert row.split()[1] == "mlp"
    assert float(row.split()[2]) == pytest.approx(layer_cosines(gpt2[0], gpt2[1])["transformer.h.1.mlp.c_proj"],
                                                  abs=1e-4)
    assert lines[-1].startswith("RMS") and float(lines[-1].split()[-1]) == pytest.approx(
        rms(layer_cosines(gpt2[0], gpt2[1])), abs=1e-4)


@pytest.mark.parametrize("n", [0, 1])
def test_cli_needs_two(gpt2, capsys, n):
    assert main(["similarity", *[a.path for a in gpt2[:n]]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at least two adapters" in err


def test_cli_mixed_models(gpt2, llama, capsys):
    assert main(["similarity", gpt2[0].path, llama[0].path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "same layers" in err


def test_cli_table_rms_matrix(gpt2, capsys):
    assert main(["similarity", *[a.path for a in gpt2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("RMS matrix")
    assert lines[at + 1].split() == ["g0", "g1", "g2", "g3"]
    R = rms_matrix(gpt2)
    for i in range(4):
        row = lines[at + 2 + i].split()
        assert row[0] == f"g{i}"
        assert [float(x) for x in row[1:]] == pytest.approx(R[i].tolist(), abs=1e-4)


def test_cli_accepts_path_weight(gpt2, capsys):
    """`PATH[:WEIGHT]` as everywhere: the weight scales the delta, so -1 flips every cosine and 0.5 changes none."""
    a, b = gpt2[0].path, gpt2[1].path
    assert main(["similarity", a, b, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["similarity", a, f"{b}:-1", "--json"]) == 0
    flipped = json.loads(capsys.readouterr().out)
    assert flipped["adapters"] == ["g0", "-1*g1"]
    (p,), (q,) = plain["pairs"], flipped["pairs"]
    assert (q["a"], q["b"]) == ("g0", "-1*g1")
    assert set(q["layers"]) == set(p["layers"]) and all(abs(p["layers"][m]) > 1e-6 for m in p["layers"])
    assert all(q["layers"][m] == pytest.approx(-p["layers"][m], abs=1e-9) for m in p["layers"])
    assert q["rms"] == pytest.approx(p["rms"], abs=1e-9)
    assert main(["similarity", f"{a}:0.5", b, "--json"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["adapters"] == ["0.5*g0", "g1"]
    assert all(half["pairs"][0]["layers"][m] == pytest.approx(v, abs=1e-9) for m, v in p["layers"].items())
    assert main(["similarity", a, f"{b}:x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weight 'x' is not a finite number" in err


def test_table_rms_matrix_diagonal_is_rms_matrix(gpt2):
    """The table's diagonal is rms_matrix's: 0 for an all-zero delta (cosine 0 with everything), not a fixed 1."""
    from lorasum.cli.algebra import format_table

    a = gpt2[0]
    zero = Adapter("zero", "", {}, {n: LoraFactors(f.A, torch.zeros_like(f.B), f.scale) for n, f in a.layers.items()})
    ads = [gpt2[0], zero, gpt2[1]]
    report = similarity_report(ads)
    R = rms_matrix(ads)
    assert float(R[1, 1]) == 0.0 and float(R[0, 0]) == pytest.approx(1.0)
    assert torch.allclose(torch.tensor(report["rms_matrix"], dtype=R.dtype), R, atol=1e-12)
    lines = format_table(report).splitlines()
    at = lines.index("RMS matrix")
    for i, name in enumerate(["g0", "zero", "g1"]):
        row = lines[at + 2 + i].split()
        assert row[0] == name and [float(x) for x in row[1:]] == pytest.approx(R[i].tolist(), abs=1e-4)
    assert lines[at + 3].split()[2] == "0.0000"
