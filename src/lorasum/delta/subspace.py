"""Factor-level diagnostics for LoRA deltas: how much of two deltas' cosine their factor subspaces explain, and what
the paper's RMS would read for unrelated random deltas.

ΔW = s·B A lives in col(B) ⊗ row(A). Adapters that start from one random A (PEFT draws A, zeroes B) and train
briefly keep nearly the same row(A), so the delta cosine can reflect the shared initialisation rather than
shared learning. `factor_similarity` separates the two factors: the similarity of the A row spaces and of the
B column spaces, each the mean squared cosine of the principal angles between the subspaces (Björck & Golub 1973),
which depends on the subspaces only — not on scale, sign or any invertible r × r mixing B A = (B M⁻¹)(M A).
`null_rms` gives the reference the RMS should be compared with: its value for independent Gaussian factors.
"""

from __future__ import annotations

import math

import torch

from ..errors import LorasumError
from .factors import Adapter, check_compatible


def _basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, k) of the numerically non-null column space of x (d, r), in float64.

    Singular values at or below max(d, r) · eps · σ_max count as null (numpy.linalg.matrix_rank's rule), with eps
    that of x's own precision (at least float32's): round-off in a float32 rank-1 factor must not pass for rank.
    """
    eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    x = x.double()
    if not bool(torch.isfinite(x).all()):
        raise LorasumError("a LoRA factor holds NaN or infinite values; re-train or re-save the adapter")
    if x.numel() == 0:
        return x[:, :0]
    u, s, _ = torch.linalg.svd(x, full_matrices=False)  # u (d, min(d, r)), s descending
    tol = max(x.shape) * eps * float(s[0])  # a zero matrix: tol 0, no singular value above it, rank 0
    return u[:, s > tol]  # (d, k)


def subspace_similarity(x: torch.Tensor, y: torch.Tensor) -> float:
    """Similarity of the column spaces of x (d, r₁) and y (d, r₂): mean squared cosine of their principal angles.

    ‖Q₁ᵀQ₂‖²_F / min(k₁, k₂), with Q orthonormal bases of the numerically non-null parts (true ranks k, so a
    rank-1 factor in a rank-4 slot counts as rank 1). 1 when one space contains the other, 0 when orthogonal,
    unchanged by x → x M for any invertible M. Computed in float64.

    Args:
        x: (d, r₁) matrix, e.g. a B factor, or Aᵀ for the row space of A.
        y: (d, r₂) matrix in the same ambient dimension d.

    Returns:
        A value in [0, 1]; 0.0 when either matrix has rank 0 (a zero factor shares no direction).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise LorasumError("subspace similarity needs two matrices with equal row counts, got shapes "
                           f"{tuple(x.shape)} and {tuple(y.shape)}")
    qx, qy = _basis(x), _basis(y)  # (d, k₁), (d, k₂)
    k = min(qx.shape[1], qy.shape[1])
    if k == 0:
        return 0.0
    overlap = float(((qx.T @ qy) ** 2).sum())  # Σ cos² of the k principal angles
    return max(0.0, min(1.0, overlap / k))


def factor_similarity(a: Adapter, b: Adapter) -> dict[str, dict[str, float]]:
    """Per-layer similarity of the two adapters' factor subspaces.

    Shared-initialisation diagnostic: A ≈ 1 with B small means the deltas share row(A) but not what was learned
    into B. Scales and weights do not enter (a subspace has no length).

    Args:
        a, b: adapters on the same base model and target layers (as `check_compatible`).

    Returns:
        {layer: {"A": similarity of the A row spaces, "B": similarity of the B column spaces}}, layers sorted.
    """
    out = {}
    for layer in check_compatible([a, b]):
        fa, fb = a.layers[layer], b.layers[layer]
        out[layer] = {"A": subspace_similarity(fa.A.T, fb.A.T), "B": subspace_similarity(fa.B, fb.B)}
    return out


