"""Experiment configuration: one YAML/JSON file that fully describes a run, its presets and its validation."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field

from .. import schema
from ..errors import LorasumError, show
from ..files import read_json
from ..yamlfile import read_yaml
from ..lm.data import SPLITS, DataConfig, check_domain
from ..lm.train import INIT_MODES, TrainConfig, check_seed
from ..lm.models import MAX_THREADS, resolve_device
from ..tune.search import HEARTBEAT_S, MAX_HEARTBEAT_S
from ..tune.space import DEFAULT_SPACE, parse_space, space_dict
from ..delta.methods import method_params
from .grid import COMPOSITIONS, DEFAULT_COMPOSITIONS, METHOD_COMPOSITIONS, grid_points

TUNE_MODES = ("shared", "per_partition")
EVAL_SCOPES = ("all", "own")
MAX_BOOTSTRAP = 100_000  # resamples: more would only exhaust memory after the whole grid has run
MAX_RECORDS = 10**9  # record caps and minimums: a bigger number means "all" and only overflows the work estimate


def _show(value) -> str:
    """A number as the error shows it: a huge integer by its first digits and length, not thousands of digits."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


@dataclass
class TuneSettings:
    """The experiment's `tune` section: a search run before the grid, whose best parameters train the adapters."""

    mode: str = "shared"  # shared: one set for every partition; per_partition: each its own (confounds the comparison)
    trials: int = 20  # finished trials per study
    space: dict | None = None  # search space {param: {low, high[, log]} | {choices}} (default: tune.space's)
    seed: int = 0  # seed of the TPE sampler
    storage: str | None = None  # SQLAlchemy URL shared by workers (default: an SQLite file in RUN_DIR/tune)
    heartbeat: int = HEARTBEAT_S  # seconds between a running trial's heartbeats

    def check(self) -> None:
        if self.mode not in TUNE_MODES:
            raise LorasumError(f"must be one of {', '.join(TUNE_MODES)}, got {show(self.mode)}", key="mode")
        if self.trials < 1:
            raise LorasumError(f"must be an integer of at least 1, got {show(self.trials)}", key="trials")
        if self.storage is not None and "://" not in self.storage:
            raise LorasumError(f"must be an SQLAlchemy URL (e.g. postgresql://host/db) or null, got {show(self.storage)}",
                               key="storage")
        if not 1 <= self.heartbeat <= MAX_HEARTBEAT_S:
            raise LorasumError(f"must be a whole number of seconds in [1, {MAX_HEARTBEAT_S}], got "
                               f"{_show(self.heartbeat)}", key="heartbeat")
        check_seed(self.seed, "seed")
        self.space = space_dict(parse_space(self.space or DEFAULT_SPACE, "tune.space"))


