"""Apply and remove weighted LoRA deltas in a loaded model's weights, in place; `applied` for "apply, run, restore".

For a Linear weight W (out, in): W += sign·Σ wᵢ sᵢ Bᵢ Aᵢ. For GPT-2's Conv1D, W is (in, out) and the delta is
(α/r · B A)ᵀ (the paper's eq. 1), added as W += Aᵀ Bᵀ. Several adapters are concatenated along the rank first,
so each weight is touched by one `addmm_`. A merge method's dense layer (`DenseDelta`, (out, in)) is added as it
is (transposed for Conv1D). Every layer is validated before any weight changes. A merge whose layers are computed on
access (`delta.methods.MergedLayers`) is walked one layer at a time: merged, checked, added and dropped before the
next, so one layer's dense delta is held at once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import LorasumError
from .compose import DenseDelta, weighted_sum
from .factors import Adapter, LoraFactors
from .methods import MergedLayers


def _base_weight(model: torch.nn.Module, layer: str, modules: dict | None = None) -> tuple[torch.Tensor, bool]:
    """The layer's weight parameter and whether it is stored (in, out) (Conv1D)."""
    module = (modules if modules is not None else dict(model.named_modules())).get(layer)
    if module is None:
        raise LorasumError(f"layer '{layer}' is not in the model ({type(model).__name__}); "
                           "use the base model the adapter was trained on")
    module = getattr(module, "base_layer", module)  # a PEFT-wrapped layer: edit its base weight
    if isinstance(module, Conv1D):
        return module.weight, True
    if isinstance(module, torch.nn.Linear):
        return module.weight, False
    raise LorasumError(f"layer '{layer}' is a {type(module).__name__}, not Linear/Conv1D; "
                       "use the base model the adapter was trained on")


