"""Pairwise RMS matrix for 50 adapters on GPT-2 small shapes (36 layers, r=4): seconds and peak memory.

Side by side (interleaved repeats, medians): the batched Gram (`rms_matrix`, one stacked matmul per shape group)
against a loop over pairs (`layer_cosines` per pair; 100 fixed random pairs, extrapolated to all N(N-1)/2).
Also timed: loading the 50 adapter folders from disk. Peak memory is the process's peak RSS above the baseline
while `rms_matrix` runs (Linux VmHWM, reset through /proc/self/clear_refs). Accuracy: the sampled entries against
the pairwise values, two pairs against dense float64. With `--device cuda` (default: cuda if available, else cpu)
the loaded factors are moved to the GPU, every timed call synchronizes before and after, and the peak is
torch.cuda.max_memory_allocated above what was allocated before.

    .venv/bin/python benchmarks/rms_matrix.py [--adapters 50] [--repeats 3] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_device import add_device_arg, device_name, device_or_exit, timed  # noqa: E402
from similarity import GPT2, on_device, random_adapter  # noqa: E402  (benchmarks/similarity.py: same shapes)

from lorasum.delta.peft_format import save_adapter  # noqa: E402
from lorasum.delta.peft_format import load_adapter  # noqa: E402
from lorasum.delta.similarity import layer_cosines, rms, rms_matrix  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def peak_extra_mb(fn, device: torch.device) -> float:
    """Peak memory increase (MiB) while fn runs: the GPU's allocations on CUDA, else the process's RSS (NaN where
    /proc/self/clear_refs is unavailable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return math.nan
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    add_device_arg(ap)
    args = ap.parse_args()
    device = device_or_exit(args.device)
    torch.set_num_threads(args.threads)
    n = args.adapters
    root = Path(tempfile.mkdtemp(prefix="lorasum-rms-"))
    for i in range(n):
        save_adapter(random_adapter(f"a{i:02d}", GPT2, 4, seed=i), root / f"a{i:02d}")
    dirs = sorted(root.iterdir())
    adapters = [on_device(load_adapter(d), device) for d in dirs]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device_name(device)}; "
          f"{n} adapters x {len(GPT2)} layers, r=4")

    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    g = torch.Generator().manual_seed(0)
    sample = [all_pairs[k] for k in torch.randperm(len(all_pairs), generator=g)[:100].tolist()]
    scale = len(all_pairs) / len(sample)

    def pairwise() -> dict:
        return {(i, j): rms(layer_cosines(adapters[i], adapters[j])) for i, j in sample}

    methods = {f"load {n} folders": lambda: [on_device(load_adapter(d), device) for d in dirs],
               "rms_matrix (batched)": lambda: rms_matrix(adapters), "pairwise loop": pairwise}
    R, P = rms_matrix(adapters), pairwise()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    med["pairwise loop"] *= scale  # extrapolated from the sampled pairs to all pairs
    peak = peak_extra_mb(lambda: rms_matrix(adapters), device)
    err = max(abs(float(R[i, j]) - v) for (i, j), v in P.items())
    dense_err = 0.0
    for i, j in [(0, 1), (n - 2, n - 1)]:
        cos = []
        for name, fa in adapters[i].layers.items():
            fb = adapters[j].layers[name]
            da, db = (f.scale * (f.B.double().cpu() @ f.A.double().cpu()) for f in (fa, fb))
            cos.append(float((da * db).sum() / (da.norm() * db.norm())))
        dense_err = max(dense_err, abs(float(R[i, j]) - math.sqrt(sum(c * c for c in cos) / len(cos))))
    print(f"\n{args.repeats} interleaved repeats (median), on {device_name(device)}:")
    for k in methods:
        print(f"  {k:<22} {med[k]:8.3f} s" + (" (extrapolated from 100 pairs)" if k == "pairwise loop" else ""))
    kind = "GPU allocated" if device.type == "cuda" else "RSS"
    print(f"\nrms_matrix: {med['rms_matrix (batched)']:.3f} s for {n * (n - 1) // 2} pairs, peak memory "
          f"+{peak:.0f} MiB ({kind}); pairwise loop / batched = "
          f"{med['pairwise loop'] / med['rms_matrix (batched)']:.1f}x")
    print(f"max |batched - pairwise| (100 pairs) = {err:.1e}; "
          f"max |batched - dense float64| (2 pairs) = {dense_err:.1e}")
    off = R[~torch.eye(n, dtype=torch.bool)]
    print(f"off-diagonal RMS: min {float(off.min()):.4f}, median {float(off.median()):.4f}, max {float(off.max()):.4f}")


if __name__ == "__main__":
    main()
