"""`lorasum data stats`: what truncation leaves of each domain, so users see it before they train.

At 64 SmolLM2 tokens most MathQA records keep no answer token at all; these numbers make that visible.
"""

from __future__ import annotations

from .data import SPLITS, DataConfig, Domain, load_domain, tokenize_records


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def domain_stats(domain: Domain, tokenizer, max_length: int) -> list[dict]:
    """One row per split: records (and those left out as empty), tokens, truncation, answer-token share, answers
    cut off, cross-split duplicates."""
    questions = {s: {_norm(r.question) for r in domain.records[s]} for s in SPLITS}
    rows = []
    for split in SPLITS:
        records = domain.records[split]
        ex = tokenize_records(tokenizer, records, max_length)
        tokens = sum(len(e.input_ids) for e in ex)
        answer_tokens = sum(sum(e.answer_mask) for e in ex)
        others = set().union(*(questions[s] for s in SPLITS if s != split))
        n = len(records)
        rows.append({
            "domain": domain.spec, "split": split, "records": n,
            "skipped_empty": domain.skipped_empty.get(split, 0),  # left out: an empty question or answer
            "tokens": tokens,
            "mean_tokens_before_truncation": sum(e.full_length for e in ex) / n if n else 0.0,
            "truncated_share": sum(e.truncated for e in ex) / n if n else 0.0,
            "answer_token_share": answer_tokens / tokens if tokens else 0.0,
            "answer_cut_off": sum(1 for e in ex if sum(e.answer_mask) == 0),
            "duplicates_across_splits": sum(1 for r in records if _norm(r.question) in others),
        })
    return rows


def data_stats(specs: list[str], tokenizer, data: DataConfig | None = None, max_length: int = 64) -> list[dict]:
    return [row for spec in specs for row in domain_stats(load_domain(spec, data), tokenizer, max_length)]
