"""Compose three r=4 adapters and apply them to SmolLM2-135M on CPU, against a bare addmm_ pass and PEFT's path.

Timed side by side (interleaved repeats, medians; the base weights are restored from a snapshot between runs):
  bare        one in-place `W.addmm_(B, A)` per target weight (one r=4 adapter's factors, already in memory)
  bare r=12   the same pass with the composed factors (the three adapters concatenated, rank 12, prepared ahead)
  bare×3      three r=4 passes (one per adapter)
  lorasum     apply_adapters(model, [(a, w) ...]) on loaded adapters: concatenate ranks, one addmm_ per weight
  lorasum+io  load_adapter × 3 from disk, then apply_adapters
  peft        PeftModel.from_pretrained + load_adapter × 2 + add_weighted_adapter(..., "cat") + merge_and_unload
The merged weights of lorasum and PEFT are compared (max abs difference).

    .venv/bin/python benchmarks/compose_apply.py [--repeats 5] [--threads 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lorasum.delta.compose import weighted_sum
from lorasum.delta.peft_format import load_adapter
from lorasum.delta.apply import _base_weight, apply_adapters, restore_weights, snapshot_weights
from lorasum.lm.models import load_model

WEIGHTS = [1.0, 0.5, -0.7]


def make_adapters(model: torch.nn.Module, targets: list[str], root: Path) -> list[Path]:
    """Three stock-PEFT r=4 adapters with random A and B, saved to disk; the model is left unwrapped."""
    from peft import LoraConfig, get_peft_model

    dirs = []
    for i in range(3):
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        pm.save_pretrained(root / f"a{i}")
        model = pm.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
        dirs.append(root / f"a{i}")
    return dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="default: the embedded smollm2-135m")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    t0 = time.perf_counter()
    lm = load_model(args.model)
    model = lm.model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; loaded {lm.model_id} in "
          f"{time.perf_counter() - t0:.1f} s")
    root = Path(tempfile.mkdtemp(prefix="lorasum-bench-"))
    dirs = make_adapters(model, lm.default_targets, root)
    adapters = [load_adapter(d) for d in dirs]
    layers = sorted(adapters[0].layers)
    snap = snapshot_weights(model, layers)
    n_params = sum(v.numel() for v in snap.values())
    print(f"{len(layers)} target weights, {n_params / 1e6:.1f} M parameters; adapters r=4, weights {WEIGHTS}")

    plan = []  # (weight, transposed, B, A) for the bare passes: one per adapter, then the composed rank-12 factors
    for a in adapters + [weighted_sum(list(zip(adapters, WEIGHTS)))]:
        rows = []
        for n in layers:
            w, tr = _base_weight(model, n)
            f = a.layers[n]
            rows.append((w, tr, (f.B * f.scale).contiguous(), f.A.contiguous()))
        plan.append(rows)

    def bare(k: int = 1, first: int = 0) -> None:
        with torch.no_grad():
            for rows in plan[first:first + k]:
                for w, tr, B, A in rows:
                    w.addmm_(A.T, B.T) if tr else w.addmm_(B, A)

    def ours() -> None:
        apply_adapters(model, list(zip(adapters, WEIGHTS)))

    def ours_io() -> None:
        apply_adapters(model, [(load_adapter(d), w) for d, w in zip(dirs, WEIGHTS)])

    def peft() -> None:
        nonlocal model
        pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(str(d), adapter_name=f"a{i}")
        pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, "sum", combination_type="cat")
        pm.set_adapter("sum")
        model = pm.merge_and_unload()
        if hasattr(model, "peft_config"):
            del model.peft_config

    methods = {"bare": bare, "bare r=12": lambda: bare(1, 3), "bare×3": lambda: bare(3), "lorasum": ours,
               "lorasum+io": ours_io, "peft": peft}
    results = {}
    for k, fn in methods.items():  # warm-up and equality check
        restore_weights(model, snap)
        fn()
        results[k] = {n: _base_weight(model, n)[0].detach().clone() for n in layers}
    restore_weights(model, snap)
    diff = max(float((results["lorasum"][n] - results["peft"][n]).abs().max()) for n in layers)
    diff_io = max(float((results["lorasum+io"][n] - results["lorasum"][n]).abs().max()) for n in layers)
    moved = max(float((results["lorasum"][n] - snap[n]).abs().max()) for n in layers)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            restore_weights(model, snap)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.repeats} interleaved repeats (median):")
    for k in methods:
        print(f"  {k:<11} {med[k] * 1e3:9.2f} ms")
    print(f"\nlorasum / bare          = {med['lorasum'] / med['bare']:.2f}x   (target <= 1.5x)")
    print(f"lorasum / bare r=12     = {med['lorasum'] / med['bare r=12']:.2f}x   (same pass with the composed factors)")
    print(f"bare r=12 / bare        = {med['bare r=12'] / med['bare']:.2f}x   (the cost of 3x the rank alone)")
    print(f"lorasum / bare×3        = {med['lorasum'] / med['bare×3']:.2f}x")
    print(f"peft / lorasum+io       = {med['peft'] / med['lorasum+io']:.1f}x   (target >= 10x, both from disk)")
    print(f"peft / lorasum          = {med['peft'] / med['lorasum']:.1f}x")
    print(f"max |W_lorasum - W_peft| = {diff:.2e} (largest weight change {moved:.2e}); io vs memory {diff_io:.1e}")


if __name__ == "__main__":
    main()
