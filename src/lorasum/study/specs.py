"""The job specs of an experiment, one function per job kind, as the dicts `lorasum job` runs and `with_key` hashes.

Each function builds its kind's dict field by field in a fixed order: the content key is a hash of that dict, so
a spec's fields, their order and their values are the artifacts' addresses (a change moves every artifact). The
typed form a spec is checked against is `jobspec.JobSpec`; here the dicts are made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..jsonfile import sha256_file
from ..lm.data import parse_spec, partition_domains, resolve_source
from ..lm.train import TrainConfig, init_seed
from .config import ExperimentConfig
from .grid import Model
from .jobspec import with_key

THROUGHPUT_ROUNDS = 3  # each serving variant's passes, interleaved with the others'
Terms = list[dict]  # [{"train_key": ..., "weight": ...}]: the adapters a job reads, by the keys of their train jobs


def data_sources(cfg: ExperimentConfig) -> dict[str, str | None]:
    """sha256 of each domain's source file (None for hub datasets), so a changed file changes the keys."""
    out = {}
    for d in [*cfg.domains, *(cfg.general or [])]:
        name = parse_spec(d)[0]
        path = resolve_source(name, cfg.data_dir)
        out[name] = None if path.startswith("hf:") else sha256_file(path)
    return out


@dataclass(frozen=True)
class SpecContext:
    """What every spec of one init mode's plan shares: the config, the run folder, the init mode, the data files'
    hashes and the tuned training settings per partition."""

    cfg: ExperimentConfig
    run_dir: str
    mode: str
    sources: dict[str, str | None]
    train_for: dict[str, TrainConfig]

    def base(self) -> dict:
        cfg = self.cfg
        return {"model": cfg.model, "dtype": cfg.dtype, "autocast": cfg.autocast, "run_dir": self.run_dir,
                "device": cfg.device, "data_dir": cfg.data_dir}

    def data(self, domains: list[str], splits: tuple[str, ...] | None, skip: dict | None = None) -> dict:
        """The `data` field: fields, split salt, caps of `splits` (None: every split), the domains' source hashes."""
        cfg = self.cfg
        names = sorted({parse_spec(d)[0] for d in domains})
        caps = cfg.caps(keep_none=True) if splits is None else cfg.caps(splits, keep_none=True)
        return {"question_field": cfg.question_field, "answer_field": cfg.answer_field, "split_seed": cfg.split_seed,
                "max_records": caps, "sources": {n: self.sources[n] for n in names}, **({"skip": skip} if skip else {})}


def train_spec(ctx: SpecContext, part: str, seed: int, skip: dict | None = None) -> dict:
    """An adapter on a partition's merged data; with `skip`, on the disjoint second sample (an init of its own)."""
    tc = replace(ctx.train_for.get(part, ctx.cfg.train), seed=seed, init=ctx.mode)
    sample = {"sample": "second"} if skip else {}
    return with_key({**ctx.base(), "kind": "train", "partition": part, **sample,
                     "init_seed": init_seed(part, tc, sample.get("sample", "")),
                     "data": ctx.data(partition_domains(part), ("train", "validation"), skip), "train": asdict(tc)})


def method_fields(m: Model | None, search_key: str | None = None) -> dict:
    """A merge method's eval carries the method and its hyperparameters (or its search) in its key."""
    if m is None or m.method is None:
        return {}
    if m.kind == "weight_search":
        return {"method": m.method, "params": {}, "weights_from": search_key}
    return {"method": m.method, "params": dict(m.params)}


def eval_spec(ctx: SpecContext, terms: Terms, domain: str, split: str, method: dict) -> dict:
    """Per-example NLL of base + the terms (merged by `method`'s fields) on one domain's split; test-split specs
    carry no `split` field, so their keys predate it."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "eval", "adapters": terms, "domain": domain,
                     **({"split": split} if split != "test" else {}), **method,
                     "data": ctx.data([domain], (split,)), "max_length": cfg.train.max_length,
                     "batch_size": cfg.eval_batch_size, "loss_on": cfg.eval_loss_on})


def search_spec(ctx: SpecContext, m: Model, terms: Terms) -> dict:
    """The weights of a weight_search model, searched on its subset's pooled validation split."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "weight_search", "adapters": terms, "domains": list(m.subset),
                     "data": ctx.data(list(m.subset), ("validation",)), "max_length": cfg.train.max_length,
                     "batch_size": cfg.eval_batch_size, "loss_on": cfg.eval_loss_on,
                     "trials": cfg.weight_search_trials or 12, "method": m.method, "params": dict(m.params)})


def similarity_spec(ctx: SpecContext, a: Terms, b: Terms) -> dict:
    """Per-layer cosines (and norms) between two weighted sums of adapters; no model, no data."""
    return with_key({"kind": "similarity", "run_dir": ctx.run_dir, "a": a, "b": b})


def inplace_spec(ctx: SpecContext, keys: list[str], removed: str) -> dict:
    """Apply every fundamental in place, subtract one: the error against adding only the others."""
    cfg = ctx.cfg
    return with_key({"kind": "inplace", "model": cfg.model, "dtype": cfg.dtype, "autocast": cfg.autocast,
                     "run_dir": ctx.run_dir, "device": cfg.device, "all": keys, "removed": removed})


def data_stats_spec(ctx: SpecContext) -> dict:
    """Records, tokens and truncation per domain and split, after caps."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "data_stats", "domains": list(cfg.domains),
                     "data": ctx.data(cfg.domains, None), "max_length": cfg.train.max_length})


def prompt_route_spec(ctx: SpecContext) -> dict:
    """The prompt router's centroids (training questions) and every validation and test example's distances."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "prompt_route", "domains": list(cfg.domains),
                     "data": ctx.data(cfg.domains, None), "max_length": cfg.train.max_length,
                     "batch_size": cfg.eval_batch_size})


def throughput_spec(ctx: SpecContext, terms: Terms, subset: list[str], variants: list[str], params: dict) -> dict:
    """Tokens per second of the base model and of the subset's adapters served merged, routed by Arrow (at
    `params`) and chosen per prompt, on the subset's test split, interleaved (lm.throughput)."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "throughput", "adapters": terms, "domains": list(subset),
                     "data": ctx.data(list(subset), ("train", "test")), "max_length": cfg.train.max_length,
                     "batch_size": cfg.eval_batch_size, "loss_on": cfg.eval_loss_on, "method": "arrow",
                     "params": dict(params), "variants": list(variants), "rounds": THROUGHPUT_ROUNDS})


def predictors_spec(ctx: SpecContext, a: Terms, b: Terms, pair: list[str], inputs: int) -> dict:
    """Every predictor of the pair's summing cost (delta.predictors, lm.interference) from its two fundamentals and the
    first `inputs` training questions of each domain (prompts only, never answers)."""
    cfg = ctx.cfg
    return with_key({**ctx.base(), "kind": "predictors", "a": a, "b": b, "domains": list(pair),
                     "data": ctx.data(list(pair), ("train",)), "max_length": cfg.train.max_length,
                     "batch_size": cfg.eval_batch_size, "inputs": inputs})


def repair_spec(ctx: SpecContext, part: str, seed: int, start: Terms, fraction: float) -> dict:
    """The exact sum of `start` (the subset's fundamentals) trained on the partition's merged data with the merged
    block's recipe, for `fraction` of its optimizer steps."""
    spec = train_spec(ctx, part, seed)
    return with_key({**{k: v for k, v in spec.items() if k != "key"}, "start": start, "fraction": fraction})
