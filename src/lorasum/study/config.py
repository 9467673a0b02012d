"""Experiment configuration: one YAML/JSON file that fully describes a run, its presets and its validation."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from .. import schema
from ..errors import LorasumError, show
from ..jsonfile import read_json
from ..schema import Range, Rule, Wording
from ..yamlfile import read_yaml
from ..lm.choices import INIT_MODES, SPLITS, LossOn
from ..lm.data import DataConfig, check_domain
from ..lm.train import Seed, TrainConfig
from ..lm.models import MAX_THREADS, resolve_device
from ..tune.search import HEARTBEAT_S, MAX_HEARTBEAT_S
from ..tune.space import DEFAULT_SPACE, Space, parse_space, space_dict
from ..delta.methods import method_params
from ..delta.registry import graded
from .grid import COMPOSITIONS, DEFAULT_COMPOSITIONS, METHOD_COMPOSITIONS, grid_points

MAX_BOOTSTRAP = 100_000  # resamples: more would only exhaust memory after the whole grid has run
MAX_RECORDS = 10**9  # record caps and minimums: a bigger number means "all" and only overflows the work estimate


def _check_storage(url: str | None) -> None:
    """Optuna opens its storage by SQLAlchemy URL: a bare path or name would not open."""
    if url is not None and "://" not in url:
        raise LorasumError(f"must be an SQLAlchemy URL (e.g. postgresql://host/db) or null, got {show(url)}")


Heartbeat = Annotated[int, Range(1, MAX_HEARTBEAT_S), Wording(f"a whole number of seconds in [1, {MAX_HEARTBEAT_S}]")]


@dataclass
class TuneSettings:
    """The experiment's `tune` section: a search run before the grid, whose best parameters train the adapters."""

    # shared: one set for every partition; per_partition: each its own (confounds the comparison)
    mode: Annotated[Literal["shared", "per_partition"], Wording("one of shared, per_partition")] = "shared"
    trials: Annotated[int, Range(1), Wording("an integer of at least 1")] = 20  # finished trials per study
    space: dict | None = None  # search space {param: {low, high[, log]} | {choices}} (default: tune.space's)
    seed: Seed = 0  # seed of the TPE sampler
    # SQLAlchemy URL shared by workers (default: an SQLite file in RUN_DIR/tune)
    storage: Annotated[str | None, Rule(_check_storage)] = None
    heartbeat: Heartbeat = HEARTBEAT_S  # seconds between a running trial's heartbeats

    @classmethod
    def shorthand(cls, value) -> dict | None:
        """The section as YAML may write it: `false` (off: None), `true` (every default) or a mode (`tune: shared`),
        as the mapping it stands for."""
        if value is False:
            return None
        if value is True:
            return {}
        if isinstance(value, str):
            return {"mode": value}
        raise schema.Mismatch("a mapping or a string or true or false or null")

    @functools.cached_property
    def parsed_space(self) -> Space:
        """The search space as the search uses it, parsed once (a copy made with `replace` parses its own)."""
        return parse_space(self.space or DEFAULT_SPACE, "tune.space")

    def check(self) -> None:
        """The search space, checked and written out in full (the default space where none is given), so the
        config's hash names the space searched."""
        self.space = space_dict(self.parsed_space)


def _check_domains(domains: list[str]) -> None:
    """At least a pair, each named once and plain: the grid builds partitions (a+b) and names models from them."""
    if len(domains) < 2:
        raise LorasumError(f"needs at least 2 domains, got {show(domains)}")
    if len(set(domains)) != len(domains):
        dup = sorted({d for d in domains if domains.count(d) > 1})
        raise LorasumError(f"names {', '.join(dup)} more than once")
    if any("+" in d for d in domains):
        raise LorasumError("lists single domains; partitions (a+b) are built by the grid")
    for d in domains:
        check_domain(d, key="domains")


