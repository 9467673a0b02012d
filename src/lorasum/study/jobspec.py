"""A job spec's fields, typed, and its content-derived key: what `lorasum job SPEC.json` parses before running.

Trust model of `lorasum job SPEC.json`: a spec is trusted like a command line only in what it names — its run folder
(`run_dir`), its base model, its data folder (`data_dir`) — and is otherwise parsed strictly (`check_spec`): every
field typed by JobSpec, unknown fields refused, the key equal to the content's hash. Every path it reads or writes
is derived inside the run folder from keys, never taken from the spec: adapters from `RUN_DIR/adapters/<train key>`
where each train key must match TRAIN_KEY (`train-` and 20 hex digits: no `/`, no `..`, no absolute path), the
artifact at `RUN_DIR/<kind folder>/<key>`; domains are plain names (lm.data.check_domain) looked up in the data
folder, and their files must still have the sha256 the spec records. Run only specs whose `run_dir` you would pass
as `--out` yourself.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from ..delta.methods import method_params
from ..delta.registry import graded
from ..errors import LorasumError
from ..lm.choices import SPLITS, LossOn, Split
from ..lm.data import DataConfig, check_domain, partition_domains
from ..lm.train import Seed, TrainConfig
from ..lm.throughput import VARIANTS
from ..schema import Range

_NOT_IN_KEY = ("run_dir", "key", "device", "data_dir")
TRAIN_KEY = re.compile(r"train-[0-9a-f]{20}")  # job_key of a train spec: the only name an adapter folder has
SEARCH_KEY = re.compile(r"weight_search-[0-9a-f]{20}")  # job_key of a weight search: an eval's `weights_from`


@dataclass(frozen=True)
class AdapterTerm:
    """One adapter of a job's weighted sum, named by the key of the train job that made it."""

    train_key: str
    weight: float

    def check(self) -> None:
        check_train_key(self.train_key, "train_key")


def check_train_key(key: str, field_name: str) -> None:
    """A train key names a folder under RUN_DIR/adapters: it must be a key that job_key makes, nothing else."""
    if not TRAIN_KEY.fullmatch(key):
        raise LorasumError(f"must be a train job's key ('train-' and 20 hex digits, naming a folder under "
                           f"RUN_DIR/adapters), got {key!r:.60}", key=field_name)


@dataclass(frozen=True)
class DataSpec:
    """What a job reads of the data: fields, split salt, caps, and the sha256 of each source file."""

    question_field: str
    answer_field: str
    split_seed: Seed
    max_records: dict  # split -> cap (None: all records)
    sources: dict  # source name -> sha256 (None for hub datasets)
    skip: dict = field(default_factory=dict)  # split -> records passed over before the cap (a disjoint sample)

    def check(self) -> None:
        """Caps are whole numbers >= 1 or null, skips whole numbers >= 0, per known split; sources map to a sha256."""
        for name, table, low, none_ok in (("max_records", self.max_records, 1, True), ("skip", self.skip, 0, False)):
            for split, n in table.items():
                ok = n is None and none_ok or isinstance(n, int) and not isinstance(n, bool) and n >= low
                if split not in SPLITS or not ok:
                    raise LorasumError(f"must map splits ({', '.join(SPLITS)}) to whole numbers >= {low}"
                                       f"{' or null' if none_ok else ''}, got {split!r:.40}: {n!r:.40}", key=name)
        for name, sha in self.sources.items():
            if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                raise LorasumError(f"must map each source to its sha256 (64 hex digits) or null, got {name!r:.40}: "
                                   f"{sha!r:.40}", key="sources")

    def config(self, data_dir: str | None) -> DataConfig:
        return DataConfig(data_dir, self.question_field, self.answer_field, self.split_seed,
                          {k: v for k, v in self.max_records.items() if v is not None}, dict(self.skip))


