"""Domains: resolve names to records, split them by content hash, format and tokenize them.

A domain spec is `name`, `name[key=value,...]` (a filtered view: a sub-domain), a file path, or `hf:org/dataset`.
Specs joined by `+` form a merged-data partition (concatenated, then shuffled), as the paper's level-k blocks.

Splits are per record: sha256(split_seed, question, answer) mapped to [0, 1) decides train/validation/test
(80/10/10). The split of a record therefore depends only on its content and `split_seed` — never on training seeds,
on the order of the file, or on filters — so a sub-domain keeps its parent's split and a partition's test set is
exactly the union of its domains' test sets.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import dataclass, field

import torch

from .. import schema
from ..errors import LorasumError
from ..jsonfile import sha256_file
from .choices import SPLITS, LossOn, Split  # noqa: F401 - re-exported
from .datafiles import DATA_DIR_ENV, EXTENSIONS, data_dir_from, read_rows, resolve_source  # noqa: F401 - re-exported

SPLIT_BOUNDS = (0.8, 0.9)  # train < 0.8 <= validation < 0.9 <= test

# The one prompt template (documented in the README). The answer follows "Answer:" after one space; EOS ends it.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
ANSWER_TEMPLATE = " {answer}"

MIN_LENGTH = 8  # tokens: shorter records cannot hold the template's prompt and an answer token

_SPEC_RE = re.compile(r"^(?P<source>[^\[\]]+?)(?:\[(?P<filters>[^\[\]]*)\])?$")
# A domain that names a run's partitions and models (experiments, job specs) is plain: its name becomes part of
# partition, model and folder names and of the report's text and figures. Filter fields and values likewise (values
# may hold spaces).
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
VALUE_RULE = re.compile(r"[A-Za-z0-9_.-][A-Za-z0-9_. -]{0,63}")
NAME_RULE_TEXT = "letters, digits, '_', '.' and '-', starting with a letter or digit, at most 64 characters"


@dataclass(frozen=True)
class DataConfig:
    """Where records come from and how they are split and capped."""

    data_dir: str | None = None  # folder holding <name>.jsonl/.csv/.parquet (default: $LORASUM_DATA_DIR)
    question_field: str = "question"  # record field holding the question
    answer_field: str = "answer"  # record field holding the answer
    split_seed: int = 0  # salt of the content hash that assigns records to splits
    max_records: dict[str, int] = field(default_factory=dict)  # cap per domain and split, e.g. {"train": 200}
    skip: dict[str, int] = field(default_factory=dict)  # records passed over (content order) before the cap


@dataclass(frozen=True)
class Record:
    question: str
    answer: str
    domain: str  # the domain spec it was drawn from (e.g. "medicine[category=GARD]")
    key: float  # content hash in [0, 1): decides the split, and the order of capping


@dataclass
class Domain:
    """One domain spec resolved to its records, with provenance for fingerprints."""

    spec: str
    source: str  # file path or hub id
    source_sha256: str | None
    records: dict[str, list[Record]]  # split -> records (capped)
    available: dict[str, int]  # split -> records before capping
    skipped_empty: dict[str, int] = field(default_factory=dict)  # split -> records left out: empty question/answer

    def sizes(self) -> dict[str, int]:
        return {s: len(self.records[s]) for s in SPLITS}

    def fingerprint(self) -> dict:
        return {"spec": self.spec, "source": os.path.basename(self.source), "sha256": self.source_sha256,
                "split_sizes": self.sizes(), "available": dict(self.available),
                "skipped_empty": {s: self.skipped_empty.get(s, 0) for s in SPLITS}}


def split_key(question: str, answer: str, split_seed: int) -> float:
    """Stable content hash of a record in [0, 1)."""
    digest = hashlib.sha256(f"{split_seed}\x00{question}\x00{answer}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: float) -> str:
    return "train" if key < SPLIT_BOUNDS[0] else "validation" if key < SPLIT_BOUNDS[1] else "test"


def parse_spec(spec: str) -> tuple[str, dict[str, set[str]]]:
    """`medicine[category=GARD|NIDDK,qtype=symptoms]` -> ("medicine", {"category": {...}, "qtype": {...}})."""
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise LorasumError(f"bad domain spec '{spec}': use NAME, NAME[field=value,...] or a file path")
    filters: dict[str, set[str]] = {}
    for part in filter(None, (m["filters"] or "").split(",")):
        if "=" not in part:
            raise LorasumError(f"bad filter '{part}' in domain spec '{spec}': use field=value (values joined by |)")
        k, v = part.split("=", 1)
        filters[k.strip()] = {x.strip() for x in v.split("|")}
    return m["source"].strip(), filters


def check_domain(spec: str, key: str | None = None) -> None:
    """A domain of a run is NAME or NAME[field=value|value,...] with plain names, fields and values (NAME_RULE):
    no path, no hub id, nothing a file name or the report could choke on."""
    name, filters = parse_spec(spec)
    if not NAME_RULE.fullmatch(name):
        raise LorasumError(f"names domain {name!r}: a domain name is {NAME_RULE_TEXT}; rename the data file to "
                           "match", key=key)
    for fld, values in filters.items():
        for v in (fld, *values):
            if not VALUE_RULE.fullmatch(v):
                raise LorasumError(f"names domain {spec!r}, whose filter field or value {v!r} is not {NAME_RULE_TEXT} "
                                   "(values may also hold spaces)", key=key)


def load_domain(spec: str, config: DataConfig | None = None) -> Domain:
    """Resolve one domain spec (no `+`) to its split, capped records."""
    config = config or DataConfig()
    for split, cap in config.max_records.items():
        if split not in SPLITS:
            raise LorasumError(f"unknown split '{split}' in record caps; use {', '.join(SPLITS)}")
        if cap is not None and cap < 1:
            raise LorasumError(f"must be at least 1 (omit it for all records), got {cap}", key=f"max_{split}")
    source, filters = parse_spec(spec)
    path = resolve_source(source, config.data_dir)
    qf, af = config.question_field, config.answer_field
    rows = read_rows(path)
    _check_filter_fields(spec, path, filters, rows)
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    skipped = dict.fromkeys(SPLITS, 0)
    matched = 0
    for lineno, row in rows:
        q, a = (_text(row, fld, path, lineno) for fld in (qf, af))
        if filters and not all(str(row.get(k)) in vals for k, vals in filters.items()):
            continue
        matched += 1
        key = split_key(q, a, config.split_seed)
        if not q.strip() or not a.strip():  # nothing to learn or to score: left out, and counted
            skipped[split_of(key)] += 1
            continue
        by_split[split_of(key)].append(Record(q, a, spec, key))
    if filters and not matched:
        raise LorasumError(f"domain '{spec}' selects no records in {path} (0 train, 0 validation, 0 test of "
                           f"{len(rows)} records); check the filter's field and values")
    available = {s: len(v) for s, v in by_split.items()}
    for s in SPLITS:
        by_split[s].sort(key=lambda r: r.key)  # capping keeps a content-defined subset, independent of file order
        cap, skip = config.max_records.get(s), config.skip.get(s, 0)
        by_split[s] = by_split[s][skip:None if cap is None else skip + cap]
    sha = None if path.startswith("hf:") else sha256_file(path)
    return Domain(spec, path, sha, by_split, available, skipped)


def _text(row: dict, fld: str, path: str, lineno: int) -> str:
    """A record's question or answer: a string that is text (a lone UTF-16 surrogate, which JSON's `\\ud800`
    escape can produce, would only fail later, in the tokenizer or a file write)."""
    value = row.get(fld)
    if not isinstance(value, str):
        raise LorasumError(f"{path}:{lineno}: record has no text field '{fld}'; "
                           f"set the field name with --question-field/--answer-field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LorasumError(f"{path}:{lineno}: field '{fld}' holds a lone UTF-16 surrogate "
                           f"({ascii(value[e.start])} at character {e.start}), which is not text; write the "
                           "character itself or a valid surrogate pair") from None
    return value


def _check_filter_fields(spec: str, path: str, filters: dict, rows: list[tuple[int, dict]]) -> None:
    """A filter on a field that no record has would compare every record's missing value (`None`) and could select
    them all: refuse it, listing the fields the records do have."""
    present = {str(k) for _, row in rows for k in row}
    for name in filters:
        if name not in present:
            raise LorasumError(f"domain '{spec}' filters on field '{name}', which no record of {path} has; fields "
                               f"present: {', '.join(sorted(present)) or 'none'}")


def partition_domains(partition: str) -> list[str]:
    """`math+medicine` -> ["math", "medicine"]; duplicates are an error."""
    parts = [p.strip() for p in partition.split("+")]
    if not all(parts):
        raise LorasumError(f"bad partition '{partition}': join domain names with '+', e.g. math+medicine")
    if len(set(parts)) != len(parts):
        raise LorasumError(f"partition '{partition}' names a domain twice")
    return parts


def partition_records(domains: list[Domain], split: str, seed: int = 0, shuffle: bool = True) -> list[Record]:
    """Concatenate the domains' records of one split; shuffled for training (merged-data partitions)."""
    records = [r for d in domains for r in d.records[split]]
    if shuffle:
        random.Random(seed).shuffle(records)
    return records


