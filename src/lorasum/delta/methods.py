"""Merge methods: how several adapters' per-layer deltas become one.

Each method is one function over one layer here and one row in `delta.registry.METHODS`, which names the function
and declares its parameters. Weighted sums of deltas (`sum`, `mean`, `task_arithmetic`) stay exact in factored form
(ranks concatenated, see delta.compose). The others act on each adapter's dense ΔWᵢ = sᵢ·Bᵢ Aᵢ, (out, in),
elementwise — the form in which trimming, sign election and random dropping mean what their papers say (PEFT's
`*_svd` combinations) — and return a dense ΔW, refactored afterwards by `delta.compose.to_factors`. Sign election,
disjoint mean and random dropping are PEFT's (`peft.utils.merge_utils`). The magnitude trim is written here: PEFT
finds the top-k entries with `torch.topk` at k = 20% of every ΔWᵢ, which costs about ten times a selection of the
k-th magnitude (`numpy.partition`), and the trim is most of the time of `ties`, `magnitude_prune` and `breadcrumbs`
(PEFT lacks breadcrumbs).
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from peft.utils import merge_utils

from ..errors import LorasumError
from .compose import DenseDelta, check_max_rank, concat_factors, error_report, layer_factors, raise_overflow
from .factors import Adapter, LoraFactors, check_compatible, delta_matrix
from .registry import METHODS, method_params


# --- factored methods: Σ cᵢ·sᵢ Bᵢ Aᵢ, one LoRA of rank Σ rᵢ ---------------------------------------------------------
def sum_(terms: list[tuple[LoraFactors, float]]) -> LoraFactors:
    """Exact weighted sum ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ (naive LoRA summation), by rank concatenation.

    Args: terms: each adapter's layer factors and its weight wᵢ.
    Returns: one LoRA with scale 1 and rank Σ rᵢ.
    """
    return concat_factors(terms)


def mean(terms: list[tuple[LoraFactors, float]]) -> LoraFactors:
    """Uniform average ΔW = (1/n) Σ wᵢ ΔWᵢ (model soups, Wortsman et al. 2022, eq. 1 "uniform soup").

    Args: terms: each adapter's layer factors and its weight wᵢ (1 for a plain mean).
    Returns: one LoRA with scale 1 and rank Σ rᵢ.
    """
    return concat_factors([(f, w / len(terms)) for f, w in terms])


def task_arithmetic(terms: list[tuple[LoraFactors, float]], lam: float) -> LoraFactors:
    """Task arithmetic ΔW = λ Σ wᵢ τᵢ with task vectors τᵢ = ΔWᵢ (Ilharco et al. 2023, §2: θ_new = θ + λ Σ τᵢ).

    Args: terms: each adapter's layer factors and weight wᵢ; lam: the scaling coefficient λ.
    Returns: one LoRA with scale 1 and rank Σ rᵢ (λ = 1 is `sum`).
    """
    return concat_factors([(f, lam * w) for f, w in terms])


# --- dense methods: over the stacked ΔWᵢ (n, out, in) and the weights (n,) -----------------------------------------
def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of `magnitude` (ties broken by position, first wins: the order of a stable descending
    sort), found by selecting the k-th largest value instead of sorting.

    Args: magnitude: any shape, no NaN; k: how many to keep (clamped to [0, numel]).
    Returns: a bool mask of `magnitude`'s shape with exactly min(max(k, 0), numel) entries set.
    """
    flat = magnitude.detach().reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(flat, k >= n and n > 0, dtype=torch.bool).reshape(magnitude.shape)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        kth = torch.from_numpy(np.partition(flat.numpy(), n - k)[n - k:n - k + 1])  # the k-th largest, (1,)
    else:  # kthvalue in a dtype that holds every value exactly (bf16/fp16 promoted, float64 kept)
        kth = torch.kthvalue(flat.to(torch.promote_types(flat.dtype, torch.float32)), n - k + 1).values.to(flat.dtype)
    mask = flat > kth
    short = k - int(mask.sum())
    if short:  # entries equal to the k-th largest fill the rest, first by position
        mask[(flat == kth).nonzero().squeeze(1)[:short]] = True
    return mask.reshape(magnitude.shape)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim step (Yadav et al. 2023, Alg. 1 step 1): keep τ's top ⌊density·N⌋ magnitudes, zero the rest.
    PEFT's `magnitude_based_pruning` up to the order among equal magnitudes; density ≥ 1 keeps everything.

    Args: delta: τ, any shape; density: the kept fraction.
    Returns: the trimmed τ, same shape.
    """
    if density >= 1:
        return delta
    return delta * top_k_mask(delta.abs(), int(density * delta.numel()))


def ties(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, Alg. 1): trim each τᵢ to its top-`density` magnitudes, elect the sign
    γ = sgn(Σ τ̂ᵢ) of the unweighted trimmed sum, and average the weighted entries that agree with it (disjoint
    mean). PEFT's `ties`.

    Args: deltas: ΔWᵢ, each (out, in); weights: wᵢ, (n,); density: the kept fraction k.
    Returns: the merged ΔW, (out, in).
    """
    trimmed = torch.stack([trim(d, density) for d in deltas])  # (n, out, in)
    agree = merge_utils.calculate_majority_sign_mask(trimmed, method="total")  # (n, out, in)
    return merge_utils.disjoint_merge(trimmed * weights.to(trimmed.dtype)[:, None, None], agree)