def _check_seeds(seeds: list[int]) -> None:
    """Each seed once: a repeated seed would train the same adapters twice (each seed's range is `Seed`'s)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise LorasumError("must be a non-empty list of distinct integers")


def _check_compositions(names: list[str]) -> None:
    """Names of the COMPOSITIONS registry, read when checked (a registered composition is known at once)."""
    for c in names:
        if c not in COMPOSITIONS:
            raise LorasumError(f"names unknown composition '{c}'; known: {', '.join(COMPOSITIONS)}")


def _check_method_grid(method_grid: dict) -> None:
    """Known methods, each parameter a non-empty list, every point allowed by the method."""
    for name, grid in method_grid.items():
        if name not in METHOD_COMPOSITIONS or name == "weight_search":
            raise LorasumError(f"names {show(name)}, not a merge method with hyperparameters; use one of "
                               f"{', '.join(m for m in METHOD_COMPOSITIONS if m != 'weight_search')}")
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise LorasumError(f"{name}: must map each hyperparameter to a non-empty list of values, e.g. "
                               f"{{density: [0.1, 0.2]}}, got {show(grid)}")
        for point in grid_points(grid):
            try:
                method_params(name, dict(point), graded())
            except LorasumError as e:
                raise LorasumError(f"{name}: {e}") from None


def _check_init_modes(modes: list[str]) -> None:
    """Each mode once, each an InitMode: every mode is a whole grid of its own."""
    if not modes or len(set(modes)) != len(modes):
        raise LorasumError(f"must be a non-empty list of distinct modes, got {show(modes)}")
    for m in modes:
        if m not in INIT_MODES:
            raise LorasumError(f"names unknown mode {show(m)}; known: {', '.join(INIT_MODES)}")


def _check_unlearn_weights(weights: list[float]) -> None:
    """Distinct λ in (0, 2]: the sweep of base + full − λ·d."""
    if not weights or len(set(weights)) != len(weights) or not all(0 < w <= 2 for w in weights):
        raise LorasumError(f"must be distinct weights in (0, 2], got {show(weights)}")


def _check_repair_budgets(budgets: list[float]) -> None:
    """Distinct shares in (0, 1] of the merged block's optimizer steps, one repair each."""
    if not budgets or len(set(budgets)) != len(budgets) or not all(0 < b <= 1 for b in budgets):
        raise LorasumError(f"must be distinct shares of the merged block's optimizer steps in (0, 1], e.g. "
                           f"[0.05, 0.1, 0.25], got {show(budgets)}")


def _check_general(domains: list[str] | None) -> None:
    """Distinct single domains, each a general-domain adapter's training data for Arrow's GenKnowSub."""
    if domains is None:
        return
    if not domains or len(set(domains)) != len(domains) or any("+" in d for d in domains):
        raise LorasumError(f"must list distinct single domains (general-domain data for GenKnowSub), or be null; "
                           f"got {show(domains)}")
    for d in domains:
        check_domain(d, key="general")


def _check_min_records(minimums: dict) -> None:
    """{split: records} with known splits and whole numbers in [0, MAX_RECORDS]."""
    for split, n in minimums.items():
        if split not in SPLITS:
            raise LorasumError(f"names unknown split {show(split)}; use {', '.join(SPLITS)}")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_RECORDS:
            raise LorasumError(f"{show(split)} must be a whole number in [0, {MAX_RECORDS:.0e}], got "
                               f"{schema.number_text(n)}")


# The declared rules of ExperimentConfig's fields (the checks of list and mapping fields are above).
Domains = Annotated[list[str], Rule(_check_domains)]
Records = Annotated[int | None, Range(1, MAX_RECORDS), Wording(f"in [1, {MAX_RECORDS:.0e}] (or null for all)")]
Seeds = Annotated[list[Seed], Rule(_check_seeds)]
Compositions = Annotated[list[str], Rule(_check_compositions)]
SearchTrials = Annotated[int | None, Range(1, 10_000), Wording("a whole number in [1, 10000] (or null for 12)")]
PplRatio = Annotated[float | None, Range(0, low_open=True), Wording("a ratio > 0 (or null for no recipe check)")]
Resamples = Annotated[int, Range(100, MAX_BOOTSTRAP), Wording(f"in [100, {MAX_BOOTSTRAP}]")]
Threads = Annotated[int | None, Range(1, MAX_THREADS),
                    Wording(f"at least 1 and at most {MAX_THREADS} (or null for torch's choice)")]
InitModes = Annotated[list[str] | None, Rule(_check_init_modes)]
UnlearnWeights = Annotated[list[float], Rule(_check_unlearn_weights)]
RepairBudgets = Annotated[list[float], Rule(_check_repair_budgets)]
MethodGrid = Annotated[dict | None, Rule(_check_method_grid)]
MinRecords = Annotated[dict | None, Rule(_check_min_records)]
General = Annotated[list[str] | None, Rule(_check_general)]
EvalScope = Annotated[Literal["all", "own"], Wording("one of all, own")]


