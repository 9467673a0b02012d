"""What PEFT users get: adapters combined by PEFT's own `add_weighted_adapter` on a loaded model, as comparison rows
beside lorasum's merge methods (delta.methods).

PEFT's `linear` and `ties` combine the A's and the B's separately (A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ for `linear`),
so the product B A holds cross terms Bᵢ Aⱼ that no adapter has: these rows show what that costs. The model is
wrapped by PEFT for the combination and unwrapped afterwards; its weights are never changed. Their registry rows
(parameters included) are `delta.registry.PEFT_METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ..delta.factors import Adapter, LoraFactors, check_compatible
from ..delta.registry import PEFT_METHODS
from ..errors import LorasumError
from .models import LoadedModel

COMBINED = "lorasum_combined"


def peft_linear(loaded: LoadedModel, adapters: list[tuple[Adapter, float]]) -> Adapter:
    """PEFT's `add_weighted_adapter(combination_type="linear")`: A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ (sign on A)."""
    return peft_combined(loaded, adapters, "linear")


def peft_ties(loaded: LoadedModel, adapters: list[tuple[Adapter, float]], density: float) -> Adapter:
    """PEFT's `add_weighted_adapter(combination_type="ties")`: TIES (Yadav et al. 2023, Alg. 1) applied to the A's
    and to the B's separately, each weighted by √(wᵢsᵢ)."""
    return peft_combined(loaded, adapters, "ties", density=density)


def peft_method(name: str) -> Callable:
    """The function of PEFT's registry row `name` (delta.registry.PEFT_METHODS names it; it takes the model first)."""
    return globals()[PEFT_METHODS[name].fn]


def check_combinable(adapters: list[tuple[Adapter, float]], method: str) -> None:
    """Refuse what PEFT's add_weighted_adapter would refuse only after a model is loaded: adapters that do not share
    layers, or (with more than one) ranks that differ."""
    if not adapters:
        raise LorasumError("no adapters to combine; pass at least one PATH[:WEIGHT]")
    check_compatible([a for a, _ in adapters])
    ranks = sorted({f.rank for a, _ in adapters for f in a.layers.values()})
    if len(adapters) > 1 and len(ranks) > 1:
        raise LorasumError(f"{method} (PEFT's add_weighted_adapter) needs every adapter at one rank, got ranks "
                           f"{', '.join(map(str, ranks))}; use --method sum (exact, any ranks)", key="method")


def peft_combined(loaded: LoadedModel, adapters: list[tuple[Adapter, float]], combination: str,
                  name: str = "peft", **kwargs) -> Adapter:
    """Load the adapters' folders into PEFT on `loaded.model`, combine them with `combination`, and return the
    combined adapter's factors (layer names as the base model's). PEFT's refusal is a LorasumError naming it."""
    if not adapters:
        raise LorasumError("no adapters to combine; pass at least one PATH[:WEIGHT]")
    check_compatible([a for a, _ in adapters])
    for a, _ in adapters:
        if not a.path:
            raise LorasumError(f"adapter '{a.name}' has no folder; PEFT combines only adapters saved on disk")
    model = loaded.model
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = [f"a{i}" for i in range(len(adapters))]
    pm = None
    try:
        pm = PeftModel.from_pretrained(model, adapters[0][0].path, adapter_name=names[0])
        for n, (a, _) in zip(names[1:], adapters[1:]):
            pm.load_adapter(a.path, adapter_name=n)
        try:
            pm.add_weighted_adapter(names, [w for _, w in adapters], COMBINED, combination_type=combination, **kwargs)
        except ValueError as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LorasumError(f"PEFT's add_weighted_adapter cannot combine these adapters with combination_type "
                               f"'{combination}' ({why.rstrip('.')}); use --method sum (exact, any ranks)") from None
        layers = {}
        for layer, module in pm.base_model.model.named_modules():
            if isinstance(module, LoraLayer) and COMBINED in module.lora_A:
                A = module.lora_A[COMBINED].weight.detach().clone()  # (r, in)
                B = module.lora_B[COMBINED].weight.detach().clone()  # (out, r)
                fan = adapters[0][0].layers[layer].fan_in_fan_out
                layers[layer] = LoraFactors(A, B, float(module.scaling[COMBINED]), fan)
    finally:
        if pm is not None:
            pm.unload()  # removes the LoRA layers, restoring the base modules in place
        if hasattr(model, "peft_config"):
            del model.peft_config
        with torch.no_grad():
            for n, p in model.named_parameters():  # PEFT froze the base: give back its requires_grad flags
                p.requires_grad_(grad_flags.get(n, p.requires_grad))
    first = adapters[0][0]
    return Adapter(name, "", dict(first.config), layers, first.base_record())