def _resolve(model: torch.nn.Module, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """Validate every layer's (out, in) against the model (existence, type, shape) before anything is changed."""
    out, modules = {}, dict(model.named_modules())
    for layer, shape in shapes.items():
        w, transposed = _base_weight(model, layer, modules)
        want = shape[::-1] if transposed else shape
        if tuple(w.shape) != want:
            raise LorasumError(f"layer '{layer}': the model's weight is {tuple(w.shape)} but the adapter's delta is "
                               f"{want}; use the base model the adapter was trained on")
        out[layer] = (w, transposed)
    return out


def _compute_factors(f: LoraFactors, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """A (r, in) and B (out, r) on the weight's device, in the dtype the update is computed in (fp32 at least)."""
    cd = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    A, B = f.A, f.B
    if A.dtype != cd or A.device != w.device or B.dtype != cd or B.device != w.device:
        A, B = A.to(device=w.device, dtype=cd), B.to(device=w.device, dtype=cd)
    return A, B, cd


def _updated(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, transposed: bool) -> torch.Tensor:
    """W + alpha · B A (transposed for Conv1D) as a new tensor in W's dtype."""
    d = alpha * (A.T @ B.T if transposed else B @ A)
    return (w.to(d.dtype) + d).to(w.dtype)


def _may_overflow(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> bool:
    """Whether |W + alpha·B A| could leave W's range: a cheap bound (max|W| + |alpha| Σₖ max|B₍:,ₖ₎| max|Aₖ|);
    only where it is not clearly safe is the update computed once more to check it exactly."""
    limit = torch.finfo(w.dtype).max / 2
    bound = abs(alpha) * float((B.abs().amax(0).double() * A.abs().amax(1).double()).sum())
    return not bound + float(w.abs().max()) < limit


def _dense_in_layout(d: DenseDelta, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The dense delta in the weight's layout, on its device, in fp32 at least: (out, in), or (in, out) for Conv1D."""
    cd = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    D = d.delta.to(device=w.device, dtype=cd)
    return D.T if transposed else D


def _check_finite(resolved: dict, layers: dict[str, LoraFactors | DenseDelta], sign: float, what: str) -> None:
    """Refuse, before any weight changes, a delta that would turn a finite weight into Inf or NaN."""
    with torch.no_grad():
        for layer, f in layers.items():
            w, transposed = resolved[layer]
            if isinstance(f, DenseDelta):
                new = w.to(torch.promote_types(w.dtype, torch.float32)) + sign * _dense_in_layout(f, w, transposed)
                if (torch.isfinite(w) & ~torch.isfinite(new.to(w.dtype))).any():
                    raise LorasumError(f"{what} would make the model's weights at layer '{layer}' Inf or NaN "
                                       f"({str(w.dtype).removeprefix('torch.')} overflows); use a smaller weight")
                continue
            A, B, _ = _compute_factors(f, w)
            alpha = sign * f.scale
            if math.isfinite(alpha) and not _may_overflow(w, A, B, alpha):
                continue
            new = _updated(w, A, B, alpha, transposed) if math.isfinite(alpha) else None
            if new is None or (torch.isfinite(w) & ~torch.isfinite(new)).any():
                raise LorasumError(f"{what} would make the model's weights at layer '{layer}' Inf or NaN "
                                   f"({str(w.dtype).removeprefix('torch.')} overflows); use a smaller weight")


def apply_factors(model: torch.nn.Module, layers: dict[str, LoraFactors | DenseDelta], sign: float = 1.0,
                  what: str = "the adapter delta") -> None:
    """In place W += sign · s · B A per layer, or W += sign · ΔW for a dense layer (transposed for Conv1D); `what`
    names the delta in errors."""
    resolved = _resolve(model, {n: f.shape for n, f in layers.items()})
    _check_finite(resolved, layers, sign, what)
    _add_layers(resolved, layers, sign)


def _add_layers(resolved: dict, layers: dict[str, LoraFactors | DenseDelta], sign: float) -> None:
    """Add each (checked) layer into its resolved weight in place."""
    with torch.no_grad():
        for layer, f in layers.items():
            w, transposed = resolved[layer]
            if isinstance(f, DenseDelta):
                D = _dense_in_layout(f, w, transposed)
                w.add_(D, alpha=sign) if D.dtype == w.dtype else w.copy_((w.to(D.dtype) + sign * D).to(w.dtype))
                continue
            A, B, cd = _compute_factors(f, w)
            alpha = sign * f.scale
            if cd == w.dtype:
                if transposed:
                    w.addmm_(A.T, B.T, alpha=alpha)  # (in, r) @ (r, out)
                else:
                    w.addmm_(B, A, alpha=alpha)  # (out, r) @ (r, in)
            else:  # half precision: add in fp32, round once
                w.copy_(_updated(w, A, B, alpha, transposed))


def apply_layerwise(model: torch.nn.Module, layers: MergedLayers, weight: float = 1.0, sign: float = 1.0,
                    what: str = "the merged delta") -> None:
    """In place W += sign · weight · ΔW for a merge computed on access, one layer at a time: each layer is merged,
    checked, added and dropped before the next is asked for, so one layer's dense ΔW is held at once. Every layer's
    shape is validated first; an overflow found at a later layer leaves the earlier ones added, so call it inside
    `applied` (which restores them from its snapshot) or discard the model on error."""
    resolved = _resolve(model, {n: layers.shape(n) for n in layers})
    for layer in layers:
        one = {layer: _scaled(layers[layer], weight)}
        _check_finite(resolved, one, sign, what)
        _add_layers(resolved, one, sign)
        del one  # the next layer's merge must not meet this one's ΔW still alive


def apply_adapters(model: torch.nn.Module, adapters: list[tuple[Adapter, float]], sign: float = 1.0) -> None:
    """In place W += sign · Σ wᵢ · sᵢ · Bᵢ Aᵢ over all layers of the adapters (which must share their layers).

    A layer missing in the model, of another type, or of another shape, or a sum that would make a weight Inf or
    NaN, raises LorasumError naming it; no weight is changed in that case, except for a merge computed on access,
    which is added one layer at a time (see apply_layerwise).
    """
    if not adapters:
        return
    what = "adapters " + " + ".join(f"{w:g}*{a.name}" for a, w in adapters)
    if len(adapters) == 1:
        a, w = adapters[0]
        what = f"adapter '{a.name}' at weight {w:g}"
        if isinstance(a.layers, MergedLayers):
            apply_layerwise(model, a.layers, float(w), sign, what)
            return
        layers = {n: _scaled(f, float(w)) for n, f in a.layers.items()}
    else:
        layers = weighted_sum(adapters).layers
    apply_factors(model, layers, sign, what)


def _scaled(f: LoraFactors | DenseDelta, w: float) -> LoraFactors | DenseDelta:
    if isinstance(f, DenseDelta):
        return f if w == 1.0 else DenseDelta(f.delta * w, f.fan_in_fan_out, f.cap)
    return LoraFactors(f.A, f.B, f.scale * w, f.fan_in_fan_out)


def remove_adapters(model: torch.nn.Module, adapters: list[tuple[Adapter, float]]) -> None:
    """Subtract what `apply_adapters(model, adapters)` added (exact up to round-off; prefer restore_weights)."""
    apply_adapters(model, adapters, sign=-1.0)


def snapshot_weights(model: torch.nn.Module, layer_names) -> dict[str, torch.Tensor]:
    """Copies of the named layers' base weights, for restore_weights (no round-off accumulates)."""
    modules = dict(model.named_modules())
    return {name: _base_weight(model, name, modules)[0].detach().clone() for name in layer_names}


def restore_weights(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Copy the snapshot back into the model's weights in place."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, saved in snapshot.items():
            _base_weight(model, name, modules)[0].copy_(saved)


@contextlib.contextmanager
def applied(model: torch.nn.Module, adapters: list[tuple[Adapter, float]]) -> Iterator[torch.nn.Module]:
    """`with applied(model, [(a, 1.0), (b, -0.5)]):` the model holds base + Σ wᵢ ΔWᵢ inside the block; on exit
    (also on error) the touched weights are restored bit-for-bit from a snapshot, never by subtraction."""
    layers = sorted({n for a, _ in adapters for n in a.layers})
    snap = snapshot_weights(model, layers)
    try:
        apply_adapters(model, adapters)
        yield model
    finally:
        restore_weights(model, snap)


def check_model_matches(adapter: Adapter, model_id: str | None, fingerprint: str | None = None) -> None:
    """The adapter's recorded base (id, and weight hash when both are known) is the loaded model."""
    if adapter.base_id and model_id and adapter.base_id.lower() != model_id.lower():
        raise LorasumError(f"adapter '{adapter.name}' was trained on '{adapter.base_id}' but the model is "
                           f"'{model_id}'; pass --model {adapter.base_id}")
    if fingerprint and adapter.base_sha256 and fingerprint != adapter.base_sha256:
        raise LorasumError(f"adapter '{adapter.name}' was trained on other weights of '{adapter.base_id}' "
                           "(weights_sha256 differs from the loaded model); use the same base model file")
