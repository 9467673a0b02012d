"""Serving several adapters kept separate and routed, instead of merged into the weights.

Arrow (Ostapenko et al. 2024, arXiv 2405.11157) is PEFT's own: `create_arrow_model` loads the adapters beside the
base weights, and in every adapted layer mixes, per token, the `top_k` adapters whose prototype (the top right
singular vector of B·A) is most aligned with the token's hidden state, with a softmax at `router_temperature` over
their scores. GenKnowSub (given general-domain adapters) first subtracts their mean from every adapter's factors.
lorasum checks the adapters, builds the router through PEFT, runs it and removes it again; it never re-implements
it.

Under CPU bfloat16 autocast PEFT 0.21's Arrow layer fails (`scatter(): Expected self.dtype to be equal to src.dtype`:
its scores leave autocast in bfloat16 and are scattered into a float32 buffer). lorasum runs each Arrow layer — the
router and the adapters' low-rank path — with autocast off, in the adapters' own float32, and leaves the base
model's layers under autocast as in every other row.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..delta.apply import applied
from ..delta.factors import Adapter, check_compatible
from ..errors import LorasumError
from .models import LoadedModel

ARROW_SEED = 0  # seeds the power iteration behind the prototypes: a route is reproducible


def check_routable(terms: list[tuple[Adapter, float]], params: dict, general: list[Adapter] = ()) -> list[Adapter]:
    """The adapters Arrow can route: at weight 1, each from its own PEFT folder, one rank and one set of layers
    (PEFT refuses others only after loading them into the model); `top_k` at most their number."""
    if len(terms) < 2:
        raise LorasumError("arrow routes between adapters: pass at least two --adapter", key="route")
    for a, w in terms:
        if w != 1.0:
            raise LorasumError(f"arrow routes between adapters at weight 1, got {w:g} for '{a.name}'; drop its "
                               ":WEIGHT", key="adapter")
    adapters = [a for a, _ in terms] + list(general)
    for a in adapters:
        if not a.path or not (Path(a.path) / "adapter_config.json").is_file():
            raise LorasumError(f"arrow loads adapters from their PEFT folders, and '{a.name}' has none (a merged "
                               "adapter?); save it with `lorasum compose` first", key="adapter")
    check_compatible(adapters)
    ranks = {a.name: {f.rank for f in a.layers.values()} for a in adapters}
    if len({r for rs in ranks.values() for r in rs}) > 1:
        listed = ", ".join(f"'{n}' r={'/'.join(map(str, sorted(rs)))}" for n, rs in ranks.items())
        raise LorasumError(f"arrow needs adapters of one rank, got {listed}; train them at one r", key="adapter")
    if params["top_k"] > len(terms):
        raise LorasumError(f"must be at most the number of adapters routed ({len(terms)}), got {params['top_k']}",
                           key="top_k")
    return adapters


def _without_autocast(forward):
    @functools.wraps(forward)
    def run(x, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return forward(x, *args, **kwargs)
    return run


@contextlib.contextmanager
def arrow(loaded: LoadedModel, terms: list[tuple[Adapter, float]], params: dict,
          general: list[Adapter] = ()) -> Iterator[torch.nn.Module]:
    """`with arrow(lm, terms, {"top_k": 1, "router_temperature": 1.0}) as model:` the base model with PEFT's Arrow
    router over the adapters (GenKnowSub with `general`); on exit the router and the adapters are unloaded and the
    base model is as before."""
    from peft import ArrowConfig, create_arrow_model

    check_routable(terms, params, general)
    config = ArrowConfig(top_k=int(params["top_k"]), router_temperature=float(params["router_temperature"]),
                         use_gks=bool(general), rng_seed=ARROW_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out for GPT-2's Conv1D: PEFT corrects it and says so
        model = create_arrow_model(loaded.model, [str(a.path) for a, _ in terms], config,
                                   general_adapter_paths=[str(g.path) for g in general] or None)
    try:
        for module in model.modules():
            for layer in getattr(module, "lora_arrow", {}).values():
                layer.forward = _without_autocast(layer.forward)
        model.eval()
        yield model
    finally:
        model.unload()  # the LoRA wrappers replaced by the base modules they hold: the weights were never touched


ROUTERS = {"arrow": arrow}  # delta.registry.ROUTES declares each one's parameters


@contextlib.contextmanager
def _in_place(loaded: LoadedModel, terms: list[tuple[Adapter, float]]) -> Iterator[torch.nn.Module]:
    with applied(loaded.model, terms):
        yield loaded.model


def serving(loaded: LoadedModel, terms: list[tuple[Adapter, float]], route: str | None = None,
            params: dict | None = None, general: list[Adapter] = ()):
    """The context whose model serves `terms`: applied in place (the exact sum, or a merge's terms from
    lm.combination.method_terms), or kept separate and routed by `route`."""
    if route is None:
        return _in_place(loaded, terms)
    return ROUTERS[route](loaded, terms, params or {}, general)
