"""Similarity of two whole adapters: factored (lorasum) vs dense (fp32 B@A per layer, then cosine).

Shapes: GPT-2 small (36 layers: 12× c_attn 768→2304, 12× attn.c_proj 768→768, 12× mlp.c_proj 3072→768; r=4) and one
Llama-7B block (q, k, v, o 4096×4096 and down_proj 4096←11008; r=16), saved as PEFT folders and loaded with
`load_adapter` (loading is not timed). All methods are checked against a dense
float64 reference (max abs difference of the per-layer cosines). Repeats are interleaved; medians are reported.

    .venv/bin/python benchmarks/similarity.py [--repeats 15] [--threads 2] [--device cuda] [--shapes gpt2]

The factors are moved to `--device` (default: cuda if available, else cpu) after loading; on CUDA every timed call
synchronizes before and after. The float64 reference is computed on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_device import add_device_arg, device_name, device_or_exit, timed  # noqa: E402

from lorasum.delta.peft_format import save_adapter
from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.similarity import cosine_from_gram, factored_inner, layer_cosines

GPT2 = [(f"transformer.h.{i}.{m}", out, inp) for i in range(12)
        for m, out, inp in [("attn.c_attn", 2304, 768), ("attn.c_proj", 768, 768), ("mlp.c_proj", 768, 3072)]]
LLAMA = [(f"model.layers.0.self_attn.{p}", 4096, 4096) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [("model.layers.0.mlp.down_proj", 4096, 11008)]


def random_adapter(name: str, shapes, r: int, seed: int, alpha: float = 32.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {n: LoraFactors(torch.randn(r, i, generator=g) / i**0.5, torch.randn(o, r, generator=g) * 0.02, alpha / r)
              for n, o, i in shapes}
    return Adapter(name, "", {"r": r, "lora_alpha": alpha}, layers)


def dense_cosines(a: Adapter, b: Adapter) -> dict[str, float]:
    """The dense way: materialise s·B A in fp32 per layer, then the cosine."""
    out = {}
    for n, fa in a.layers.items():
        fb = b.layers[n]
        da = fa.scale * (fa.B @ fa.A)  # (out, in)
        db = fb.scale * (fb.B @ fb.A)
        out[n] = float((da * db).sum() / (da.norm() * db.norm()))
    return out


def reference64(a: Adapter, b: Adapter) -> dict[str, float]:
    out = {}
    for n, fa in a.layers.items():
        fb = b.layers[n]
        da = fa.scale * (fa.B.double() @ fa.A.double())
        db = fb.scale * (fb.B.double() @ fb.A.double())
        out[n] = float((da * db).sum() / (da.norm() * db.norm()))
    return out


def per_layer_loop(a: Adapter, b: Adapter) -> dict[str, float]:
    """Factored, one layer at a time (three factored inner products per layer), no batching."""
    return {n: cosine_from_gram(factored_inner(fa, b.layers[n]), factored_inner(fa, fa),
                                factored_inner(b.layers[n], b.layers[n])) for n, fa in a.layers.items()}


def saved_and_loaded(adapter: Adapter) -> Adapter:
    """Round-trip through a stock PEFT folder, so the factors are exactly what `load_adapter` gives the CLI."""
    with tempfile.TemporaryDirectory() as d:
        save_adapter(adapter, Path(d) / adapter.name)
        return load_adapter(Path(d) / adapter.name)


def on_device(adapter: Adapter, device: torch.device) -> Adapter:
    """The adapter with its factors moved to `device` (layout kept)."""
    layers = {n: LoraFactors(f.A.to(device), f.B.to(device), f.scale, f.fan_in_fan_out)
              for n, f in adapter.layers.items()}
    return Adapter(adapter.name, adapter.path, adapter.config, layers, adapter.lorasum)


def bench(title: str, shapes, r: int, repeats: int, device: torch.device) -> None:
    cpu = [saved_and_loaded(random_adapter(n, shapes, r, seed)) for n, seed in [("a", 1), ("b", 2)]]
    ref = reference64(*cpu)
    a, b = (on_device(x, device) for x in cpu)
    methods = {"dense fp32": dense_cosines, "factored, layer loop": per_layer_loop,
               "lorasum layer_cosines": layer_cosines}  # the last: batched by shape (what the CLI runs)
    times: dict[str, list[float]] = {k: [] for k in methods}
    errs = {k: max(abs(v - ref[n]) for n, v in fn(a, b).items()) for k, fn in methods.items()}  # also warms up
    for _ in range(repeats):
        for k, fn in methods.items():  # interleaved
            times[k].append(timed(lambda: fn(a, b), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{title}: {len(shapes)} layers, r={r}, {repeats} interleaved repeats (median), on {device_name(device)}")
    for k in methods:
        print(f"  {k:<22} {med[k] * 1e3:10.3f} ms   max |cos - float64 ref| = {errs[k]:.2e}"
              + ("" if k == "dense fp32" else f"   speed-up vs dense: {med['dense fp32'] / med[k]:7.1f}x"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", choices=["gpt2", "llama", "both"], default="both", help="which stacks to time")
    add_device_arg(ap)
    args = ap.parse_args()
    device = device_or_exit(args.device)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device_name(device)}")
    if args.shapes in ("gpt2", "both"):
        bench("GPT-2 small shapes", GPT2, 4, args.repeats, device)
    if args.shapes in ("llama", "both"):
        bench("Llama-7B block shapes", LLAMA, 16, max(3, args.repeats // 3), device)


if __name__ == "__main__":
    main()