@dataclass
class ExperimentConfig:
    """The whole study of the paper (sections 4-5) on any domains and base model."""

    model: str = "smollm2-135m"  # built-in name, .gguf path, folder or hub id
    data_dir: str | None = None  # folder with <domain>.jsonl (default: $LORASUM_DATA_DIR)
    domains: Domains = field(default_factory=lambda: ["math", "medicine", "finance"])  # >= 2; sub-domains allowed
    question_field: str = "question"  # record field holding the question
    answer_field: str = "answer"  # record field holding the answer
    split_seed: Seed = 0  # salt of the content hash that assigns records to splits
    max_train: Records = None  # training records per domain (None: all)
    max_validation: Records = None  # validation records per domain
    max_test: Records = None  # test records per domain
    max_level: int | None = None  # largest merged partition trained (None: all domains)
    seeds: Seeds = field(default_factory=lambda: [0])  # one adapter per partition and seed
    train: TrainConfig = field(default_factory=TrainConfig)  # hyperparameters, shared by every partition
    eval_batch_size: Annotated[int, Range(1)] = 16  # records per eval batch
    eval_loss_on: LossOn = "all"  # tokens counted in perplexity: "all" (paper) or "answer"
    compositions: Compositions = field(default_factory=lambda: list(DEFAULT_COMPOSITIONS))  # composed models evaluated
    method_grid: MethodGrid = None  # {method: {param: [values]}}: hyperparameter points chosen on validation
    weight_search_trials: SearchTrials = None  # weight_search: TPE trials per subset and seed (default 12)
    max_ppl_ratio: PplRatio = None  # recipe check: each fundamental's ppl on its own domain <= ratio x base
    bootstrap_samples: Resamples = 1000  # paired bootstrap resamples for confidence intervals
    ci_level: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.95  # confidence level of intervals
    bootstrap_seed: Seed = 0  # RNG seed of the bootstrap
    device: str | None = None  # cpu / cuda (default: GPU if present)
    dtype: str | None = None  # weights: float32 (default) / bfloat16
    autocast: str | None = None  # mixed-precision forward passes over fp32 weights: null (off) / bfloat16
    threads: Threads = None  # torch CPU threads
    tune: TuneSettings | None = None  # search before the grid: null (off) or its settings (YAML: also true or a mode)
    init_modes: InitModes = None  # LoRA init modes to compare, each a whole grid (default: [train.init])
    unlearn_weights: UnlearnWeights = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # λ: base + full − λ·d
    # δ: a λ must keep every other domain within (1 + δ)× its ppl before removal
    retention_tolerance: Annotated[float, Range(0), Wording(">= 0")] = 0.05
    eval_scope: EvalScope = "all"  # "all": every model on every domain; "own": each on its own subset's domains
    min_records: MinRecords = None  # {"train": n, "test": n}: records each domain needs before caps (else refused)
    # composition `repair`: the exact sum trained on merged data for these shares of the merged block's steps
    repair_budgets: RepairBudgets = field(default_factory=lambda: [0.05, 0.1, 0.25])
    # composition `arrow`: general-domain partitions, one adapter each per seed, subtracted first (GenKnowSub)
    general: General = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        return schema.parse(cls, d, where)

    def check(self) -> None:
        """The rules relating several fields (each field's own rules are declared on it)."""
        if self.max_level is not None and not 2 <= self.max_level <= len(self.domains):
            raise LorasumError(f"must be between 2 (singletons and pairs) and {len(self.domains)} (the number of "
                               f"domains), or null for all; got {schema.number_text(self.max_level)}", key="max_level")
        both = [d for d in self.general or [] if d in self.domains]
        if both:
            raise LorasumError(f"names {show(both[0])}, which is also in 'domains'; general-domain data must be "
                               "other data than the domains routed between", key="general")

    @property
    def modes(self) -> list[str]:
        """The init modes this run trains a grid for; the first is the report's primary one."""
        return list(self.init_modes) if self.init_modes else [self.train.init]

    @property
    def level(self) -> int:
        return self.max_level or len(self.domains)

    def caps(self, splits=SPLITS, keep_none: bool = False) -> dict[str, int | None]:
        """Record caps of `splits`; the uncapped ones as None with `keep_none` (as job specs hold them), else left
        out (as DataConfig takes them)."""
        caps = {"train": self.max_train, "validation": self.max_validation, "test": self.max_test}
        return {s: caps[s] for s in splits if keep_none or caps[s] is not None}

    def data_config(self, splits=SPLITS) -> DataConfig:
        """The DataConfig of this run, capped on `splits` (the others uncapped)."""
        return DataConfig(self.data_dir, self.question_field, self.answer_field, self.split_seed, self.caps(splits))

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# Sub-domains of ../shared/data by its `category` field: MathQA categories, MedQuAD collections, groups of 10-K
# tickers (technology companies; banks, insurers and payment networks).
EVIDENCE_DOMAINS = ["math[category=general]", "math[category=physics]", "medicine[category=GHR]",
                    "medicine[category=GARD]",
                    "finance[category=AAPL|AMD|AVGO|CRM|GOOGL|HPE|HPQ|IBM|INTU|META|MSFT|NVDA]",
                    "finance[category=AXP|BAC|BRK-A|CB|GS|ICE|JPM|SCHW|V]"]