def factor_summary(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """Means over layers of a `factor_similarity` result.

    Args:
        per_layer: {layer: {"A": x, "B": y}}.

    Returns:
        {"A": mean over layers of the A row-space similarity, "B": the same for the B column spaces}.
    """
    if not per_layer:
        raise LorasumError("no layers to average over")
    n = len(per_layer)
    return {k: sum(v[k] for v in per_layer.values()) / n for k in ("A", "B")}


def _gaussian_gram(n: int, R: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Gᵀ G (samples, R, R) for G (n, R) with iid N(0, 1) entries, drawn from its exact law without forming G.

    Bartlett's decomposition: Gᵀ G ~ Wishart_R(n, I) = L Lᵀ with L lower triangular, L_ii² ~ χ²_{n-i} (i = 0 …
    R-1), L_ij ~ N(0, 1) below the diagonal, all independent — O(R²) numbers per sample instead of n·R. For n < R
    (a singular Wishart) G is drawn as is, which is then as cheap.
    """
    if n < R:
        g = torch.randn(samples, n, R, generator=gen, dtype=torch.float64)  # (samples, n, R)
        return g.mT @ g
    L = torch.randn(samples, R, R, generator=gen, dtype=torch.float64).tril(-1)  # (samples, R, R)
    half_df = (torch.arange(n, n - R, -1, dtype=torch.float64) / 2).expand(samples, R).contiguous()
    # χ²_k = 2·Gamma(k/2); torch's own Gamma distribution samples with this function, which takes a generator
    chi2 = 2 * torch._standard_gamma(half_df, generator=gen)  # (samples, R)
    L = L + torch.diag_embed(chi2.sqrt())
    return L @ L.mT


def _null_cos2(out: int, inp: int, r1: int, r2: int, samples: int, gen: torch.Generator) -> torch.Tensor:
    """cos² (samples,) between B₁A₁ and B₂A₂, iid N(0, 1) factors of ranks r₁, r₂, from the factors' Grams.

    With B = [B₁ B₂] (out, R) and A = [A₁; A₂] (R, in), R = r₁ + r₂, H = (BᵀB) ∘ (A Aᵀ) (R, R) has rank blocks
    that sum to ⟨ΔW_i, ΔW_j⟩ (the factored Gram of similarity.gram_matrices), so only the two Gram matrices
    are needed, and those are drawn from their exact law (`_gaussian_gram`): no (out, in) product appears.
    """
    R = r1 + r2
    H = _gaussian_gram(out, R, samples, gen) * _gaussian_gram(inp, R, samples, gen)  # (samples, R, R)
    inner = H[:, :r1, r1:].sum(dim=(1, 2))
    n1, n2 = H[:, :r1, :r1].sum(dim=(1, 2)), H[:, r1:, r1:].sum(dim=(1, 2))
    return inner**2 / (n1 * n2)  # Gaussian factors: both norms are > 0 almost surely


def null_rms(a: Adapter, b: Adapter, samples: int = 200, seed: int = 0) -> dict:
    """The paper's RMS = sqrt(mean over layers of cos²) for unrelated deltas: a reference for `similarity`'s RMS.

    Closed form: for a fixed X and Y = B A with iid N(0, 1) entries (B (out, r), A (r, in)),
    ⟨X, Y⟩ = Σₖ bₖᵀ X aₖ gives E⟨X, Y⟩² = r‖X‖² and E‖Y‖² = r·out·in, so E cos² ≈ 1/(out·in). (It is exact:
    Y's law is invariant under Y → U Y V for orthogonal U, V, so E[(Y/‖Y‖)(Y/‖Y‖)ᵀ] = I/(out·in) by Schur's
    lemma.) Hence closed_form = sqrt(mean_l 1/(out_l·in_l)) is sqrt(E RMS²), the root mean square of the RMS; the
    sampled mean of the RMS lies a little below it (Jensen: sqrt(mean² + sd²) matches it instead), the more so the
    fewer the layers.

    Sampled: per layer, `samples` pairs of independent Gaussian deltas with the factor shapes of a's and b's layer,
    their cosines from the factored inner product and norms (the factors' Gram matrices drawn from their exact
    Wishart law, so the cost does not grow with out·in), then the RMS over layers per sample.

    Args:
        a, b: adapters on the same base model and target layers (only their factor shapes are used).
        samples: number of random adapter pairs drawn (≥ 2).
        seed: seed of the torch.Generator; equal seeds give equal figures.

    Returns:
        {"closed_form": sqrt(mean_l 1/(out_l·in_l)), "mean": mean of the sampled RMS, "sd": its sample standard
        deviation, "samples": samples}.
    """
    if samples < 2:
        raise LorasumError(f"null_rms needs at least 2 samples for a standard deviation, got {samples}")
    layers = check_compatible([a, b])
    gen = torch.Generator().manual_seed(seed)
    cos2 = torch.zeros(samples, dtype=torch.float64)
    inv = 0.0
    for layer in layers:
        fa, fb = a.layers[layer], b.layers[layer]
        out, inp = fa.shape
        if fa.rank == 0 or fb.rank == 0:
            continue  # a rank-0 layer is a zero delta: cosine 0 (similarity's convention), in both figures
        inv += 1.0 / (out * inp)
        cos2 += _null_cos2(out, inp, fa.rank, fb.rank, samples, gen)
    sampled = (cos2 / len(layers)).sqrt()  # (samples,) RMS per random pair
    return {"closed_form": math.sqrt(inv / len(layers)), "mean": float(sampled.mean()),
            "sd": float(sampled.std()), "samples": samples}
