"""Adapters on a loaded base model: load them, check each was trained on this model, save a merged model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..delta.apply import check_model_matches
from ..delta.peft_format import Term, load_terms
from ..files import atomic_dir, atomic_write_json
from .models import LoadedModel, weights_fingerprint


def adapters_for(loaded: LoadedModel, items) -> list[Term]:
    """`load_terms(items)`, each adapter checked against the loaded model (see check_base)."""
    adapters = load_terms(items)
    check_base(loaded, adapters)
    return adapters


def check_base(loaded: LoadedModel, adapters: list[Term]) -> str | None:
    """Each adapter was trained on the loaded model: its id, and its weight hash where the adapter recorded one and
    the weights are fp32 (the hash is computed once). Returns that hash, or None where none was needed."""
    fp32 = next(loaded.model.parameters()).dtype == torch.float32
    fingerprint = weights_fingerprint(loaded.model) if fp32 and any(a.base_sha256 for a, _ in adapters) else None
    for adapter, _ in adapters:
        check_model_matches(adapter, loaded.model_id, fingerprint)
    return fingerprint


def save_merged(model: torch.nn.Module, tokenizer, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save the (merged) model and tokenizer as a transformers folder, atomically (`meta` as lorasum-merge.json)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            atomic_write_json(tmp / "lorasum-merge.json", meta)
    return out
