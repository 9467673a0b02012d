"""Similarity of LoRA deltas from their factors, never materialising ΔW.

⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂ · Σ((B₁ᵀB₂) ∘ (A₁A₂ᵀ)), costing O((out + in)·r₁r₂) instead of O(out·in·r).
A weighted *sum* of adapters is itself a LoRA (ranks concatenated, see compose.weighted_sum), so the same formula
compares a sum with an adapter or another sum. Over layers the paper's RMS is sqrt(mean_i cos²θ_i).
For N adapters the layers of equal shape are batched: one (L, out, Σr) Gram matmul per shape group.
Convention: a zero delta has cosine 0 with everything (it is orthogonal to all), so no NaN ever appears.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch

from ..errors import LorasumError
from .compose import weighted_sum
from .factors import Adapter, LoraFactors, check_compatible, module_kind


def factored_inner(f: LoraFactors, g: LoraFactors) -> float:
    """⟨s_f B_f A_f, s_g B_g A_g⟩_F from the factors, in float64."""
    bb = f.B.double().T @ g.B.double()  # (r_f, r_g)
    aa = f.A.double() @ g.A.double().T  # (r_f, r_g)
    return float(f.scale * g.scale * (bb * aa).sum())


def cosine_from_gram(ab: float, aa: float, bb: float) -> float:
    """ab / sqrt(aa·bb), 0 when either delta is zero; clipped to [-1, 1] against round-off."""
    den = math.sqrt(max(aa, 0.0) * max(bb, 0.0))
    return 0.0 if den == 0.0 else max(-1.0, min(1.0, ab / den))


def rms(cosines: dict[str, float] | Iterable[float]) -> float:
    """The paper's RMS over layers: sqrt(mean_i cos²θ_i)."""
    vals = list(cosines.values() if isinstance(cosines, dict) else cosines)
    if not vals:
        raise LorasumError("no layers to average over")
    return math.sqrt(sum(c * c for c in vals) / len(vals))


def _pair_gram(a: Adapter, b: Adapter) -> tuple[list[str], torch.Tensor]:
    return gram_matrices([a, b])  # (L, 2, 2)


def layer_inner(a: Adapter, b: Adapter) -> dict[str, float]:
    """Per-layer Frobenius inner products ⟨ΔW_a, ΔW_b⟩."""
    layers, g = _pair_gram(a, b)
    g = g.tolist()
    return {n: g[i][0][1] for i, n in enumerate(layers)}


def layer_norms(a: Adapter) -> dict[str, float]:
    """Per-layer Frobenius norms ‖ΔW‖_F."""
    layers, g = gram_matrices([a])
    return {n: float(g[i, 0, 0].clamp_min(0).sqrt()) for i, n in enumerate(layers)}


def norm_ratios(a: Adapter, b: Adapter) -> dict[str, float]:
    """Per-layer ‖ΔW_a‖ / ‖ΔW_b‖ (inf where only b's delta is zero, 1 where both are); the scales' ratio is taken
    apart from the unscaled norms', so huge weights do not overflow it."""
    layers, g, s = unit_gram_matrices([a, b])
    out = {}
    for i, n in enumerate(layers):
        na, nb = math.sqrt(max(float(g[i, 0, 0]), 0.0)), math.sqrt(max(float(g[i, 1, 1]), 0.0))
        sa, sb = abs(float(s[i, 0])), abs(float(s[i, 1]))
        if nb * sb == 0:
            out[n] = 1.0 if na * sa == 0 else math.inf
        else:
            out[n] = (sa / sb) * (na / nb)
    return out


def layer_cosines(a: Adapter, b: Adapter) -> dict[str, float]:
    """Per-layer cos θ between the two deltas (see cosine_matrices)."""
    layers, cos = cosine_matrices([a, b])
    return {n: float(cos[i, 0, 1]) for i, n in enumerate(layers)}


def _as_delta(x: Adapter | list[tuple[Adapter, float]]) -> Adapter:
    return x if isinstance(x, Adapter) else weighted_sum(list(x))


