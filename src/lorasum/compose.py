"""Weighted sums of LoRA deltas, kept exact as one LoRA by concatenating along the rank.

Σᵢ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ … wₙsₙBₙ] · [A₁; …; Aₙ]: the scales and weights are folded into B, the new scale is 1
and the new rank is Σ rᵢ (PEFT's `cat` combination, which, unlike its `linear`, is a true sum of deltas).
`--max-rank K` compresses each layer by a truncated SVD computed from the small factored core, never a dense ΔW.
"""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import torch

from .delta import CONFIG_FILE, LORASUM_FILE, WEIGHTS_FILE, Adapter, LoraFactors, check_compatible
from .errors import LorasumError
from .files import atomic_dir, atomic_write_json


def concat_factors(terms: list[tuple[LoraFactors, float]], _cache: dict | None = None) -> LoraFactors:
    """One layer: Σ w·s·B A as a single LoRA with scale 1 (weights and scales folded into B's columns)."""
    dtype = torch.promote_types(torch.float32, terms[0][0].A.dtype)
    A = torch.cat([f.A for f, _ in terms], dim=0)  # (Σr, in)
    B = torch.cat([f.B.T for f, _ in terms], dim=0).T  # (out, Σr), column-major like loaded factors
    A, B = (A, B) if A.dtype == dtype and B.dtype == dtype else (A.to(dtype), B.to(dtype))
    key = (dtype, tuple((w * f.scale, f.rank) for f, w in terms))
    col_scale = None if _cache is None else _cache.get(key)
    if col_scale is None:  # (Σr,): each adapter's w·s repeated over its rank
        col_scale = torch.tensor([c for c, r in key[1] for _ in range(r)], dtype=dtype)
        if _cache is not None:
            _cache[key] = col_scale
    return LoraFactors(A, B.mul_(col_scale), 1.0, terms[0][0].fan_in_fan_out)


def weighted_sum(adapters: list[tuple[Adapter, float]], name: str = "sum") -> Adapter:
    """The exact weighted sum of adapters (weights may be negative) as one concatenated-rank Adapter (scale 1)."""
    if not adapters:
        raise LorasumError("no adapters to sum; pass at least one PATH[:WEIGHT]")
    for a, w in adapters:
        if not math.isfinite(w):
            raise LorasumError(f"weight {w} for adapter '{a.name}' is not a finite number")
    layers = check_compatible([a for a, _ in adapters])
    first = adapters[0][0]
    cache: dict = {}
    out = {layer: concat_factors([(a.layers[layer], float(w)) for a, w in adapters], cache) for layer in layers}
    return Adapter(name, "", copy.deepcopy(first.config), out, first.base_record())


def truncate_factors(f: LoraFactors, k: int) -> tuple[LoraFactors, float, float]:
    """Best rank-k approximation of s·B A from its factored SVD; returns (factors, error², norm²) in Frobenius.

    B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so s·B A = Q_B (s R_B R_Aᵀ) Q_Aᵀ and only the (r, r) core is decomposed.
    """
    dtype = f.A.dtype
    B, A = f.B.double(), f.A.double()  # (out, r), (r, in)
    qb, rb = torch.linalg.qr(B)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(A.T)  # (in, r), (r, r)
    u, s, vh = torch.linalg.svd(f.scale * (rb @ ra.T))  # core (r, r)
    norm2 = float((s**2).sum())
    err2 = float((s[k:] ** 2).sum())
    root = s[:k].sqrt()
    new_B = (qb @ u[:, :k]) * root  # (out, k)
    new_A = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    return LoraFactors(new_A.to(dtype), new_B.to(dtype), 1.0, f.fan_in_fan_out), err2, norm2


