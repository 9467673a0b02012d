"""Weight-space predictors of what summing two adapters costs: each a number per pair, from the factors alone.

For adapters a, b with per-layer deltas ΔW_l = s_l · B_l A_l (l over the L shared layers):

    rms                   sqrt(mean_l cos²_l)                          the paper's (cos_l: the layer-l deltas' cosine)
    max_abs_cosine        max_l |cos_l|
    cross_energy          2 Σ_l ⟨ΔW_a, ΔW_b⟩_l / Σ_l (‖ΔW_a‖²_l + ‖ΔW_b‖²_l)   in [-1, 1]
    norm_ratio            sqrt(Σ_l ‖ΔW_a‖²_l / Σ_l ‖ΔW_b‖²_l)          not symmetric: matrix[i, j] is i's over j's
    symmetric_norm_ratio  max(r, 1/r) with r = norm_ratio              ≥ 1, 1 for equal energies
    a_subspace            mean_l of the A row-space similarity         (subspace.factor_similarity)
    b_subspace            mean_l of the B column-space similarity

Zero deltas never give NaN: a zero delta has cosine 0 with everything (similarity's convention), so rms,
max_abs_cosine and cross_energy read 0 where either delta is zero; norm_ratio is 1 when both are zero and inf (0)
when only b's (a's) is; a zero factor's subspace has rank 0 and similarity 0.

`WEIGHT_PREDICTORS` maps each name to its pairwise function (two Adapters → one float); `predictor_matrix` gives
all N × N values at once. The Gram-based predictors (all but the subspaces) come from one `unit_gram_matrices`
call, the (L, N, N) Gram of the unscaled deltas, as `rms_matrix` does. The subspace ones orthonormalise every
adapter's factors once (batched, numpy's matrix_rank tolerance as `subspace._basis`) and then take one
(Σk, Σk) product of the stacked bases per layer: the cost is about that of the Gram, in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from ..errors import LorasumError
from .factors import Adapter, LoraFactors, check_compatible
from .similarity import _cosines, layer_cosines, layer_inner, layer_norms, unit_gram_matrices
from .similarity import rms as rms_of
from .subspace import factor_similarity, factor_summary


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with torch on one CPU thread, then restore the count (process-wide, like torch's setting).

    For the subspace predictors' many small ops: threading them gains little, and on a busy machine the thread
    hand-offs cost more (2 shared cores: a (576, 4) SVD took ~70 ms on two threads, ~0.1 ms on one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- one pair -----------------------------------------------------------------------------------------------------
def rms(a: Adapter, b: Adapter) -> float:
    """The paper's RMS over layers: sqrt(mean_l cos²_l), cos_l the cosine of the two layer-l deltas."""
    return rms_of(layer_cosines(a, b))


def max_abs_cosine(a: Adapter, b: Adapter) -> float:
    """The largest per-layer |cos_l| (0 where every layer has a zero delta on either side)."""
    return max(abs(c) for c in layer_cosines(a, b).values())


