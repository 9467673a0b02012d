"""A library of adapters: every pair's weight-space predictor, the pairs ranked to combine, and the clustered matrix.

`find_adapters` turns folders into adapter folders (a folder holding adapter_config.json is an adapter, else its
immediate subfolders that hold one are), `library_matrix` loads them and computes one predictor for every pair
(`predictors.predictor_matrix`), `rank_pairs` orders the pairs from least to most interfering and `cluster_order`
reorders the matrix by average-linkage hierarchical clustering (scipy) for the heatmap; `write_library` writes
matrix.csv, pairs.csv and heatmap.png into one folder, atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import torch
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from ..charts import heatmap_png
from ..errors import LorasumError
from ..files import atomic_dir, atomic_write_bytes, atomic_write_text
from .factors import Adapter, check_compatible
from .peft_format import CONFIG_FILE, load_adapter
from .predictors import predictor_matrix
from .registry import RATIO_PREDICTORS

SIGNED = frozenset({"cross_energy"})  # predictors whose sign means something (drawn on a diverging scale)


def find_adapters(dirs: list[str | os.PathLike]) -> list[Path]:
    """Adapter folders, in order: each dir itself if it holds adapter_config.json, else its immediate subfolders
    that do (sorted by name); a folder given twice counts once.

    Raises:
        LorasumError: a dir that is not a folder, or one with no adapter in it or directly below it.
    """
    found: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise LorasumError(f"{d} is not a folder; pass adapter folders or folders of them", key="matrix")
        here = [d] if (d / CONFIG_FILE).is_file() else \
            sorted(p for p in d.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
        if not here:
            raise LorasumError(f"{d} holds no adapter: neither it nor its immediate subfolders have {CONFIG_FILE}",
                               key="matrix")
        found += [p for p in here if p.resolve() not in {q.resolve() for q in found}]
    return found


def display_names(adapters: list[Adapter]) -> list[str]:
    """The folder names, or the paths where two folders share a name."""
    names = [a.name for a in adapters]
    return names if len(set(names)) == len(names) else [a.path for a in adapters]


def interference(predictor: str, value: float) -> float:
    """How much a pair is expected to interfere, for ranking: |value|, or |log value| for the ratio predictors
    (inf for a zero or infinite ratio)."""
    if predictor in RATIO_PREDICTORS:
        return math.inf if value <= 0 or math.isinf(value) else abs(math.log(value))
    return abs(value)


def rank_pairs(names: list[str], matrix: torch.Tensor, predictor: str) -> list[tuple[str, str, float]]:
    """Every pair i < j as (name_i, name_j, matrix[i, j]), least interfering first (see `interference`); ties keep
    the pairs' order."""
    n = len(names)
    pairs = [(i, j, float(matrix[i, j])) for i in range(n) for j in range(i + 1, n)]
    pairs.sort(key=lambda p: interference(predictor, p[2]))
    return [(names[i], names[j], v) for i, j, v in pairs]


def distances(matrix: torch.Tensor, predictor: str) -> torch.Tensor:
    """(N, N) dissimilarities for clustering: 1 - |value| for similarities, |log value| (symmetrised, infinities
    capped above the largest finite one) for ratios; zero diagonal."""
    m = matrix.double()
    if predictor in RATIO_PREDICTORS:
        d = m.clamp_min(0).log().abs()
        d = (d + d.T) / 2
        finite = d[torch.isfinite(d)]
        d = torch.where(torch.isfinite(d), d, 2 * (float(finite.max()) if finite.numel() else 0.0) + 1)
    else:
        d = (1 - m.abs()).clamp_min(0)
        d = (d + d.T) / 2
    return d.fill_diagonal_(0.0)


def cluster_order(matrix: torch.Tensor, predictor: str) -> list[int]:
    """The leaf order of average-linkage hierarchical clustering on `distances` (scipy), optimal leaf ordering."""
    n = matrix.shape[0]
    if n < 3:
        return list(range(n))
    condensed = squareform(distances(matrix, predictor).numpy(), checks=False)
    return [int(i) for i in leaves_list(linkage(condensed, method="average", optimal_ordering=True))]


def library_matrix(dirs: list[str | os.PathLike], predictor: str) -> dict:
    """Load the adapters under `dirs` (find_adapters) and compute `predictor` for every pair.

    Returns:
        {"names": N display names, "paths": their folders, "matrix": (N, N) float64 tensor, "pairs": rank_pairs,
        "order": cluster_order}.

    Raises:
        LorasumError: fewer than 2 adapters, or adapters of different base models or target layers/shapes.
    """
    folders = find_adapters(dirs)
    if len(folders) < 2:
        raise LorasumError(f"found 1 adapter ({folders[0]}); a matrix needs at least 2", key="matrix")
    adapters = [load_adapter(f) for f in folders]
    check_compatible(adapters)
    names = display_names(adapters)
    matrix = predictor_matrix(adapters, predictor)
    return {"names": names, "paths": [str(f) for f in folders], "matrix": matrix,
            "pairs": rank_pairs(names, matrix, predictor), "order": cluster_order(matrix, predictor)}


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_library(out: str | os.PathLike, result: dict, predictor: str) -> Path:
    """matrix.csv (header row and column of names, entries repr'd so they read back exactly), pairs.csv (a, b,
    value; least interfering first) and heatmap.png (the matrix in cluster order without its diagonal, with a
    colourbar) in `out`,
    published at once (files.atomic_dir; the caller has checked `out` against the output rule)."""
    names, matrix, order = result["names"], result["matrix"], result["order"]
    values = matrix.tolist()
    table = [[predictor, *names]] + [[n, *map(repr, row)] for n, row in zip(names, values)]
    pairs = [["a", "b", predictor]] + [[a, b, repr(v)] for a, b, v in result["pairs"]]
    shown = [[values[i][j] if i != j else math.nan for j in order] for i in order]  # self-pairs left out (grey)
    title = f"{predictor} between {len(names)} adapters (clustered, average linkage; diagonal left out)"
    label = f"{predictor} (row / column)" if predictor == "norm_ratio" else predictor
    png = heatmap_png(shown, [names[i] for i in order], title, label, signed=predictor in SIGNED,
                      log=predictor in RATIO_PREDICTORS)
    with atomic_dir(out, overwrite=True) as tmp:
        atomic_write_text(tmp / "matrix.csv", _csv(table))
        atomic_write_text(tmp / "pairs.csv", _csv(pairs))
        atomic_write_bytes(tmp / "heatmap.png", png)
    return Path(out)