def dare_linear(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE (Yu et al. 2024, eq. 2): drop each entry with probability p = 1 − density, rescale the rest by
    1/(1 − p), then sum with the weights. PEFT's `dare_linear`; the masks come from torch's global RNG.

    Args: deltas: ΔWᵢ, each (out, in); weights: wᵢ, (n,); density: the kept fraction 1 − p.
    Returns: the merged ΔW, (out, in).
    """
    return merge_utils.dare_linear(deltas, weights, density)


def dare_ties(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE drop-and-rescale (Yu et al. 2024, eq. 2) followed by TIES sign election and disjoint mean (Yadav et al.
    2023, Alg. 1 steps 2–3). PEFT's `dare_ties`.

    Args: deltas: ΔWᵢ, each (out, in); weights: wᵢ, (n,); density: the kept fraction 1 − p.
    Returns: the merged ΔW, (out, in).
    """
    return merge_utils.dare_ties(deltas, weights, density)


def magnitude_prune(deltas: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Magnitude pruning of each task vector to its top-`density` entries (the TIES trim step, Yadav et al. 2023,
    Alg. 1 step 1) followed by the weighted sum Σ wᵢ τ̂ᵢ. PEFT's `magnitude_prune`.

    Args: deltas: ΔWᵢ, each (out, in); weights: wᵢ, (n,); density: the kept fraction.
    Returns: the merged ΔW, (out, in).
    """
    trimmed = torch.stack([trim(d, density) for d in deltas])  # (n, out, in)
    return (trimmed * weights.to(trimmed.dtype)[:, None, None]).sum(0)


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2023, §3): rank the entries by |τ|, drop the top ⌊γ·N⌋
    outliers, keep the next ⌊density·N⌋, drop the rest. Ties in |τ| are broken by position (stable sort).

    Args: delta: τ, any shape; density: the kept fraction; gamma: the fraction of largest entries dropped.
    Returns: a 0/1 mask of τ's shape and dtype.
    """
    n = delta.numel()
    top, keep = int(gamma * n), int(density * n)
    magnitude = delta.abs()
    kept = top_k_mask(magnitude, top + keep) & ~top_k_mask(magnitude, top)  # one order: the top ⊂ the top + kept
    return kept.to(delta.dtype)


def breadcrumbs(deltas: list[torch.Tensor], weights: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, eq. 2): ΔW = Σ wᵢ (mᵢ ⊙ τᵢ), each mask mᵢ dropping τᵢ's top-γ
    outliers and its smallest entries so that a `density` fraction remains (see breadcrumbs_mask).

    Args: deltas: ΔWᵢ, each (out, in); weights: wᵢ, (n,); density: the kept fraction; gamma: the outlier fraction.
    Returns: the merged ΔW, (out, in).
    """
    masked = torch.stack([breadcrumbs_mask(d, density, gamma) * d for d in deltas])  # (n, out, in)
    return (weights.to(masked.dtype)[:, None, None] * masked).sum(0)


def kernel(name: str) -> Callable:
    """The function of registry row `name`: the registry is torch-free and names it, this module holds it."""
    return globals()[METHODS[name].fn]


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed from the user's seed and the layer name (sha256), so masks never depend on layer order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{layer}".encode()).digest()[:8], "little") & (2**63 - 1)


def merge_layer(name: str, layer: str, terms: list[tuple[LoraFactors, float]], params: dict) -> LoraFactors | DenseDelta:
    """One layer of method `name` (params as returned by method_params): factors for the factored methods, a
    DenseDelta (out, in) for the dense ones, computed in float32 at least."""
    method, fn = METHODS[name], kernel(name)
    hp = {k: v for k, v in params.items() if k != "seed"}
    if not method.dense:
        return fn(terms, **hp)
    entries = terms[0][0].B.shape[0] * terms[0][0].A.shape[1]
    if "density" in hp and int(hp["density"] * entries) < 1:  # nothing kept: an all-zero delta, never asked for
        raise LorasumError(f"{hp['density']:g} keeps no entry of layer '{layer}' ({entries} entries); use at least "
                           f"{1 / entries:.3g}, e.g. --density 0.2", key="density")
    dtype = torch.promote_types(torch.float32, terms[0][0].A.dtype)
    deltas = [delta_matrix(f, dtype) for f, _ in terms]  # each sᵢ Bᵢ Aᵢ, (out, in)
    device = deltas[0].device
    weights = torch.tensor([w for _, w in terms], dtype=dtype, device=device)
    # the random masks are drawn on the deltas' device: fork its generator too, so the caller's is left as it was
    forked = [device] if device.type == "cuda" else []
    with warnings.catch_warnings(), torch.random.fork_rng(devices=forked):
        warnings.simplefilter("ignore")  # PEFT warns at density 1 ("no pruning will be performed")
        if method.random:
            torch.manual_seed(layer_seed(params["seed"], layer))
        merged = fn(deltas, weights, **hp)
    return DenseDelta(merged, terms[0][0].fan_in_fan_out, sum(f.rank for f, _ in terms))


def merge(adapters: list[tuple[Adapter, float]], method: str = "sum", params: dict | None = None,
          name: str = "merged") -> Adapter:
    """The adapters merged layer by layer with `method`; dense methods leave DenseDelta layers (apply them with
    delta.apply, or make them factors with delta.compose.to_factors). Weights must be finite."""
    out = dict(_merged_layers(adapters, method, params))
    first = adapters[0][0]
    return Adapter(name, "", copy.deepcopy(first.config), out, first.base_record())


def merge_to_factors(adapters: list[tuple[Adapter, float]], method: str = "sum", params: dict | None = None,
                     max_rank: int | None = None, name: str = "merged") -> tuple[Adapter, dict]:
    """`delta.compose.to_factors(merge(...), max_rank)`, one layer at a time: a dense layer is refactored as soon as
    it is merged, so at most one layer's dense ΔWs are held (a 7B-shaped stack's would not fit together)."""
    if max_rank is not None:
        check_max_rank(max_rank)
    layers, norms = {}, {}
    for layer, merged in _merged_layers(adapters, method, params):
        layers[layer], *norms[layer] = layer_factors(merged, max_rank)
        del merged
    first = adapters[0][0]
    return Adapter(name, "", copy.deepcopy(first.config), layers, first.base_record()), error_report(norms, max_rank)


def _merged_layers(adapters: list[tuple[Adapter, float]], method: str, params: dict | None):
    """(layer, merged layer) in layer order, each checked finite; the inputs are checked before the first."""
    if not adapters:
        raise LorasumError("no adapters to merge; pass at least one PATH[:WEIGHT]")
    _check_weights(adapters)
    params = method_params(method, params or {})
    for layer in check_compatible([a for a, _ in adapters]):
        yield layer, _merged_layer(adapters, layer, method, params)


def _check_weights(adapters: list[tuple[Adapter, float]]) -> None:
    """Refuse a weight that is not a finite number, naming its adapter."""
    for a, w in adapters:
        if not math.isfinite(w):
            raise LorasumError(f"weight {w} for adapter '{a.name}' is not a finite number")


def _merged_layer(adapters: list[tuple[Adapter, float]], layer: str, method: str, params: dict
                  ) -> LoraFactors | DenseDelta:
    """One layer of the merge, refused (naming the weight) when it holds Inf or NaN."""
    terms = [(a.layers[layer], float(w)) for a, w in adapters]
    merged = merge_layer(method, layer, terms, params)
    held = merged.delta if isinstance(merged, DenseDelta) else merged.B
    if not torch.isfinite(held).all():
        raise_overflow(adapters, terms, layer)  # names the weight that overflows
    return merged


class MergedLayers(Mapping):
    """A merge's layers computed on access and never kept: whoever walks them (delta.apply, to_factors) holds one
    layer's dense ΔW at a time, where a dict of them would hold every layer's (a 7B-shaped stack's would not fit).
    Each access merges again, the same bits every time (random masks are seeded per layer)."""

    def __init__(self, adapters: list[Adapter], weights: dict[str, list[float]], method: str, params: dict):
        self.adapters, self.weights, self.method, self.params = adapters, weights, method, params

    def __getitem__(self, layer: str) -> LoraFactors | DenseDelta:
        if layer not in self.weights:
            raise KeyError(layer)
        return _merged_layer(list(zip(self.adapters, self.weights[layer])), layer, self.method, self.params)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def shape(self, layer: str) -> tuple[int, int]:
        """The layer's (out, in), known without merging it."""
        return self.adapters[0].layers[layer].shape


def lazy_merge(adapters: list[Adapter], weights: Callable[[str], list[float]], method: str = "sum",
               params: dict | None = None, name: str = "merged") -> Adapter:
    """`merge` with its layers merged on access (MergedLayers), at `weights(layer)` (one per adapter) for each
    layer. The inputs, weights and parameters are checked here, before any layer is merged."""
    if not adapters:
        raise LorasumError("no adapters to merge; pass at least one PATH[:WEIGHT]")
    table = {layer: [float(w) for w in weights(layer)] for layer in adapters[0].layers}
    for ws in table.values():
        _check_weights(list(zip(adapters, ws)))
    params = method_params(method, params or {})
    layers = MergedLayers(adapters, {n: table[n] for n in check_compatible(adapters)}, method, params)
    first = adapters[0]
    return Adapter(name, "", copy.deepcopy(first.config), layers, first.base_record())