def compress(adapter: Adapter, max_rank: int) -> tuple[Adapter, dict]:
    """SVD-compress every layer to rank ≤ max_rank; report relative Frobenius errors per layer and overall.

    Layers whose rank is already ≤ max_rank are kept exactly (error 0).
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LorasumError(f"--max-rank must be a whole number ≥ 1, got {max_rank!r}")
    layers, per_layer = {}, {}
    tot_err2 = tot_norm2 = 0.0
    for name, f in adapter.layers.items():
        if f.rank <= max_rank:
            layers[name], err2, norm2 = f, 0.0, _factored_norm2(f)
        else:
            layers[name], err2, norm2 = truncate_factors(f, max_rank)
        per_layer[name] = math.sqrt(err2 / norm2) if norm2 > 0 else 0.0
        tot_err2 += err2
        tot_norm2 += norm2
    overall = math.sqrt(tot_err2 / tot_norm2) if tot_norm2 > 0 else 0.0
    out = Adapter(adapter.name, adapter.path, copy.deepcopy(adapter.config), layers, adapter.base_record())
    return out, {"max_rank": max_rank, "overall": overall, "layers": per_layer}


def _factored_norm2(f: LoraFactors) -> float:
    """‖s·B A‖²_F = s² Σ((BᵀB) ∘ (A Aᵀ)), without forming B A."""
    B, A = f.B.double(), f.A.double()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


# ---------------------------------------------------------------------------------------------------------------
def save_adapter(adapter: Adapter, out: str | os.PathLike, extra_meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write `adapter` as a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), atomically.

    Scales are folded into the factors, so the config sets lora_alpha = r (scale 1) per layer, with
    rank_pattern/alpha_pattern for layers whose rank differs from the most common one. Target modules are the
    exact layer paths.
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorasumError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LorasumError(f"--out {out} exists and is not empty; choose a new folder or remove it")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, f in adapter.layers.items():
        # fold the scale into B so the stored adapter has scale 1 (lora_alpha == r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (f.B * f.scale).contiguous()
        ranks[name] = f.rank
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = copy.deepcopy(adapter.config)
    config.update({
        "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(adapter.layers), "exclude_modules": None, "layers_to_transform": None,
        "layers_pattern": None, "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "bias": "none",
        "inference_mode": True,
        "peft_type": "LORA",
    })
    meta = {**adapter.base_record(), **(extra_meta or {})}  # the base identity carries over, training records don't
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
        if meta:
            atomic_write_json(tmp / LORASUM_FILE, meta)
    return out


def parse_max_rank(text: str | int | None) -> int | None:
    """`--max-rank K`: a whole number ≥ 1, or None."""
    if text is None:
        return None
    try:
        k = int(str(text).strip())
    except ValueError:
        k = 0
    if k < 1:
        raise LorasumError(f"--max-rank must be a whole number ≥ 1, got '{text}'")
    return k


def compose(adapter_args: list[str] | list[tuple[str, float]], out: str | os.PathLike,
            max_rank: int | None = None) -> dict:
    """`lorasum compose`: load PATH[:WEIGHT] adapters, sum them exactly, optionally compress, save a PEFT folder.

    Returns a report: inputs, output path, rank, and (with max_rank) the relative Frobenius errors.
    """
    from .delta import load_adapter, parse_adapter_arg
    from .files import check_out_path

    check_out_path(out, "--out")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise LorasumError(f"--max-rank must be a whole number ≥ 1, got {max_rank!r}")
    parsed = [parse_adapter_arg(a) if isinstance(a, str) else (str(a[0]), float(a[1])) for a in adapter_args]
    if not parsed:
        raise LorasumError("compose needs at least one adapter: lorasum compose A B[:W] ... --out DIR")
    adapters = [(load_adapter(p), w) for p, w in parsed]
    total = weighted_sum(adapters, name=Path(out).name)
    errors = None
    if max_rank is not None:
        total, errors = compress(total, max_rank)
    record = {"composition": {
        "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters],
        "max_rank": max_rank, "relative_error": errors["overall"] if errors else 0.0,
    }}
    save_adapter(total, out, extra_meta=record)
    ranks = sorted({f.rank for f in total.layers.values()})
    return {"out": str(out), "adapters": record["composition"]["adapters"], "rank": ranks[-1],
            "layers": len(total.layers), "max_rank": max_rank,
            "relative_error": errors["overall"] if errors else 0.0,
            "layer_errors": errors["layers"] if errors else {}}
