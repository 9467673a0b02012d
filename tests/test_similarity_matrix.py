"""`lorasum similarity --matrix`: a library of adapters, every pair's predictor in CSV and a clustered heatmap."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import one_line_error

from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.library import cluster_order, find_adapters, rank_pairs
from lorasum.delta.peft_format import load_adapter, save_adapter
from lorasum.delta.predictors import WEIGHT_PREDICTORS, predictor_matrix

LAYERS = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def write(folder: Path, seed: int, base: str = "HuggingFaceTB/SmolLM2-135M", layers=LAYERS, out: int = 6) -> Path:
    """A stock PEFT folder with random factors (rank 2, some layers rank 1), written by lorasum's own saver."""
    g = torch.Generator().manual_seed(seed)
    fs = {m: LoraFactors(torch.randn(1 + (k + seed) % 2, 8, generator=g),
                         torch.randn(out, 1 + (k + seed) % 2, generator=g), 0.5 + seed) for k, m in enumerate(layers)}
    return save_adapter(Adapter(folder.name, "", {"base_model_name_or_path": base}, fs), folder)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lib")
    for i in range(4):
        write(root / "team" / f"ad{i}", i)
    write(root / "solo", 7)
    (root / "team" / "notes").mkdir()  # a subfolder without adapter_config.json is not an adapter
    return root


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("predictor", ["rms", "cross_energy", "norm_ratio", "b_subspace"])
def test_matrix_files_hold_the_library_values(library, tmp_path, run_cli, predictor):
    out = tmp_path / "m"
    rc, stdout, err, _ = run_cli("similarity", "--matrix", library / "team", library / "solo",
                                 "--predictor", predictor, "--out", out)
    assert rc == 0, err
    assert f"a ranking by {predictor}, not a forecast" in stdout
    folders = [library / "team" / f"ad{i}" for i in range(4)] + [library / "solo"]
    names = [f.name for f in folders]
    ref = predictor_matrix([load_adapter(f) for f in folders], predictor)
    table = read_csv(out / "matrix.csv")
    assert table[0] == [predictor, *names] and [r[0] for r in table[1:]] == names
    got = torch.tensor([[float(x) for x in r[1:]] for r in table[1:]], dtype=torch.float64)
    assert torch.equal(got, ref)  # written with repr: read back exactly
    pairs = read_csv(out / "pairs.csv")
    assert pairs[0] == ["a", "b", predictor] and len(pairs) - 1 == 10
    assert [(a, b, float(v)) for a, b, v in pairs[1:]] == rank_pairs(names, ref, predictor)
    keys = [abs(math.log(float(v))) if predictor == "norm_ratio" else abs(float(v)) for _, _, v in pairs[1:]]
    assert keys == sorted(keys)  # least interfering first
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5 adapters, 10 pairs" in stdout and f"{pairs[1][0]} ~ {pairs[1][1]}" in stdout


def test_pairwise_values_and_default_predictor(library, tmp_path, run_cli):
    out = tmp_path / "m"
    assert run_cli("similarity", "--matrix", library / "team", "--out", out)[0] == 0
    table = read_csv(out / "matrix.csv")
    assert table[0][0] == "rms"
    a, b = load_adapter(library / "team" / "ad0"), load_adapter(library / "team" / "ad2")
    assert float(table[1][3]) == pytest.approx(WEIGHT_PREDICTORS["rms"](a, b), abs=1e-9)


def test_output_rule(library, tmp_path, run_cli):
    out = tmp_path / "m"
    assert run_cli("similarity", "--matrix", library / "team", "--out", out)[0] == 0
    one_line_error(run_cli("similarity", "--matrix", library / "team", "--out", out), "--out", "--overwrite")
    assert run_cli("similarity", "--matrix", library / "team", "--out", out, "--overwrite")[0] == 0
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    one_line_error(run_cli("similarity", "--matrix", library / "team", "--out", foreign, "--overwrite"), "mine.txt")


def test_cluster_order_groups_near_copies():
    # 0 ~ 2 and 1 ~ 3 are near copies: the clustered order keeps each couple together
    m = torch.tensor([[1.0, 0.1, 0.95, 0.1], [0.1, 1.0, 0.1, 0.9], [0.95, 0.1, 1.0, 0.1], [0.1, 0.9, 0.1, 1.0]])
    order = cluster_order(m.double(), "rms")
    assert sorted(order) == [0, 1, 2, 3] and abs(order.index(0) - order.index(2)) == 1
    assert abs(order.index(1) - order.index(3)) == 1


def test_find_adapters(library):
    assert find_adapters([library / "team", library / "solo", library / "team" / "ad1"]) == \
        [library / "team" / f"ad{i}" for i in range(4)] + [library / "solo"]


def test_refusals(library, tmp_path, run_cli):
    out = tmp_path / "m"
    one_line_error(run_cli("similarity", "--matrix", library / "team" / "notes", "--out", out),
                   "--matrix", "notes", "holds no adapter", quiet=True, absent=out)
    one_line_error(run_cli("similarity", "--matrix", library / "nowhere", "--out", out), "nowhere", absent=out)
    one_line_error(run_cli("similarity", "--matrix", library / "solo", "--out", out),
                   "--matrix", "found 1 adapter", "solo", absent=out)
    one_line_error(run_cli("similarity", library / "solo", "--matrix", library / "team", "--out", out),
                   "--matrix", "not both", absent=out)
    one_line_error(run_cli("similarity", "--matrix", library / "team", "--factors", "--out", out),
                   "--factors", "a_subspace", absent=out)
    one_line_error(run_cli("similarity", "--matrix", library / "team"), "--out", "required")
    one_line_error(run_cli("similarity", library / "solo", library / "team" / "ad0", "--predictor", "rms"),
                   "--predictor", "--matrix")
    one_line_error(run_cli("similarity", "--matrix", library / "team", "--predictor", "cosine", "--out", out),
                   "--predictor", "cosine", absent=out)
    err = one_line_error(run_cli("similarity", library / "solo", library / "team" / "ad0", "--forecast"),
                         "--forecast", "unrecognized", quiet=True)  # no predictor forecasts (docs/evidence.md)
    assert not err.startswith("lorasum: error: lorasum:"), err


def test_incompatible_adapters_are_refused(tmp_path, run_cli):
    lib = tmp_path / "lib"
    write(lib / "a", 0)
    write(lib / "b", 1, base="gpt2")
    one_line_error(run_cli("similarity", "--matrix", lib, "--out", tmp_path / "m"), "'a'", "'b'",
                   "different base models", absent=tmp_path / "m")
    other = tmp_path / "other"
    write(other / "a", 0)
    write(other / "c", 2, layers=LAYERS[:3])
    one_line_error(run_cli("similarity", "--matrix", other, "--out", tmp_path / "m"), LAYERS[3], "'c'",
                   "same layers", absent=tmp_path / "m")
    shapes = tmp_path / "shapes"
    write(shapes / "a", 0)
    write(shapes / "d", 3, out=5)
    one_line_error(run_cli("similarity", "--matrix", shapes, "--out", tmp_path / "m"), "'d'", "6x8", "5x8",
                   absent=tmp_path / "m")
