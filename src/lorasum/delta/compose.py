"""Weighted sums of LoRA deltas, kept exact as one LoRA by concatenating along the rank.

Σᵢ wᵢ sᵢ Bᵢ Aᵢ = [w₁s₁B₁ … wₙsₙBₙ] · [A₁; …; Aₙ]: the scales and weights are folded into B, the new scale is 1
and the new rank is Σ rᵢ (PEFT's `cat` combination, which, unlike its `linear`, is a true sum of deltas).
`--max-rank K` compresses each layer by a truncated SVD computed from the small factored core, never a dense ΔW.
Merge methods that work on dense ΔW (see delta.methods) hand back `DenseDelta` layers; `to_factors` refactors them
by a truncated SVD (exact at a cap ≥ the layer's smaller dimension).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from ..errors import LorasumError
from .factors import Adapter, LoraFactors, check_compatible


def concat_factors(terms: list[tuple[LoraFactors, float]], _cache: dict | None = None) -> LoraFactors:
    """One layer: Σ w·s·B A as a single LoRA with scale 1 (weights and scales folded into B's columns)."""
    dtype = torch.promote_types(torch.float32, terms[0][0].A.dtype)
    A = torch.cat([f.A for f, _ in terms], dim=0)  # (Σr, in)
    B = torch.cat([f.B.T for f, _ in terms], dim=0).T  # (out, Σr), column-major like loaded factors
    A, B = (A, B) if A.dtype == dtype and B.dtype == dtype else (A.to(dtype), B.to(dtype))
    key = (dtype, B.device, tuple((w * f.scale, f.rank) for f, w in terms))
    col_scale = None if _cache is None else _cache.get(key)
    if col_scale is None:  # (Σr,): each adapter's w·s repeated over its rank
        col_scale = torch.tensor([c for c, r in key[2] for _ in range(r)], dtype=dtype, device=B.device)
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
    out = {}
    for layer in layers:
        terms = [(a.layers[layer], float(w)) for a, w in adapters]
        out[layer] = concat_factors(terms, cache)
        if not torch.isfinite(out[layer].B).all():
            raise_overflow(adapters, terms, layer)
    return Adapter(name, "", copy.deepcopy(first.config), out, first.base_record())


def raise_overflow(adapters: list[tuple[Adapter, float]], terms: list[tuple[LoraFactors, float]], layer: str):
    """Name the weight whose w·s·B leaves the factors' precision at `layer` (a sum holding Inf is never made)."""
    for (a, w), (f, _) in zip(adapters, terms):
        dtype = torch.promote_types(torch.float32, f.B.dtype)
        big = w * f.scale
        big_t = torch.tensor(big, dtype=dtype, device=f.B.device) if math.isfinite(big) else None
        if big_t is None or not torch.isfinite(f.B.to(dtype) * big_t).all():
            raise LorasumError(f"weight {w:g} for adapter '{a.name}' overflows {str(dtype).removeprefix('torch.')} "
                               f"at layer '{layer}' (weight × scale × lora_B exceeds its range); use a smaller weight")
    raise LorasumError(f"the weighted sum overflows at layer '{layer}'; use smaller weights")


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
    return to_factors(adapter, check_max_rank(max_rank))


def _factored_norm2(f: LoraFactors) -> float:
    """‖s·B A‖²_F = s² Σ((BᵀB) ∘ (A Aᵀ)), without forming B A."""
    B, A = f.B.double(), f.A.double()
    return float(f.scale**2 * ((B.T @ B) * (A @ A.T)).sum())


@dataclass
class DenseDelta:
    """One layer's merged delta held dense, (out, in), whatever the base layout; `cap` is the rank it is refactored
    to when no --max-rank is given (the sum of the input ranks)."""

    delta: torch.Tensor  # (out, in)
    fan_in_fan_out: bool = False
    cap: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.delta.shape[0]), int(self.delta.shape[1])


def factor_dense(d: DenseDelta, k: int) -> tuple[LoraFactors, float, float]:
    """ΔW as LoRA factors of rank ≤ k; returns (factors, error², norm²) in Frobenius.

    k ≥ min(out, in) is exact without an SVD: B = ΔW, A = I when in ≤ out, else B = I, A = ΔW. Otherwise the
    Eckart–Young best rank-k approximation: ΔW = U S Vᵀ, B = U_k √S_k, A = √S_k V_kᵀ, error² = Σ_{i>k} σᵢ².
    """
    W = d.delta  # (out, in)
    out_dim, in_dim = d.shape
    if k >= min(out_dim, in_dim):
        eye = torch.eye(min(out_dim, in_dim), dtype=W.dtype, device=W.device)
        A, B = (eye, W) if in_dim <= out_dim else (W, eye)  # (in, in), (out, in) | (out, in), (out, out)
        return LoraFactors(A.clone(), B.clone(), 1.0, d.fan_in_fan_out), 0.0, float(W.double().pow(2).sum())
    u, s, vh = torch.linalg.svd(W, full_matrices=False)  # (out, m), (m,), (m, in)
    root = s[:k].sqrt()
    B = u[:, :k] * root  # (out, k)
    A = root[:, None] * vh[:k]  # (k, in)
    s2 = s.double().pow(2)
    return LoraFactors(A.contiguous(), B, 1.0, d.fan_in_fan_out), float(s2[k:].sum()), float(s2.sum())


def to_factors(adapter: Adapter, max_rank: int | None = None) -> tuple[Adapter, dict]:
    """Every layer as LoRA factors: dense layers refactored to rank ≤ max_rank (default: each layer's `cap`),
    factored layers compressed only when max_rank is given. Returns the adapter and the relative Frobenius errors,
    per layer and overall (√(Σ error² / Σ norm²))."""
    if max_rank is not None:
        check_max_rank(max_rank)
    layers, norms = {}, {}
    for name, f in adapter.layers.items():
        layers[name], *norms[name] = layer_factors(f, max_rank)
    out = Adapter(adapter.name, adapter.path, copy.deepcopy(adapter.config), layers, adapter.base_record())
    return out, error_report(norms, max_rank)


def layer_factors(f: LoraFactors | DenseDelta, max_rank: int | None) -> tuple[LoraFactors, float, float]:
    """One layer as `to_factors` makes it: (factors, error², norm²)."""
    if isinstance(f, DenseDelta):
        return factor_dense(f, max_rank or f.cap or min(f.shape))
    if max_rank is not None and f.rank > max_rank:
        return truncate_factors(f, max_rank)
    return f, 0.0, _factored_norm2(f)


def error_report(norms: dict[str, tuple[float, float]], max_rank: int | None) -> dict:
    """The relative Frobenius errors from each layer's (error², norm²): per layer, and overall as
    √(Σ error² / Σ norm²)."""
    per_layer = {name: math.sqrt(e / n) if n > 0 else 0.0 for name, (e, n) in norms.items()}
    tot_err2, tot_norm2 = sum(e for e, _ in norms.values()), sum(n for _, n in norms.values())
    overall = math.sqrt(tot_err2 / tot_norm2) if tot_norm2 > 0 else 0.0
    return {"max_rank": max_rank, "overall": overall, "layers": per_layer}


def check_max_rank(max_rank) -> int:
    """A rank cap: a whole number ≥ 1."""
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise LorasumError(f"must be a whole number ≥ 1, got {max_rank!r}", key="max_rank")
    return max_rank