@dataclass(frozen=True)
class JobSpec:
    """Every field a job spec may hold, typed (which ones a kind requires: JobKind.required); `lorasum job` parses
    a spec with it strictly, so a wrongly typed or unknown field is one error naming it."""

    kind: str
    run_dir: str  # the run folder: every path the job reads or writes is under it
    key: str | None = None
    model: str | None = None
    dtype: str | None = None
    autocast: str | None = None
    device: str | None = None
    data_dir: str | None = None
    partition: str | None = None  # train: domains joined by '+'
    sample: str | None = None  # train: "second" for the disjoint second sample
    init_seed: int | None = None
    data: DataSpec | None = None
    train: TrainConfig | None = None
    adapters: list[AdapterTerm] | None = None  # eval: the weighted sum evaluated
    domain: str | None = None
    split: Split | None = None
    max_length: Annotated[int | None, Range(1)] = None
    batch_size: Annotated[int | None, Range(1)] = None
    loss_on: LossOn | None = None
    a: list[AdapterTerm] | None = None  # similarity: the two sides
    b: list[AdapterTerm] | None = None
    all: list[str] | None = None  # inplace: the train keys of every fundamental, and the one removed
    removed: str | None = None
    domains: list[str] | None = None  # data_stats, weight_search (the subset whose validation split is pooled)
    method: str | None = None  # eval, weight_search: merge method of delta.methods (absent: the exact sum)
    params: dict | None = None  # its hyperparameters
    weights_from: str | None = None  # eval: the weight_search job whose best weights replace the terms' weights
    trials: int | None = None  # weight_search: TPE trials
    start: list[AdapterTerm] | None = None  # train (a repair): the adapters whose exact sum training continues
    fraction: Annotated[float | None, Range(0, 1, low_open=True)] = None  # its share of the full run's steps
    general: list[AdapterTerm] | None = None  # eval (a route): general-domain adapters for GenKnowSub
    inputs: Annotated[int | None, Range(1, 100_000)] = None  # predictors: questions per domain read (no answers)
    variants: list[str] | None = None  # throughput: the serving variants timed (lm.throughput.VARIANTS)
    rounds: Annotated[int | None, Range(1, 100)] = None  # throughput: how many times each variant runs

    def check(self) -> None:
        if self.weights_from is not None and not SEARCH_KEY.fullmatch(self.weights_from):
            raise LorasumError(f"must be a weight_search job's key, got {self.weights_from!r:.60}", key="weights_from")
        if self.method is not None:
            method_params(self.method, dict(self.params or {}), graded())
        for d in ([self.domain] if self.domain else []) + list(self.domains or []):
            check_domain(d, "domain" if d == self.domain else "domains")
        for d in partition_domains(self.partition) if self.partition else []:
            check_domain(d, "partition")
        for k in self.all or []:
            check_train_key(k, "all")
        if self.removed is not None:
            check_train_key(self.removed, "removed")
        for v in self.variants or []:
            if v not in VARIANTS:
                raise LorasumError(f"must name serving variants among {', '.join(VARIANTS)}, got {v!r:.60}",
                                   key="variants")


def job_key(spec: dict) -> str:
    """sha256 of the spec's canonical JSON without its location; stable across machines and runs."""
    body = {k: v for k, v in spec.items() if k not in _NOT_IN_KEY}
    return spec["kind"] + "-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def with_key(spec: dict) -> dict:
    return {**spec, "key": job_key(spec)}


def adapter_dir(run_dir: str | Path, train_key: str) -> Path:
    """RUN_DIR/adapters/<train key>; a symlink there (lorasum never makes one) is refused, so a job never reads or
    replaces a folder outside its run."""
    path = Path(run_dir) / "adapters" / train_key
    link = next((p for p in (path.parent, path) if p.is_symlink()), None)
    if link is not None:
        raise LorasumError(f"{link} is a symbolic link, which lorasum never makes in a run folder; remove it (the "
                           "adapter is trained again)")
    return path