PRESETS: dict[str, dict] = {
    # tiny model, seconds: for tests and smoke runs (the caller supplies domains and data_dir)
    "smoke": {"model": "tiny-gpt2", "max_train": 24, "max_validation": 8, "max_test": 8, "bootstrap_samples": 200,
              "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 32}},
    # embedded SmolLM2, the three real domains, one seed, ~200 training records per domain, one epoch
    "quick": {"model": "smollm2-135m", "domains": ["math", "medicine", "finance"], "max_train": 200,
              "max_validation": 30, "max_test": 50, "seeds": [0], "autocast": "bfloat16", "max_ppl_ratio": 0.8, "train": {"epochs": 1},
              # two cheap merge methods at one fixed density (nothing searched)
              "compositions": [*DEFAULT_COMPOSITIONS, "ties", "dare_linear"],
              "method_grid": {"ties": {"density": [0.2]}, "dare_linear": {"density": [0.2]}}},
    # quick's data and model with every merge method (hyperparameters chosen on validation) and the weight search
    "baselines": {"model": "smollm2-135m", "domains": ["math", "medicine", "finance"], "max_train": 200,
                  "max_validation": 30, "max_test": 50, "seeds": [0], "autocast": "bfloat16", "max_ppl_ratio": 0.8,
                  "train": {"epochs": 1}, "compositions": [*DEFAULT_COMPOSITIONS, *METHOD_COMPOSITIONS]},
    # the same domains, 3 seeds, larger budgets (hours on CPU)
    "full": {"model": "smollm2-135m", "domains": ["math", "medicine", "finance"], "max_train": 2000,
             "max_validation": 200, "max_test": 400, "seeds": [0, 1, 2], "train": {"epochs": 2}},
    # enough pairs to decide: 6 disjoint sub-domains of the real data (2 per parent) -> 15 pairs (3 within a parent,
    # 12 across), 2 seeds, independent init, each model evaluated on its own domains
    "evidence": {"model": "smollm2-135m", "domains": EVIDENCE_DOMAINS, "max_level": 2, "max_train": 100,
                 "max_validation": 30, "max_test": 50, "seeds": [0, 1], "autocast": "bfloat16", "max_ppl_ratio": 0.8,
                 "eval_scope": "own", "min_records": {"train": 100, "test": 50},
                 "train": {"epochs": 1, "init": "independent"},
                 # beyond the sum: the oracle (always), the prompt router, Arrow (top_k 1 or 2, on validation) and
                 # the repair at the two budgets that tell most (1 step can make a pair worse; see docs/evidence.md)
                 "compositions": [*DEFAULT_COMPOSITIONS, "prompt_router", "arrow", "repair"],
                 "repair_budgets": [0.1, 0.25],
                 "method_grid": {"arrow": {"top_k": [1, 2], "router_temperature": [1.0]}}},
    # the paper's setup: GPT-2 small from the hub, all data, r=4, alpha=64, c_attn/c_proj, max length 64 (a GPU)
    "paper": {"model": "gpt2", "domains": ["math", "medicine", "finance"], "seeds": [0],
              "train": {"r": 4, "alpha": 64, "targets": ["c_attn", "c_proj"], "max_length": 64, "epochs": 3,
                        "lr": 2e-4}},
}


def load_config(path: str | None = None, preset: str | None = None, overrides: dict | None = None) -> ExperimentConfig:
    """A preset, then a YAML/JSON file, then explicit overrides (each layer replaces keys of the one before)."""
    merged: dict = {}
    if preset:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, PRESETS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise LorasumError(f"unknown preset '{preset}'{hint}; presets: {', '.join(PRESETS)}")
        merged = json.loads(json.dumps(PRESETS[preset]))
    where = "config"
    if path:
        where = path
        merged = _merge(merged, read_config_file(path))
    merged = _merge(merged, overrides or {})
    cfg = ExperimentConfig.from_dict(merged, where)
    try:  # a device torch does not know, or a GPU this machine lacks, is refused before any work
        resolve_device(cfg.device)
    except LorasumError as e:
        raise LorasumError(f"{where}: '{e.key}' {e.message}") from None
    return cfg


def read_config_file(path: str) -> dict:
    """A YAML or (`.json`) JSON config file as a mapping; unreadable, invalid, oversized or too deeply nested text
    is one error naming the file."""
    fix = "write the config as one mapping of config keys"
    data = read_json(path, "config", fix) if path.endswith(".json") else read_yaml(path, "config", fix)
    if not isinstance(data, dict):
        raise LorasumError(f"{path}: expected a mapping of config keys; {fix}")
    return data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