def _energies(a: Adapter, b: Adapter) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per layer: ⟨ΔW_a, ΔW_b⟩, ‖ΔW_a‖², ‖ΔW_b‖²."""
    na, nb = layer_norms(a), layer_norms(b)
    return layer_inner(a, b), {m: v * v for m, v in na.items()}, {m: v * v for m, v in nb.items()}


def _share(cross: float, energy: float) -> float:
    """2·cross / energy, 0 for zero energy (both deltas zero)."""
    return 0.0 if energy == 0.0 else max(-1.0, min(1.0, 2.0 * cross / energy))


def cross_energy_layers(a: Adapter, b: Adapter) -> dict[str, float]:
    """Per layer, the cross term's share of the sum's energy: 2⟨ΔW_a, ΔW_b⟩_l / (‖ΔW_a‖²_l + ‖ΔW_b‖²_l).

    ‖ΔW_a + ΔW_b‖² = (‖ΔW_a‖² + ‖ΔW_b‖²)(1 + this), so it is in [-1, 1]: 1 for equal deltas, -1 for opposite
    ones, 0 for orthogonal ones (and where both are zero).
    """
    inner, ea, eb = _energies(a, b)
    return {m: _share(inner[m], ea[m] + eb[m]) for m in inner}


def cross_energy(a: Adapter, b: Adapter) -> float:
    """Overall cross-term share: 2 Σ_l ⟨ΔW_a, ΔW_b⟩_l / Σ_l (‖ΔW_a‖²_l + ‖ΔW_b‖²_l), in [-1, 1] (0 if both zero).

    Unlike the RMS it weights each layer by its energy, and keeps the sign (opposite deltas cancel)."""
    inner, ea, eb = _energies(a, b)
    return _share(sum(inner.values()), sum(ea.values()) + sum(eb.values()))


def _ratio(ea: float, eb: float) -> float:
    """sqrt(ea / eb): 1 if both are 0, inf if only eb is."""
    if eb == 0.0:
        return 1.0 if ea == 0.0 else math.inf
    return math.sqrt(ea / eb)


def norm_ratio(a: Adapter, b: Adapter) -> float:
    """Overall ‖ΔW_a‖ / ‖ΔW_b‖ = sqrt(Σ_l ‖ΔW_a‖²_l / Σ_l ‖ΔW_b‖²_l) (1 if both are zero, inf if only b's is)."""
    _, ea, eb = _energies(a, b)
    return _ratio(sum(ea.values()), sum(eb.values()))


def symmetric_norm_ratio(a: Adapter, b: Adapter) -> float:
    """max(r, 1/r) with r = norm_ratio(a, b): how many times the larger delta's norm is the smaller's (≥ 1)."""
    r = norm_ratio(a, b)
    return math.inf if r == 0.0 else max(r, 1.0 / r)


def a_subspace(a: Adapter, b: Adapter) -> float:
    """mean_l of the A row-space similarity ‖Q_aᵀQ_b‖²_F / min(k_a, k_b) (Q orthonormal bases of row(A_l))."""
    with one_thread():  # its small SVDs (see one_thread)
        return factor_summary(factor_similarity(a, b))["A"]


def b_subspace(a: Adapter, b: Adapter) -> float:
    """mean_l of the B column-space similarity ‖Q_aᵀQ_b‖²_F / min(k_a, k_b) (Q orthonormal bases of col(B_l))."""
    with one_thread():  # its small SVDs (see one_thread)
        return factor_summary(factor_similarity(a, b))["B"]


WEIGHT_PREDICTORS: dict[str, Callable[[Adapter, Adapter], float]] = {
    "rms": rms,
    "max_abs_cosine": max_abs_cosine,
    "cross_energy": cross_energy,
    "norm_ratio": norm_ratio,
    "symmetric_norm_ratio": symmetric_norm_ratio,
    "a_subspace": a_subspace,
    "b_subspace": b_subspace,
}


# --- all pairs from one Gram --------------------------------------------------------------------------------------
def _rms_matrix(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_l cos²) (N, N) from the unscaled Gram Ĝ (L, N, N) and the scales S (L, N)."""
    return (_cosines(gram, torch.sign(scales)) ** 2).mean(dim=0).sqrt()


def _max_abs_cosine_matrix(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """max_l |cos_l| (N, N)."""
    return _cosines(gram, torch.sign(scales)).abs().amax(dim=0)


def _totals(gram: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, E): C (N, N) = Σ_l s_il s_jl Ĝ_l,ij the summed inner products, E (N,) = its diagonal, the energies."""
    cross = (gram * scales[:, :, None] * scales[:, None, :]).sum(dim=0)  # (N, N)
    return cross, cross.diagonal().clamp_min(0)


def _cross_energy_matrix(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """2 C_ij / (E_i + E_j) (N, N), 0 where both energies are 0."""
    cross, energy = _totals(gram, scales)
    den = energy[:, None] + energy[None, :]  # (N, N)
    share = torch.where(den > 0, 2 * cross / torch.where(den > 0, den, 1.0), torch.zeros_like(cross))
    return share.clamp(-1.0, 1.0)


def _norm_ratio_matrix(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """sqrt(E_i / E_j) (N, N): 1 where both are 0, inf where only E_j is."""
    _, energy = _totals(gram, scales)
    ei, ej = energy[:, None].expand(-1, len(energy)), energy[None, :].expand(len(energy), -1)
    ratio = (ei / torch.where(ej > 0, ej, 1.0)).sqrt()
    return torch.where(ej > 0, ratio, torch.where(ei > 0, math.inf, 1.0))


def _symmetric_norm_ratio_matrix(gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """max(r, 1/r) (N, N), r = sqrt(E_i / E_j) (inf where exactly one energy is 0)."""
    r = _norm_ratio_matrix(gram, scales)
    inv = torch.where(r > 0, 1.0 / torch.where(r > 0, r, 1.0), math.inf)
    return torch.maximum(r, inv)


_GRAM_MATRICES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "rms": _rms_matrix,
    "max_abs_cosine": _max_abs_cosine_matrix,
    "cross_energy": _cross_energy_matrix,
    "norm_ratio": _norm_ratio_matrix,
    "symmetric_norm_ratio": _symmetric_norm_ratio_matrix,
}


# --- all pairs of subspace similarities ---------------------------------------------------------------------------
def _bases(x: torch.Tensor, ranks: list[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of N column spaces at once: x (N, d, r) float64, zero-padded past each rank rᵢ.

    From the small Grams xᵀx = V Σ² Vᵀ (batched eigh of (r, r) matrices): Q = x V Σ⁻¹ holds the left singular
    vectors whose singular value exceeds max(d, rᵢ)·eps·σ_max (numpy's matrix_rank tolerance, as subspace._basis),
    zero columns elsewhere. Through the Gram, σ carries an absolute error of about sqrt(float64 eps)·σ_max ≈ 1e-8·σ_max,
    far below that tolerance (≥ 1e-4·σ_max for fp32 factors), so the ranks are those of the SVD; Q is orthonormal
    to ~float64 eps·(σ_max/σ_min)². (A batched SVD of the tall (d, r) factors gives the same, but on a busy machine
    multi-threaded LAPACK made each one take ~70 ms.)

    Returns:
        Q (N, d, r) and k (N,) the ranks kept.
    """
    gram = x.mT @ x  # (N, r, r)
    if not bool(torch.isfinite(gram).all()):
        raise LorasumError("a LoRA factor holds NaN or infinite values; re-train or re-save the adapter")
    lam, v = torch.linalg.eigh(gram)  # ascending: (N, r), (N, r, r)
    sigma = lam.clamp_min(0).sqrt()  # (N, r)
    dims = torch.tensor([max(x.shape[1], r) for r in ranks], dtype=torch.float64)
    keep = sigma > (dims * eps * sigma[:, -1])[:, None]  # (N, r); a zero factor keeps nothing
    inv = torch.where(keep, 1.0 / torch.where(keep, sigma, 1.0), 0.0)  # (N, r)
    return x @ (v * inv[:, None, :]), keep.sum(dim=1)


def _overlap(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """‖Q_iᵀ Q_j‖²_F / min(k_i, k_j) (N, N) from Q (N, d, r), k (N,); 0 where either rank is 0."""
    n, d, r = q.shape
    flat = q.permute(1, 0, 2).reshape(d, n * r)  # (d, N·r)
    blocks = ((flat.T @ flat) ** 2).view(n, r, n, r).sum(dim=(1, 3))  # (N, N)
    blocks = (blocks + blocks.T) / 2  # exactly symmetric (the product's round-off is not)
    kmin = torch.minimum(k[:, None], k[None, :]).double()
    return torch.where(kmin > 0, blocks / kmin.clamp_min(1), torch.zeros_like(blocks)).clamp(0.0, 1.0)


def _subspace_matrix(adapters: list[Adapter], which: str) -> torch.Tensor:
    """mean_l of the pairwise A row-space (`which` "A") or B column-space ("B") similarities, (N, N)."""
    layers = check_compatible(adapters)
    n = len(adapters)
    total = torch.zeros(n, n, dtype=torch.float64)
    with one_thread():  # per layer a few small ops: on a busy machine threads cost more in hand-offs than they gain
        for m in layers:
            total += _layer_overlap([a.layers[m] for a in adapters], which)
    return total / len(layers)


def _layer_overlap(fs: list[LoraFactors], which: str) -> torch.Tensor:
    """One layer's pairwise A row-space (`which` "A") or B column-space ("B") similarities, (N, N)."""
    n = len(fs)
    mats = [(f.A.T if which == "A" else f.B) for f in fs]  # each (d, rᵢ)
    ranks = [int(x.shape[1]) for x in mats]
    d, rmax = int(mats[0].shape[0]), max(ranks)
    if len(set(ranks)) == 1:
        x = torch.stack([y.detach().cpu() for y in mats]).double()  # (N, d, r)
    else:
        x = torch.zeros(n, d, rmax, dtype=torch.float64)  # zero columns past each rank
        for i, y in enumerate(mats):
            x[i, :, : ranks[i]] = y.detach().cpu().double()
    if rmax == 0:
        return torch.zeros(n, n, dtype=torch.float64)
    eps = torch.finfo(torch.promote_types(mats[0].dtype, torch.float32)).eps
    return _overlap(*_bases(x, ranks, eps))


def predictor_matrix(adapters: list[Adapter], name: str) -> torch.Tensor:
    """All pairwise values (N, N) of predictor `name` (a key of WEIGHT_PREDICTORS), entry [i, j] = f(aᵢ, aⱼ).

    Gram-based predictors: one `unit_gram_matrices` call (the (L, N, N) Gram of the unscaled deltas and the
    (L, N) scales), then elementwise algebra; with fp32 factors the values agree with a float64 dense reference to
    ~1e-6. Subspace predictors: per layer, every adapter's basis once (O(N) batched (r, r) eigendecompositions) and one
    (N·r, N·r) product of the stacked bases gives every pair's overlap (O(N²·r²·d) flops in float64), all on one
    thread (`one_thread`): the per-layer ops are small, and on a busy 2-core machine two threads made them ~6x
    slower, not faster. All symmetric except norm_ratio, whose matrix[i, j] is ‖ΔW_i‖ / ‖ΔW_j‖.

    Args:
        adapters: N ≥ 1 adapters on one base model and target layers (check_compatible).
        name: the predictor.

    Returns:
        float64 tensor (N, N) on the CPU.
    """
    if name not in WEIGHT_PREDICTORS:
        raise LorasumError(f"unknown predictor '{name}'; choose one of {', '.join(WEIGHT_PREDICTORS)}",
                           key="predictor")
    if name in _GRAM_MATRICES:
        _, gram, scales = unit_gram_matrices(adapters)  # (L, N, N), (L, N)
        gram = (gram + gram.mT) / 2  # exactly symmetric (the batched products' round-off is not)
        return _GRAM_MATRICES[name](gram, scales).cpu()
    return _subspace_matrix(adapters, "A" if name == "a_subspace" else "B")
