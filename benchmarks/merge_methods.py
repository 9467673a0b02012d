"""Each merge method composing three r=4 adapters for SmolLM2-135M on CPU: lorasum against PEFT's matching path.

One timed unit is "load + combine + merge" from three adapter folders on disk into the loaded model's weights:
  lorasum  load_adapter × 3, delta.methods.merge, delta.compose.to_factors (dense results: truncated SVD to the same
           rank PEFT is given; the exact sum: nothing), apply_adapters
  peft     PeftModel.from_pretrained + load_adapter × 2 + add_weighted_adapter(combination_type=…, svd_rank=…,
           density=…) + merge_and_unload
Pairs: sum ↔ cat, sum + --max-rank 4 ↔ svd (rank 4), mean ↔ cat at weights/3, task_arithmetic ↔ cat at λ·weights,
ties ↔ ties_svd, dare_linear ↔ dare_linear_svd, dare_ties ↔ dare_ties_svd, magnitude_prune ↔ magnitude_prune_svd
(dense methods at PEFT's svd_rank = 12, the sum of the input ranks, lorasum's default cap); breadcrumbs has no PEFT
path and is timed alone. Repeats are interleaved, medians reported; the weights are restored from a snapshot between
runs. For the deterministic methods the merged weights of both are compared (max abs difference); DARE draws its
masks from different generators, so only its timing is compared.

    .venv/bin/python benchmarks/merge_methods.py [--repeats 3] [--threads 2] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from compose_apply import make_adapters  # the same three random r=4 stock-PEFT adapters

from lorasum.delta.apply import _base_weight, apply_adapters, restore_weights, snapshot_weights
from lorasum.delta.compose import to_factors
from lorasum.delta.methods import merge
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.models import load_model

WEIGHTS = [1.0, 0.5, -0.7]
DENSITY = 0.2
LAM = 0.6
# lorasum method, its params, its rank cap (None: default) | PEFT combination_type, weights, svd_rank
PAIRS = {
    "sum": (("sum", {}, None), ("cat", WEIGHTS, None)),
    "sum + cap 4": (("sum", {}, 4), ("svd", WEIGHTS, 4)),
    "mean": (("mean", {}, None), ("cat", [w / 3 for w in WEIGHTS], None)),
    "task_arithmetic": (("task_arithmetic", {"lam": LAM}, None), ("cat", [LAM * w for w in WEIGHTS], None)),
    "ties": (("ties", {"density": DENSITY}, None), ("ties_svd", WEIGHTS, 12)),
    "dare_linear": (("dare_linear", {"density": DENSITY}, None), ("dare_linear_svd", WEIGHTS, 12)),
    "dare_ties": (("dare_ties", {"density": DENSITY}, None), ("dare_ties_svd", WEIGHTS, 12)),
    "magnitude_prune": (("magnitude_prune", {"density": DENSITY}, None), ("magnitude_prune_svd", WEIGHTS, 12)),
    "breadcrumbs": (("breadcrumbs", {"density": DENSITY, "gamma": 0.01}, None), None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
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
    layers = sorted(load_adapter(dirs[0]).layers)
    snap = snapshot_weights(model, layers)
    print(f"{len(layers)} target weights; 3 adapters r=4, weights {WEIGHTS}, density {DENSITY}")

    def ours(method: str, params: dict, cap: int | None) -> None:
        merged = merge([(load_adapter(d), w) for d, w in zip(dirs, WEIGHTS)], method, params)
        factors, _ = to_factors(merged, cap)
        apply_adapters(model, [(factors, 1.0)])

    def peft(combination: str, weights: list[float], svd_rank: int | None) -> None:
        nonlocal model
        pm = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(str(d), adapter_name=f"a{i}")
        kw = {"density": DENSITY} if combination not in ("cat", "svd") else {}
        pm.add_weighted_adapter(["a0", "a1", "a2"], weights, "m", combination_type=combination, svd_rank=svd_rank,
                                **kw)
        pm.set_adapter("m")
        model = pm.merge_and_unload()
        if hasattr(model, "peft_config"):
            del model.peft_config

    runs = {}
    for name, (o, p) in PAIRS.items():
        runs[(name, "lorasum")] = (lambda o=o: ours(*o))
        if p is not None:
            runs[(name, "peft")] = (lambda p=p: peft(*p))

    def weights_now() -> dict[str, torch.Tensor]:
        return {n: _base_weight(model, n)[0].detach().clone() for n in layers}

    result = {}
    times: dict = {k: [] for k in runs}
    for round_ in range(args.repeats + 1):  # round 0 warms up and keeps the merged weights
        for key, fn in runs.items():
            t = time.perf_counter()
            fn()
            if round_:
                times[key].append(time.perf_counter() - t)
            else:
                result[key] = weights_now()
            restore_weights(model, snap)
        print(f"round {round_}{' (warm-up)' if not round_ else ''}: "
              + ", ".join(f"{k[0]}/{k[1]} {(times[k][-1] if round_ else 0) * 1e3:.0f}ms" for k in runs)
              if round_ else f"round 0 (warm-up) done in {time.perf_counter() - t0:.0f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"\n{args.repeats} interleaved repeats (median), load + combine + merge into the weights:")
    print(f"  {'method':<16} {'PEFT path':<20} {'lorasum':>10} {'PEFT':>10} {'PEFT/lorasum':>13}  max |ΔW| diff")
    for name, (o, p) in PAIRS.items():
        ours_t = med[(name, "lorasum")]
        if p is None:
            print(f"  {name:<16} {'(none)':<20} {ours_t * 1e3:8.0f}ms {'':>10} {'':>13}")
            continue
        peft_t = med[(name, "peft")]
        diff = "(random masks)" if name.startswith("dare") else \
            f"{max(float((result[(name, 'lorasum')][n] - result[(name, 'peft')][n]).abs().max()) for n in layers):.1e}"
        label = p[0] + (f" r={p[2]}" if p[2] else "")
        print(f"  {name:<16} {label:<20} {ours_t * 1e3:8.0f}ms {peft_t * 1e3:8.0f}ms {peft_t / ours_t:12.1f}x  {diff}")
    moved = max(float((result[("sum", "lorasum")][n] - snap[n]).abs().max()) for n in layers)
    print(f"\nlargest weight change of the sum: {moved:.1e}; targets: every ratio ≥ 1x, sum ≥ 10x")


if __name__ == "__main__":
    main()
