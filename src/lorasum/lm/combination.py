"""The one route from adapters and a merge method to what is applied or saved.

`method_terms` is what every caller applies in place (`eval`, `generate`, `merge`, `search-weights` and the grid's
eval jobs): the adapters at their weights for the exact sum (summed as they are applied), else one adapter holding
the method's merge at weight 1, its layers merged on access so that applying it holds one layer's dense ΔW at a
time. `combine` is that merge: lorasum's own methods
(delta.methods) or PEFT's (lm.peft_merge, on a loaded model); with per-module weights ({'w0.attn': …}, the weight
search's) attention and MLP layers are merged at their own weights. `compose` saves a combination as one stock PEFT
adapter folder (`lorasum compose`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..delta.compose import to_factors
from ..delta.factors import Adapter, check_compatible, module_kind
from ..delta.methods import lazy_merge, merge_to_factors
from ..delta.peft_format import load_terms, save_adapter
from ..delta.registry import method_label, needs_model
from ..errors import LorasumError
from .adapters import check_base
from .models import LoadedModel
from .peft_merge import check_combinable, peft_method

GROUPS = ("attn", "mlp")  # per-module weights: one per adapter for each
Weights = list[float] | dict[str, float]  # one per adapter, or one per adapter and group: {'w0.attn': …}


def layer_group(layer: str) -> str:
    """'mlp' for feed-forward modules, else 'attn' (every other target sits in attention)."""
    return "mlp" if module_kind(layer) == "mlp" else "attn"


def method_terms(adapters: list[Adapter], weights: Weights, method: str, params: dict,
                 lm: LoadedModel | None = None, name: str = "merged") -> list[tuple[Adapter, float]]:
    """What to apply in place: the exact sum's adapters at their weights (summed as applied), or the method's one
    merged adapter at weight 1. `lm` is needed for PEFT's methods only."""
    if method == "sum" and isinstance(weights, (list, tuple)):
        return [(a, float(w)) for a, w in zip(adapters, weights)]
    return [(combine(adapters, weights, method, params, lm, name), 1.0)]


def combine(adapters: list[Adapter], weights: Weights, method: str, params: dict, lm: LoadedModel | None = None,
            name: str = "merged") -> Adapter:
    """The adapters combined by `method` at `weights`: a lorasum merge whose layers are merged on access
    (delta.methods.lazy_merge: applying it or refactoring it holds one layer's dense ΔW at a time) or, for PEFT's
    methods, PEFT's own on `lm`. Per-module weights merge each group's layers at its weights, so per layer this is
    exactly the merge at that layer's weights."""
    flat = _per_adapter(weights, len(adapters))
    if needs_model(method):
        if flat is None:
            raise LorasumError(f"{method} takes one weight per adapter, not one per module group", key="method")
        combined = peft_method(method)(lm, list(zip(adapters, flat)), **params)
        combined.name = name
        return combined
    if flat is not None:
        return lazy_merge(adapters, lambda layer: flat, method, params, name)
    return lazy_merge(adapters, lambda layer: [weights[f"w{i}.{layer_group(layer)}"] for i in range(len(adapters))],
                      method, params, name)


def _per_adapter(weights: Weights, n: int) -> list[float] | None:
    """One weight per adapter (from a list, or a mapping holding `w0` … `w{n-1}`); None for per-module weights."""
    if isinstance(weights, (list, tuple)):
        return [float(w) for w in weights]
    if all(f"w{i}" in weights for i in range(n)):
        return [float(weights[f"w{i}"]) for i in range(n)]
    return None


def merged_name(terms: list[tuple[Adapter, float]], method: str, params: dict) -> str:
    """`ties(density=0.2)[1*math + 0.5*medicine]`: the merged adapter as eval, generate and merge name it."""
    return method_label(method, params) + "[" + " + ".join(f"{w:g}*{a.name}" for a, w in terms) + "]"


def check_combination(terms: list[tuple[Adapter, float]], method: str) -> None:
    """Refuse before a model is loaded what combining would refuse after: adapters that do not share layers and, for
    PEFT's methods, what its add_weighted_adapter refuses (different ranks)."""
    if needs_model(method):
        check_combinable(terms, method)
    else:
        check_compatible([a for a, _ in terms])


def compose(terms: list[tuple[str, float]], out: str | Path, max_rank: int | None = None, method: str = "sum",
            params: dict | None = None, load: Callable[[], LoadedModel] | None = None) -> dict:
    """Load the adapters, merge them with `method` (default: the exact sum), make every layer LoRA factors (dense
    results by truncated SVD to `max_rank`, default the sum of the input ranks; factored ones compressed only with
    max_rank), save one stock PEFT folder. `load` gives the model, called for PEFT's own methods only, after the
    adapters are checked.

    Returns a report: inputs, method, output path, rank, and the relative Frobenius errors per layer and overall.
    """
    if not terms:
        raise LorasumError("compose needs at least one adapter: lorasum compose A B[:W] ... --out DIR")
    params = params or {}
    adapters = load_terms(terms)
    if needs_model(method):
        check_combinable(adapters, method)  # what PEFT would refuse, before the model is loaded for it
        lm = load()
        check_base(lm, adapters)
        merged = combine([a for a, _ in adapters], [w for _, w in adapters], method, params, lm, Path(out).name)
        total, errors = to_factors(merged, max_rank)
    else:  # lorasum's own methods: each dense layer refactored as it is merged
        total, errors = merge_to_factors(adapters, method, params, max_rank, name=Path(out).name)
    record = {"composition": {
        "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters],
        "method": method, "params": params, "max_rank": max_rank, "rank": max(f.rank for f in total.layers.values()),
        "relative_error": errors["overall"], "layer_errors": errors["layers"],
    }}
    save_adapter(total, out, extra_meta=record)
    c = record["composition"]
    return {"out": str(out), "adapters": c["adapters"], "method": method, "params": params, "rank": c["rank"],
            "layers": len(total.layers), "max_rank": max_rank, "relative_error": errors["overall"],
            "layer_errors": errors["layers"], "layer_ranks": {n: f.rank for n, f in total.layers.items()}}
