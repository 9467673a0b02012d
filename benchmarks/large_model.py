"""A Llama-7B-shaped stack with random weights and random r=16 adapters: time and peak memory of each operation.

The stack is 32 layers (`--layers` runs fewer) of q/k/v/o (4096×4096) and gate/up (11008×4096), down (4096×11008),
bias-free Linear modules named as in a Llama checkpoint, with random weights in `--dtype`. Two or three adapters
(`--adapters`) hold random fp32 factors of rank 16 on every module. Timed through lorasum's library:

- similarity: per-layer cosines and their RMS for every pair (delta.similarity.layer_cosines, rms)
- compose sum: the exact sum in factored form (delta.methods.merge_to_factors, method sum)
- ties / magnitude_prune: merged and refactored to `--max-rank` (merge_to_factors)
- apply+remove sum: the weighted factors added into the weights, then subtracted (delta.apply)
- applied ties: the route of eval/generate/merge (lm.combination.method_terms + delta.apply.applied), merged and
  added one layer at a time, then restored from applied's snapshot of the touched weights

Peak memory is the growth over the value just before each operation: torch.cuda.max_memory_allocated on CUDA, the
process's RSS high-water mark on the CPU (Linux VmHWM, reset through /proc/self/clear_refs). It is printed beside
one module's dense fp32 ΔW and every module's together: a method that held every layer's dense ΔW at once would grow
with `--layers`; compare `--layers 1` with `--layers 4`.

    .venv/bin/python benchmarks/large_model.py --layers 1 --dtype float32 [--adapters 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("LORASUM_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from bench_device import add_device_arg, device_name, device_or_exit, sync, timed  # noqa: E402

from lorasum.delta.apply import applied, apply_adapters, remove_adapters  # noqa: E402
from lorasum.delta.factors import Adapter, LoraFactors  # noqa: E402
from lorasum.delta.methods import merge_to_factors  # noqa: E402
from lorasum.delta.similarity import layer_cosines, rms  # noqa: E402
from lorasum.lm.combination import method_terms  # noqa: E402

HIDDEN, INTERMEDIATE = 4096, 11008
MODULES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTERMEDIATE)}  # (out, in)
WEIGHTS = [1.0, 0.6, -0.4]
OPS = ("similarity", "compose_sum", "ties", "magnitude_prune", "apply_remove_sum", "applied_ties")


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    """Every module's (out, in), by its Llama name."""
    return {f"model.layers.{i}.{m}": s for i in range(layers) for m, s in MODULES.items()}


def stack(layers: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The bias-free Linear modules, named as in a Llama checkpoint, with N(0, 0.02²) weights (no init pass)."""
    root = torch.nn.Module()
    for name, (out, inp) in shapes(layers).items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        lin = torch.nn.Linear(inp, out, bias=False, device="meta").to_empty(device=device)
        with torch.no_grad():
            lin.weight.data = lin.weight.data.to(dtype).normal_(0, 0.02)
        parent.add_module(leaf, lin)
    return root


def adapter(name: str, layers: int, r: int, seed: int, device: torch.device) -> Adapter:
    """Random fp32 factors of rank r on every module (alpha = 2r, so the scale is 2)."""
    g = torch.Generator().manual_seed(seed)
    facs = {n: LoraFactors((torch.randn(r, i, generator=g) / math.sqrt(i)).to(device),
                           (torch.randn(o, r, generator=g) * 0.02).to(device), 2.0)
            for n, (o, i) in shapes(layers).items()}
    return Adapter(name, "", {"r": r, "lora_alpha": 2 * r}, facs)


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def measured(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak memory growth in MiB) of fn on `device`; its result is dropped before the peak is read."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = timed(fn, device)
        return seconds, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
        base, hwm = _kb("VmRSS"), lambda: _kb("VmHWM")
    except OSError:  # no /proc: the process high-water mark, which cannot be reset
        base, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, \
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = timed(fn, device)
    return seconds, (hwm() - base) / 1024


def operations(model, adapters: list[Adapter], density: float, max_rank: int) -> dict[str, Callable[[], object]]:
    """Each operation as a call into lorasum's library."""
    terms = list(zip(adapters, WEIGHTS))
    pairs = [(a, b) for i, a in enumerate(adapters) for b in adapters[i + 1:]]

    def apply_remove() -> None:
        apply_adapters(model, terms)
        remove_adapters(model, terms)

    def applied_ties() -> None:
        with applied(model, method_terms(adapters, WEIGHTS[:len(adapters)], "ties", {"density": density})):
            pass

    return {"similarity": lambda: [rms(layer_cosines(a, b)) for a, b in pairs],
            "compose_sum": lambda: merge_to_factors(terms, "sum", {}, None),
            "ties": lambda: merge_to_factors(terms, "ties", {"density": density}, max_rank),
            "magnitude_prune": lambda: merge_to_factors(terms, "magnitude_prune", {"density": density}, max_rank),
            "apply_remove_sum": apply_remove, "applied_ties": applied_ties}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--adapters", type=int, choices=[2, 3], default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    ap.add_argument("--threads", type=int, default=None)
    add_device_arg(ap)
    args = ap.parse_args()
    device = device_or_exit(args.device)
    ops = args.ops.split(",")
    if args.layers < 1 or any(op not in OPS for op in ops):
        print(f"bench: error: --layers must be ≥ 1 and --ops from {', '.join(OPS)}", file=sys.stderr)
        raise SystemExit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = stack(args.layers, getattr(torch, args.dtype), device)
    adapters = [adapter(f"a{i}", args.layers, args.rank, seed=i, device=device) for i in range(args.adapters)]
    header(args, device)
    for op, fn in operations(model, adapters, args.density, args.max_rank).items():
        if op in ops:
            seconds, peak = measured(fn, device)
            print(f"| {op} | {seconds:.2f} | {peak:.0f} |", flush=True)


def header(args, device: torch.device) -> None:
    """What runs where, with the sizes that tell one layer's dense ΔW from all of them, and the table's head."""
    mods = shapes(args.layers)
    one = max(o * i for o, i in MODULES.values()) * 4 / 2**20
    every = sum(o * i for o, i in mods.values()) * 4 / 2**20
    weights = sum(o * i for o, i in mods.values()) * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"Llama-7B-shaped stack: {args.layers} layer(s), {len(mods)} modules, weights {args.dtype} "
          f"({weights:.0f} MiB), {args.adapters} adapters r={args.rank}, density {args.density}, "
          f"--max-rank {args.max_rank}; device {device_name(device)}, torch threads {torch.get_num_threads()}")
    print(f"one module's dense fp32 ΔW (largest, {INTERMEDIATE}x{HIDDEN}): {one:.0f} MiB; every module's together: "
          f"{every:.0f} MiB; applied's snapshot of the touched weights: {weights:.0f} MiB")
    kind = "GPU max_memory_allocated" if device.type == "cuda" else "RSS high-water"
    print(f"\n| operation | wall s | peak growth MiB ({kind}) |\n|---|---:|---:|", flush=True)


if __name__ == "__main__":
    main()