def require_nonempty(domains: list[Domain], split: str) -> None:
    for d in domains:
        if not d.records[split]:
            empty = d.skipped_empty.get(split, 0)
            left_out = f", {empty} left out for an empty question or answer" if empty else ""
            raise LorasumError(f"domain '{d.spec}' has an empty {split} split ({d.available[split]} records before "
                               f"caps{left_out}, from {d.source}); add records or raise the cap")


# --- formatting and tokenization -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized record: ids (truncated), and which positions are answer tokens (incl. EOS)."""

    input_ids: list[int]
    answer_mask: list[int]
    truncated: bool
    full_length: int  # tokens before truncation


def format_record(question: str, answer: str) -> tuple[str, str]:
    """The prompt and answer text of the training template (EOS is appended as a token)."""
    return PROMPT_TEMPLATE.format(question=question), ANSWER_TEMPLATE.format(answer=answer)


def tokenize_record(tokenizer, record: Record, max_length: int) -> Example:
    """`Question: q\\nAnswer: a<EOS>`, prompt and answer tokenized apart so the answer mask is exact."""
    prompt, answer = format_record(record.question, record.answer)
    p_ids = tokenizer(prompt)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = p_ids + a_ids
    mask = [0] * len(p_ids) + [1] * len(a_ids)
    return Example(ids[:max_length], mask[:max_length], len(ids) > max_length, len(ids))


