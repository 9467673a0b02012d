"""What serving several domains costs per token: the base model against the adapters merged into its weights, kept
separate and routed per token (Arrow), or chosen per request from the prompt.

Every variant scores the same examples in the same batches; the variants take turns within each round (base, merged,
Arrow, prompt top-1, prompt soft, then again), so a machine that slows down or speeds up during the measurement
touches all of them alike. A variant's speed is its tokens (attention-mask positions, prompt and answer) over the
seconds its forward passes took; its cost is the median over rounds of (base seconds / variant seconds) in the same
round. Building a router (loading the adapters, the prototypes) and the prompt router's centroids are one-off costs,
reported apart as `setup_s`; the prompt router's per-request cost — the base model's pass over each prompt to choose,
then the chosen adapters' passes (switching the applied adapter between groups of requests) — is in its speed.
Merged adapters run the base model's own architecture, so any merge method (the exact sum, TIES, DARE, …) serves at
the base model's speed: the merged row measures that rather than assuming it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from ..delta.apply import applied
from ..delta.factors import Adapter
from ..errors import LorasumError
from .data import Example
from .evaluate import per_example_nll
from .models import LoadedModel
from .prompt_routing import prompt_features, squared_distances
from .routing import arrow

Terms = list[tuple[Adapter, float]]


def _synced(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (a CUDA kernel launch returns before it runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _score(loaded: LoadedModel, model: torch.nn.Module, examples: dict[str, list[Example]], batch_size: int,
           loss_on: str) -> None:
    with loaded.autocast():
        per_example_nll(model, examples, loaded.tokenizer.pad_token_id, batch_size, loss_on, desc="throughput")


def _timed(loaded: LoadedModel, work: Callable[[], None]) -> float:
    device = next(loaded.model.parameters()).device
    t0 = _synced(device)
    work()
    return _synced(device) - t0


def _base(loaded, terms, examples, batch_size, loss_on, ctx) -> float:
    return _timed(loaded, lambda: _score(loaded, loaded.model, examples, batch_size, loss_on))


def _merged(loaded, terms, examples, batch_size, loss_on, ctx) -> float:
    with applied(loaded.model, terms):  # applying is a one-off per model: outside the timed passes
        return _timed(loaded, lambda: _score(loaded, loaded.model, examples, batch_size, loss_on))


def _arrow(loaded, terms, examples, batch_size, loss_on, ctx) -> float:
    t0 = time.perf_counter()
    with arrow(loaded, terms, ctx["arrow_params"]) as model:
        ctx.setdefault("setup", {}).setdefault("arrow", []).append(time.perf_counter() - t0)
        return _timed(loaded, lambda: _score(loaded, model, examples, batch_size, loss_on))


def _prompt(loaded, terms, examples, batch_size, loss_on, ctx, soft: bool) -> float:
    def work() -> None:
        choice = {d: squared_distances(prompt_features(loaded, exs, batch_size), ctx["centroids"]).argmin(1)
                  for d, exs in examples.items()}
        for k, (a, _) in enumerate(terms):
            group = examples if soft else {d: [e for e, c in zip(exs, choice[d]) if c == k]
                                           for d, exs in examples.items()}
            group = {d: exs for d, exs in group.items() if exs}
            if group:
                with applied(loaded.model, [(a, 1.0)]):
                    _score(loaded, loaded.model, group, batch_size, loss_on)
    return _timed(loaded, work)


VARIANTS: dict[str, Callable[..., float]] = {
    "base": _base,
    "merged": _merged,
    "arrow": _arrow,
    "prompt_top1": lambda *a: _prompt(*a, soft=False),
    "prompt_soft": lambda *a: _prompt(*a, soft=True),
}
DESCRIPTIONS = {
    "base": "the base model alone",
    "merged": "adapters merged into the weights (the exact sum or any merge method)",
    "arrow": "adapters kept separate, routed per token by PEFT's Arrow",
    "prompt_top1": "prompt router, top-1: the base model reads the prompt, then the chosen adapter scores it",
    "prompt_soft": "prompt router, soft: the base model reads the prompt, then every adapter scores it",
}


def serving_throughput(loaded: LoadedModel, terms: Terms, examples: dict[str, list[Example]],
                       centroids: np.ndarray | None = None, arrow_params: dict | None = None, rounds: int = 3,
                       batch_size: int = 16, loss_on: str = "all") -> dict:
    """Tokens per second of each serving variant on the same batches, interleaved over `rounds`.

    Args:
        loaded: the base model (left unchanged).
        terms: the adapters, each at weight 1: [(Adapter, 1.0), …].
        examples: {domain: tokenized examples}, every variant scores all of them.
        centroids: (k, hidden) prompt-router centroids, one per adapter (lm.prompt_routing); None skips its rows.
        arrow_params: {"top_k", "router_temperature"}; None skips the Arrow row.
        rounds: how many times each variant runs (its figures are medians over rounds).

    Returns:
        {"tokens": positions scored per pass, "rounds": rounds, "variants": {name: {"tokens_per_s", "x_base",
        "seconds": [per round], "setup_s"?}}} where x_base is the median over rounds of base seconds / its seconds.
    """
    if rounds < 1:
        raise LorasumError(f"must be at least 1, got {rounds}", key="rounds")
    names = ["base", "merged"] + (["arrow"] if arrow_params is not None else []) \
        + (["prompt_top1", "prompt_soft"] if centroids is not None else [])
    ctx = {"arrow_params": arrow_params, "centroids": centroids}
    tokens = sum(len(e.input_ids) for exs in examples.values() for e in exs)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            seconds[n].append(VARIANTS[n](loaded, terms, examples, batch_size, loss_on, ctx))
    out = {}
    for n in names:
        ratios = [b / s for b, s in zip(seconds["base"], seconds[n])]
        out[n] = {"tokens_per_s": tokens / statistics.median(seconds[n]), "x_base": statistics.median(ratios),
                  "seconds": seconds[n]}
        if n in ctx.get("setup", {}):
            out[n]["setup_s"] = statistics.median(ctx["setup"][n])
    return {"tokens": tokens, "rounds": rounds, "variants": out}