def tune_section(value) -> dict | None:
    """`tune: null | shared | per_partition | {mode, trials, space, seed, storage, heartbeat}` -> a full dict."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if isinstance(value, str):
        value = {"mode": value}
    if not isinstance(value, dict):
        raise LorasumError(f"'tune' must be null, 'shared', 'per_partition' or a mapping, got {show(value)}")
    return asdict(schema.parse(TuneSettings, value, None, prefix="tune."))


@dataclass
class ExperimentConfig:
    """The whole study of the paper (sections 4-5) on any domains and base model."""

    model: str = "smollm2-135m"  # built-in name, .gguf path, folder or hub id
    data_dir: str | None = None  # folder with <domain>.jsonl (default: $LORASUM_DATA_DIR)
    domains: list[str] = field(default_factory=lambda: ["math", "medicine", "finance"])  # >= 2; sub-domains allowed
    question_field: str = "question"  # record field holding the question
    answer_field: str = "answer"  # record field holding the answer
    split_seed: int = 0  # salt of the content hash that assigns records to splits
    max_train: int | None = None  # training records per domain (None: all)
    max_validation: int | None = None  # validation records per domain
    max_test: int | None = None  # test records per domain
    max_level: int | None = None  # largest merged partition trained (None: all domains)
    seeds: list[int] = field(default_factory=lambda: [0])  # one adapter per partition and seed
    train: TrainConfig = field(default_factory=TrainConfig)  # hyperparameters, shared by every partition
    eval_batch_size: int = 16  # records per eval batch
    eval_loss_on: str = "all"  # tokens counted in perplexity: "all" (paper) or "answer"
    compositions: list[str] = field(default_factory=lambda: list(DEFAULT_COMPOSITIONS))  # composed models evaluated
    method_grid: dict | None = None  # {method: {param: [values]}}: hyperparameter points chosen on validation
    weight_search_trials: int | None = None  # weight_search: TPE trials per subset and seed (default 12)
    max_ppl_ratio: float | None = None  # recipe check: each fundamental's ppl on its own domain <= ratio x base
    bootstrap_samples: int = 1000  # paired bootstrap resamples for confidence intervals
    ci_level: float = 0.95  # confidence level of every interval
    bootstrap_seed: int = 0  # RNG seed of the bootstrap
    device: str | None = None  # cpu / cuda (default: GPU if present)
    dtype: str | None = None  # weights: float32 (default) / bfloat16
    autocast: str | None = None  # mixed-precision forward passes over fp32 weights: null (off) / bfloat16
    threads: int | None = None  # torch CPU threads
    tune: dict | str | bool | None = None  # hyperparameter search before the grid: null (off) or TuneSettings
    init_modes: list[str] | None = None  # LoRA init modes to compare, each a whole grid (default: [train.init])
    unlearn_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # λ swept in base + full − λ·d
    retention_tolerance: float = 0.05  # δ: a λ must keep every other domain within (1 + δ)× its ppl before removal
    eval_scope: str = "all"  # "all": every model on every domain; "own": each model on its own subset's domains
    min_records: dict | None = None  # {"train": n, "test": n}: records each domain needs before caps (else refused)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        return schema.parse(cls, d, where)

    def check(self) -> None:
        if len(self.domains) < 2:
            raise LorasumError(f"needs at least 2 domains, got {show(self.domains)}", key="domains")
        if len(set(self.domains)) != len(self.domains):
            dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
            raise LorasumError(f"names {', '.join(dup)} more than once", key="domains")
        if any("+" in d for d in self.domains):
            raise LorasumError("lists single domains; partitions (a+b) are built by the grid", key="domains")
        for d in self.domains:
            check_domain(d, key="domains")
        if self.max_level is not None and not 2 <= self.max_level <= len(self.domains):
            raise LorasumError(f"must be between 2 (singletons and pairs) and {len(self.domains)} (the number of "
                               f"domains), or null for all; got {_show(self.max_level)}", key="max_level")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LorasumError("must be a non-empty list of distinct integers", key="seeds")
        for key, values in (("seeds", self.seeds), ("split_seed", [self.split_seed]),
                            ("bootstrap_seed", [self.bootstrap_seed])):
            for v in values:
                check_seed(v, key)
        for c in self.compositions:
            if c not in COMPOSITIONS:
                raise LorasumError(f"names unknown composition '{c}'; known: {', '.join(COMPOSITIONS)}",
                                   key="compositions")
        self._check_methods()
        for k in ("max_train", "max_validation", "max_test"):
            v = getattr(self, k)
            if v is not None and not 1 <= v <= MAX_RECORDS:
                raise LorasumError(f"must be in [1, {MAX_RECORDS:.0e}] (or null for all), got {_show(v)}", key=k)
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise LorasumError(f"must be at least 1 and at most {MAX_THREADS} (or null for torch's choice), got "
                               f"{_show(self.threads)}", key="threads")
        if self.eval_batch_size < 1:
            raise LorasumError(f"must be at least 1, got {_show(self.eval_batch_size)}", key="eval_batch_size")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio > 0:
            raise LorasumError(f"must be a ratio > 0 (or null for no recipe check), got {self.max_ppl_ratio}",
                               key="max_ppl_ratio")
        if not 0 < self.ci_level < 1:
            raise LorasumError(f"must be in (0, 1), got {self.ci_level}", key="ci_level")
        if not 100 <= self.bootstrap_samples <= MAX_BOOTSTRAP:
            raise LorasumError(f"must be in [100, {MAX_BOOTSTRAP}], got {_show(self.bootstrap_samples)}",
                               key="bootstrap_samples")
        if self.eval_loss_on not in ("all", "answer"):
            raise LorasumError(f"must be 'all' or 'answer', got {show(self.eval_loss_on)}", key="eval_loss_on")
        if self.init_modes is not None:
            if not self.init_modes or len(set(self.init_modes)) != len(self.init_modes):
                raise LorasumError(f"must be a non-empty list of distinct modes, got {show(self.init_modes)}",
                                   key="init_modes")
            for m in self.init_modes:
                if m not in INIT_MODES:
                    raise LorasumError(f"names unknown mode {show(m)}; known: {', '.join(INIT_MODES)}", key="init_modes")
        if not self.unlearn_weights or len(set(self.unlearn_weights)) != len(self.unlearn_weights) \
                or not all(0 < w <= 2 for w in self.unlearn_weights):
            raise LorasumError(f"must be distinct weights in (0, 2], got {show(self.unlearn_weights)}",
                               key="unlearn_weights")
        if self.eval_scope not in EVAL_SCOPES:
            raise LorasumError(f"must be one of {', '.join(EVAL_SCOPES)}, got {show(self.eval_scope)}", key="eval_scope")
        for split, n in (self.min_records or {}).items():
            if split not in SPLITS:
                raise LorasumError(f"names unknown split {show(split)}; use {', '.join(SPLITS)}", key="min_records")
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_RECORDS:
                raise LorasumError(f"{show(split)} must be a whole number in [0, {MAX_RECORDS:.0e}], got {_show(n)}",
                                   key="min_records")
        if not self.retention_tolerance >= 0:
            raise LorasumError(f"must be >= 0, got {self.retention_tolerance}", key="retention_tolerance")
        self.tune = tune_section(self.tune)

    def _check_methods(self) -> None:
        """method_grid: known methods, each parameter a non-empty list, every point allowed by the method."""
        if self.method_grid is not None and not isinstance(self.method_grid, dict):
            raise LorasumError(f"must be a mapping {{method: {{param: [values]}}}}, got {show(self.method_grid)}",
                               key="method_grid")
        for name, grid in (self.method_grid or {}).items():
            if name not in METHOD_COMPOSITIONS or name == "weight_search":
                raise LorasumError(f"names {show(name)}, not a merge method with hyperparameters; use one of "
                                   f"{', '.join(m for m in METHOD_COMPOSITIONS if m != 'weight_search')}",
                                   key="method_grid")
            if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
                raise LorasumError(f"{name}: must map each hyperparameter to a non-empty list of values, e.g. "
                                   f"{{density: [0.1, 0.2]}}, got {show(grid)}", key="method_grid")
            for point in grid_points(grid):
                try:
                    method_params(name, dict(point))
                except LorasumError as e:
                    raise LorasumError(f"{name}: {e}", key="method_grid") from None
        t = self.weight_search_trials
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 10_000):
            raise LorasumError(f"must be a whole number in [1, 10000] (or null for 12), got {_show(t)}",
                               key="weight_search_trials")

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
                 "train": {"epochs": 1, "init": "independent"}},
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