def check_max_length(max_length: int) -> None:
    """Records are cut to `max_length` tokens; fewer than MIN_LENGTH leave no room for an answer."""
    if max_length < MIN_LENGTH:
        raise LorasumError(f"{max_length} is too short; use at least {MIN_LENGTH} tokens", key="max_length")


def tokenize_records(tokenizer, records: list[Record], max_length: int) -> list[Example]:
    check_max_length(max_length)
    return [tokenize_record(tokenizer, r, max_length) for r in records]


def predicted_tokens(e: Example, loss_on: LossOn = "all") -> int:
    """Tokens the loss is computed on: every position after the first (labels are shifted), or answer tokens only."""
    return sum(e.answer_mask[1:]) if loss_on == "answer" else len(e.input_ids) - 1


def require_predicted_tokens(examples: dict[str, list[Example]], split: str, max_length: int,
                             loss_on: LossOn = "all") -> None:
    """Every domain has tokens to predict (else its perplexity is NaN); the error names the domain and split."""
    for domain, exs in examples.items():
        if exs and not any(predicted_tokens(e, loss_on) for e in exs):
            what = "answer tokens" if loss_on == "answer" else "tokens to predict"
            fix = "raise --max-length or use --loss-on all" if loss_on == "answer" else "raise --max-length"
            raise LorasumError(f"{domain} {split}: no {what} left at --max-length {max_length} (every "
                               f"{'answer' if loss_on == 'answer' else 'record'} is truncated away); {fix}; "
                               "see `lorasum data stats`")


def collate(examples: list[Example], pad_id: int, loss_on: LossOn = "all") -> dict:
    """Right-padded batch. Padding is excluded by the attention mask (never by token id: pad may equal EOS).

    labels are -100 on padding and, with loss_on="answer", on prompt tokens; the model shifts them itself.
    """
    schema.require(LossOn, loss_on, "loss_on")
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)  # (b, n)
    attn = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        attn[i, :k] = 1
        lab = torch.tensor(e.input_ids)
        if loss_on == "answer":
            lab[torch.tensor(e.answer_mask) == 0] = -100
        labels[i, :k] = lab
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}