def cosine_of_sum(blocks: Adapter | list[tuple[Adapter, float]],
                  other: Adapter | list[tuple[Adapter, float]]) -> dict[str, float]:
    """Per-layer cos(Σ wᵢ ΔWᵢ, other): the weight-space view of the paper's hypothesis (e.g. Table 5).

    Each side is an Adapter or a list of (Adapter, weight) summed exactly. Use rms() for the summary.
    """
    return layer_cosines(_as_delta(blocks), _as_delta(other))


# ---------------------------------------------------------------------------------------------------------------
def gram_matrices(adapters: list[Adapter], dtype: torch.dtype = torch.float64,
                  compute_dtype: torch.dtype | None = None) -> tuple[list[str], torch.Tensor]:
    """All pairwise per-layer inner products: (layers, G) with G (L, N, N), G[l, i, j] = ⟨ΔW_i, ΔW_j⟩ at layer l.

    G = sᵢ sⱼ · unit_gram (see unit_gram_matrices); an inner product beyond float64's range is ±inf, as it truly is.
    """
    layers, gram, scales = unit_gram_matrices(adapters, dtype, compute_dtype)
    gram *= scales[:, :, None] * scales[:, None, :]
    return layers, gram


def unit_gram_matrices(adapters: list[Adapter], dtype: torch.dtype = torch.float64,
                       compute_dtype: torch.dtype | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(layers, Ĝ, S): Ĝ (L, N, N) the Gram of the unscaled deltas Bᵢ Aᵢ, S (L, N) the scales sᵢ (weights included),
    so that ⟨ΔW_i, ΔW_j⟩ = sᵢ sⱼ Ĝᵢⱼ. Kept apart, a huge weight never overflows a cosine (scale-invariant).

    Layers of equal (out, in, ranks) are stacked layer-major: Btcat (L, R, out) holds B₁ᵀ … B_Nᵀ and Acat (L, R, in)
    holds A₁ … A_N, so H = (Btcat Btcatᵀ) ∘ (Acat Acatᵀ) is (L, R, R) with R = Σ rᵢ; summing each (adapter, adapter)
    rank block of H (Pᵀ H P, P the (R, N) block indicator) gives Ĝ.
    The two Gram products run in `compute_dtype` (default: the factors' own precision, at least float32 — reading
    and converting the factors is what costs; float64 where float32 overflows); the small Hadamard products and
    block sums run in `dtype`. With fp32 factors the cosines agree with a float64 dense reference to ~1e-9 (tests
    hold them to 1e-6; the dense fp32 way: ~1e-7); compute_dtype=torch.float64 gives agreement to float64 round-off
    at about twice the cost.
    """
    layers = check_compatible(adapters)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for li, name in enumerate(layers):
        fs = [a.layers[name] for a in adapters]
        groups[(fs[0].shape, tuple(f.rank for f in fs))].append(li)
    n = len(adapters)
    if compute_dtype is None:
        compute_dtype = torch.promote_types(adapters[0].layers[layers[0]].A.dtype, torch.float32)
    device = adapters[0].layers[layers[0]].A.device  # the results live where the factors do
    gram = torch.empty(len(layers), n, n, dtype=dtype, device=device)
    scales = torch.tensor([[a.layers[m].scale for a in adapters] for m in layers], dtype=dtype, device=device)  # (L, N)
    for ((out, inp), ranks), idx in groups.items():
        names = [layers[i] for i in idx]
        gram[idx] = _group_gram(adapters, names, out, inp, ranks, dtype, compute_dtype)
    return layers, gram, scales


def _group_gram(adapters: list[Adapter], names: list[str], out: int, inp: int, ranks: tuple[int, ...],
                dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    """Ĝ (L, N, N) of one group of equal-shape layers; redone in float64 if the Gram products overflow float32."""
    n, L, R = len(adapters), len(names), sum(ranks)
    # loaded factors hold B column-major, so each Bᵀ is a contiguous block and the concatenation is a memcpy
    Bt = torch.cat([a.layers[m].B.T for m in names for a in adapters]).to(compute_dtype).view(L, R, out)
    A = torch.cat([a.layers[m].A for m in names for a in adapters]).to(compute_dtype).view(L, R, inp)
    H = torch.bmm(Bt, Bt.mT).to(dtype) * torch.bmm(A, A.mT).to(dtype)  # (L, R, R)
    if compute_dtype != torch.float64 and not torch.isfinite(H).all():
        return _group_gram(adapters, names, out, inp, ranks, torch.float64, torch.float64).to(dtype)
    if len(set(ranks)) == 1:  # equal ranks: block sums by a reshape
        r = ranks[0]
        return H.view(L, n, r, n, r).sum(dim=(2, 4))
    P = torch.zeros(R, n, dtype=dtype, device=H.device)  # (R, N) block indicator
    P[torch.arange(R), torch.repeat_interleave(torch.arange(n), torch.tensor(ranks))] = 1.0
    return P.T @ H @ P  # (L, N, N)


def cosine_matrices(adapters: list[Adapter]) -> tuple[list[str], torch.Tensor]:
    """Per-layer pairwise cosines (L, N, N) (zero deltas give 0, see module doc), from the unscaled Gram and the
    scales' signs: exactly invariant to positive weights, sign-flipped by negative ones, however large."""
    layers, gram, scales = unit_gram_matrices(adapters)
    return layers, _cosines(gram, torch.sign(scales))


def _cosines(gram: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Cosines from a Gram (L, N, N) and per-delta signs (L, N) (0 for a zero scale: a zero delta)."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt() * signs.abs()  # (L, N)
    den = norms[:, :, None] * norms[:, None, :]
    cos = torch.where(den > 0, gram / torch.where(den > 0, den, 1.0), torch.zeros_like(gram))
    return (cos * signs[:, :, None] * signs[:, None, :]).clamp(-1.0, 1.0)


def rms_matrix(adapters: list[Adapter]) -> torch.Tensor:
    """Pairwise RMS (N, N): sqrt(mean over layers of cos²)."""
    _, cos = cosine_matrices(adapters)
    return (cos**2).mean(dim=0).sqrt()


def _display_names(adapters: list[Adapter]) -> list[str]:
    names = [a.name for a in adapters]
    return names if len(set(names)) == len(names) else [a.path or a.name for a in adapters]


def similarity_report(adapters: list[Adapter]) -> dict:
    """{"adapters": [...], "pairs": [{"a", "b", "layers": {layer: cos}, "rms"}], "kinds": {layer: attn|mlp},
    "rms_matrix": N × N pairwise RMS as rms_matrix() (its diagonal is 0 for an all-zero delta, else 1)}."""
    if len(adapters) < 2:
        raise LorasumError("similarity needs at least two adapters: lorasum similarity A B [C ...]")
    layers, cos = cosine_matrices(adapters)
    names = _display_names(adapters)
    pairs = []
    for i in range(len(adapters)):
        for j in range(i + 1, len(adapters)):
            per = {m: float(cos[li, i, j]) for li, m in enumerate(layers)}
            pairs.append({"a": names[i], "b": names[j], "layers": per, "rms": rms(per)})
    matrix = (cos**2).mean(dim=0).sqrt()  # as rms_matrix(), from the same cosines
    return {"adapters": names, "pairs": pairs, "kinds": {m: module_kind(m) for m in layers},
            "rms_matrix": matrix.tolist()}


def scaled(adapter: Adapter, weight: float) -> Adapter:
    """`weight` · ΔW as an Adapter (scales multiplied; named `w*name`, its path `path:w`, when weight ≠ 1)."""
    if weight == 1.0:
        return adapter
    layers = {n: LoraFactors(f.A, f.B, f.scale * weight, f.fan_in_fan_out) for n, f in adapter.layers.items()}
    return Adapter(f"{weight:g}*{adapter.name}", f"{adapter.path}:{weight:g}", adapter.config, layers,
                   adapter.lorasum)
