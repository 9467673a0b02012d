"""Every weight-space predictor over a library of 200 adapters of SmolLM2-135M's LoRA shapes: seconds and peak memory.

Shapes: 30 layers, q_proj (576→576), k_proj (576→192), v_proj (576→192), o_proj (576→576); with `--mlp` also
gate_proj and up_proj (576→1536) and down_proj (1536→576). r=4, fp32, random factors held as `load_adapter` holds
them (B column-major), built in memory (no files). Each predictor's full N × N matrix (`predictor_matrix`, all
N(N-1)/2 pairs) is timed: one untimed first call, which also gives the peak memory, then `--repeats` timed calls,
median reported, against the 5 s target. Peak memory is the process's peak RSS above the RSS before the call (Linux
VmHWM, reset through /proc/self/clear_refs; tracemalloc does not see torch's allocations). Also timed once: what
`similarity --matrix` adds around the matrix (ranking the pairs, the clustered order, the CSVs and the heatmap).
Accuracy: 20 sampled entries of each matrix against the pairwise functions of WEIGHT_PREDICTORS.

    .venv/bin/python benchmarks/predictor_matrix.py [--adapters 200] [--repeats 3] [--threads 2] [--mlp]
        [--only NAME ...]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rms_matrix import peak_extra_mb  # noqa: E402  (benchmarks/rms_matrix.py: the same RSS measure)

from lorasum.delta.factors import Adapter, LoraFactors  # noqa: E402
from lorasum.delta.library import cluster_order, display_names, rank_pairs, write_library  # noqa: E402
from lorasum.delta.predictors import WEIGHT_PREDICTORS, predictor_matrix  # noqa: E402

ATTN = [("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 192, 576), ("self_attn.v_proj", 192, 576),
        ("self_attn.o_proj", 576, 576)]  # (module, out, in)
MLP = [("mlp.gate_proj", 1536, 576), ("mlp.up_proj", 1536, 576), ("mlp.down_proj", 576, 1536)]
TARGET_S = 5.0


def smollm2_shapes(mlp: bool, layers: int = 30) -> list[tuple[str, int, int]]:
    return [(f"model.layers.{i}.{m}", out, inp) for i in range(layers) for m, out, inp in ATTN + (MLP if mlp else [])]


def random_adapter(name: str, shapes, r: int, seed: int, alpha: float = 32.0) -> Adapter:
    """Random fp32 factors, B column-major as `load_adapter` holds it."""
    g = torch.Generator().manual_seed(seed)
    layers = {n: LoraFactors(torch.randn(r, i, generator=g) / i**0.5,
                             (torch.randn(r, o, generator=g) * 0.02).T, alpha / r) for n, o, i in shapes}
    return Adapter(name, "", {"r": r, "lora_alpha": alpha}, layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--mlp", action="store_true", help="also the MLP projections (gate, up, down)")
    ap.add_argument("--only", nargs="+", default=None, choices=list(WEIGHT_PREDICTORS), metavar="NAME",
                    help="time only these predictors (the rms matrix is computed anyway for the files' timing)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, shapes = args.adapters, smollm2_shapes(args.mlp)
    t0 = time.perf_counter()
    adapters = [random_adapter(f"a{i:03d}", shapes, args.rank, seed=i) for i in range(n)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu ({platform.machine()}); {n} adapters x "
          f"{len(shapes)} layers ({'attention + MLP' if args.mlp else 'attention'}), r={args.rank}, fp32; "
          f"{n * (n - 1) // 2} pairs; built in {time.perf_counter() - t0:.1f} s")

    g = torch.Generator().manual_seed(0)
    sample = [(int(i), int(j)) for i, j in torch.randint(0, n, (40, 2), generator=g).tolist() if i != j][:20]
    print(f"\n{'predictor':<22} {'median s':>9} {'min s':>7} {'peak RSS':>10} {'max |matrix - pairwise|':>24}  "
          f"target {TARGET_S:g} s")
    matrices = {}
    for name, pairwise in WEIGHT_PREDICTORS.items():
        if args.only and name not in args.only:
            continue
        holder = {}
        peak = peak_extra_mb(lambda: holder.setdefault("m", predictor_matrix(adapters, name)), torch.device("cpu"))
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            predictor_matrix(adapters, name)
            times.append(time.perf_counter() - t)
        mat = matrices[name] = holder["m"]
        err = max(abs(float(mat[i, j]) - pairwise(adapters[i], adapters[j])) for i, j in sample)
        med = statistics.median(times)
        verdict = "within" if med <= TARGET_S else "OVER"
        print(f"{name:<22} {med:9.2f} {min(times):7.2f} {peak:7.0f} MiB {err:24.1e}  {verdict}")

    names = display_names(adapters)
    if "rms" not in matrices:
        matrices["rms"] = predictor_matrix(adapters, "rms")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        result = {"names": names, "matrix": matrices["rms"], "pairs": rank_pairs(names, matrices["rms"], "rms"),
                  "order": cluster_order(matrices["rms"], "rms")}
        write_library(Path(d) / "m", result, "rms")
        around = time.perf_counter() - t
    print(f"\nsimilarity --matrix around the rms matrix (rank pairs, cluster order, CSVs, heatmap): {around:.2f} s")
    off = matrices["rms"][~torch.eye(n, dtype=torch.bool)]
    print(f"off-diagonal rms: min {float(off.min()):.4f}, median {float(off.median()):.4f}, max "
          f"{float(off.max()):.4f} (random deltas: about sqrt(mean 1/(out·in)) = "
          f"{math.sqrt(sum(1 / (o * i) for _, o, i in shapes) / len(shapes)):.4f})")
    print("peak RSS: process VmHWM above the RSS before the call (first, untimed call of each predictor)")


if __name__ == "__main__":
    main()
