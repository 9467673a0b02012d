"""Experiment configuration: one YAML/JSON file that fully describes a run, its presets and its validation."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import LorasumError
from .fieldtypes import check_fields
from .train import TrainConfig

COMPOSITIONS = ("sum", "mean", "best_single", "level2_plus_one", "unlearning")


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
    compositions: list[str] = field(default_factory=lambda: list(COMPOSITIONS))  # which composed models to evaluate
    max_ppl_ratio: float | None = None  # recipe check: each fundamental's ppl on its own domain <= ratio x base
    bootstrap_samples: int = 1000  # paired bootstrap resamples for confidence intervals
    ci_level: float = 0.95  # confidence level of every interval
    bootstrap_seed: int = 0  # RNG seed of the bootstrap
    device: str | None = None  # cpu / cuda (default: GPU if present)
    dtype: str | None = None  # weights: float32 (default) / bfloat16
    autocast: str | None = None  # mixed-precision forward passes over fp32 weights: null (off) / bfloat16
    threads: int | None = None  # torch CPU threads
    # hyperparameter search (issue 5): null (off), shared, per_partition, or {mode, trials, space, seed, storage}
    tune: dict | None = None

    # --- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ExperimentConfig":
        if not isinstance(d, dict):
            raise LorasumError(f"{where}: expected a mapping of config keys")
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
                raise LorasumError(f"{where}: unknown config key '{key}'{hint}")
        d = check_fields(cls, d, where, skip=("tune",))  # `tune` has its own validation (normalize_tune)
        if "train" in d:
            train = {} if d["train"] is None else d["train"]
            if not isinstance(train, dict):
                raise LorasumError(f"{where}: 'train' must be a mapping of training parameters "
                                   f"(e.g. {{epochs: 1, lr: 1e-3}}), got {train!r}")
            tknown = [f.name for f in fields(TrainConfig)]
            for key in train:
                if key not in tknown:
                    close = difflib.get_close_matches(str(key), tknown, n=1)
                    hint = f"; did you mean 'train.{close[0]}'?" if close else ""
                    raise LorasumError(f"{where}: unknown config key 'train.{key}'{hint}")
            d["train"] = TrainConfig(**check_fields(TrainConfig, train, where, prefix="train."))
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "config") -> None:
        if not isinstance(self.domains, list) or len(self.domains) < 2:
            raise LorasumError(f"{where}: 'domains' needs at least 2 domains, got {self.domains!r}")
        if len(set(self.domains)) != len(self.domains):
            dup = sorted({d for d in self.domains if self.domains.count(d) > 1})
            raise LorasumError(f"{where}: 'domains' names {', '.join(dup)} more than once")
        if any("+" in d for d in self.domains):
            raise LorasumError(f"{where}: 'domains' lists single domains; partitions (a+b) are built by the grid")
        if self.max_level is not None and not 2 <= self.max_level <= len(self.domains):
            raise LorasumError(f"{where}: 'max_level' must be between 2 (singletons and pairs) and "
                               f"{len(self.domains)} (the number of domains), or null for all; got {self.max_level}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LorasumError(f"{where}: 'seeds' must be a non-empty list of distinct integers")
        for c in self.compositions:
            if c not in COMPOSITIONS:
                raise LorasumError(f"{where}: unknown composition '{c}' in 'compositions'; known: "
                                   f"{', '.join(COMPOSITIONS)}")
        for k in ("max_train", "max_validation", "max_test"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise LorasumError(f"{where}: '{k}' must be at least 1 (or null for all), got {v}")
        if self.threads is not None and self.threads < 1:
            raise LorasumError(f"{where}: 'threads' must be at least 1 (or null for torch's choice), got {self.threads}")
        if not 0 < self.ci_level < 1:
            raise LorasumError(f"{where}: 'ci_level' must be in (0, 1), got {self.ci_level}")
        if self.bootstrap_samples < 100:
            raise LorasumError(f"{where}: 'bootstrap_samples' must be at least 100, got {self.bootstrap_samples}")
        if self.eval_loss_on not in ("all", "answer"):
            raise LorasumError(f"{where}: 'eval_loss_on' must be 'all' or 'answer', got '{self.eval_loss_on}'")
        try:
            self.train.validate()
        except LorasumError as e:
            raise LorasumError(f"{where}: train: {e}") from None
        from .tune_experiment import normalize_tune

        self.tune = normalize_tune(self.tune, where)

    @property
    def level(self) -> int:
        return self.max_level or len(self.domains)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    # tiny model, seconds: for tests and smoke runs (the caller supplies domains and data_dir)
    "smoke": {"model": "tiny-gpt2", "max_train": 24, "max_validation": 8, "max_test": 8, "bootstrap_samples": 200,
              "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "max_length": 32}},
    # embedded SmolLM2, the three real domains, one seed, ~200 training records per domain, one epoch
    "quick": {"model": "smollm2-135m", "domains": ["math", "medicine", "finance"], "max_train": 200,
              "max_validation": 30, "max_test": 50, "seeds": [0], "autocast": "bfloat16", "max_ppl_ratio": 0.8, "train": {"epochs": 1}},
    # the same domains, 3 seeds, larger budgets (hours on CPU)
    "full": {"model": "smollm2-135m", "domains": ["math", "medicine", "finance"], "max_train": 2000,
             "max_validation": 200, "max_test": 400, "seeds": [0, 1, 2], "train": {"epochs": 2}},
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
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise LorasumError(f"cannot read config {path}: {e.strerror}") from None
        import yaml

        try:
            data = yaml.safe_load(text) if not path.endswith(".json") else json.loads(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise LorasumError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise LorasumError(f"{path}: expected a mapping of config keys")
        merged = _merge(merged, data)
    merged = _merge(merged, overrides or {})
    return ExperimentConfig.from_dict(merged, where)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (dotted names)."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
