"""Every candidate predictor of a pair's summing cost, computed together: the weight-space ones from the factors
(delta.predictors) and the activation- and function-space ones on a small unlabeled sample of each domain's prompts
(lm.interference), with what each family cost: wall seconds and forward-pass token positions."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..delta.factors import Adapter
from ..delta.predictors import WEIGHT_PREDICTORS
from .interference import SYMMETRIC, pair_interference
from .models import LoadedModel

ASYMMETRIC = ("norm_ratio",)  # depends on which adapter is a: not a property of an unordered pair


def all_predictors(loaded: LoadedModel, a: Adapter, b: Adapter, prompts_a: Sequence[str], prompts_b: Sequence[str],
                   max_length: int, batch_size: int = 16) -> dict:
    """{"values": {predictor: value}, "forward_tokens": {family: positions run through the model}, "seconds":
    {family: wall seconds}} for the unordered pair (a, b); families: weight, activation, function.

    Activation predictors run the base model once over each sample; the KL runs base + Δa and base + Δa + Δb over
    a's sample (and symmetrically), so its forward cost is twice the samples' tokens."""
    t0 = time.perf_counter()
    values = {n: float(f(a, b)) for n, f in WEIGHT_PREDICTORS.items() if n not in ASYMMETRIC}
    weight_s = time.perf_counter() - t0
    inter = pair_interference(loaded, a, b, list(prompts_a), list(prompts_b), max_length, batch_size)
    values.update({n: float(inter[n]) for n in SYMMETRIC})
    tokens = int(inter["tokens_a"] + inter["tokens_b"])
    return {"values": values, "forward_tokens": {"weight": 0, "activation": tokens, "function": 2 * tokens},
            "seconds": {"weight": weight_s, "activation": inter["seconds_activation"], "function": inter["seconds_kl"]}}


FAMILIES = {**{n: "weight" for n in WEIGHT_PREDICTORS if n not in ASYMMETRIC},
            **{n: "function" if n == "kl_sum" else "activation" for n in SYMMETRIC}}
