"""`lorasum generate`: text from the base model with a sum of adapters applied, to see what a composition does."""

from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .routing import serving
from ..errors import LorasumError
from .adapters import adapters_for
from .data import PROMPT_TEMPLATE, DataConfig, Record, tokenize_records
from .models import LoadedModel, max_positions
from .prompt_routing import prompt_choices
from .train import check_seed


def build_prompt(tokenizer, question: str, template: str = "lorasum") -> str:
    """The training template (`Question: …\\nAnswer:`) by default; the model's own chat template on request."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LorasumError("this tokenizer has no chat template; use --template lorasum")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(question=question)


class _FiniteScores(LogitsProcessor):
    """Stop generation when the next-token scores hold NaN or +Inf (a delta that pushed activations out of range):
    greedy decoding would print the first token of the vocabulary, sampling would fail inside torch."""

    def __init__(self, adapters: list):
        self.adapters = adapters

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            terms = " + ".join(f"{w:g}*{a.name}" for a, w in self.adapters)
            cause = f"with adapters {terms}: the weighted deltas push the model's activations out of range; use " \
                "smaller weights" if terms else "from the base model; with --dtype float16/bfloat16, try float32"
            raise LorasumError(f"the next-token scores are NaN or Inf {cause}")
        return scores


MIN_TEMPERATURE = 1e-3  # below it logits/temperature overflow float32 and sampling fails


def check_temperature(temperature: float) -> None:
    """0 is greedy; otherwise a finite temperature no smaller than MIN_TEMPERATURE (NaN and Inf are refused)."""
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)):
        raise LorasumError(f"must be 0 (greedy) or a finite number ≥ {MIN_TEMPERATURE:g}, got {temperature}",
                           key="temperature")


def check_generation_length(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """The prompt and the new tokens together fit the model's positions."""
    limit = max_positions(loaded.model)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if prompt_tokens >= limit:
        raise LorasumError(f"the prompt is {prompt_tokens} tokens, as long as or longer than the {limit} positions of "
                           f"model '{loaded.model_id}'; shorten it")
    raise LorasumError(f"{max_new_tokens} plus the prompt's {prompt_tokens} tokens exceeds the {limit} positions of "
                       f"model '{loaded.model_id}'; use at most {limit - prompt_tokens}", key="max_new_tokens")


@torch.no_grad()
def generate(loaded: LoadedModel, question: str, adapters=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, template: str = "lorasum",
             route: str | None = None, params: dict | None = None, general=()) -> str:
    """Greedy (temperature 0) or sampled continuation of the formatted prompt with the weighted sum of `adapters`
    (as for evaluate) applied, or with them routed by `route`; the model is restored afterwards."""
    if max_new_tokens < 1:
        raise LorasumError(f"must be at least 1, got {max_new_tokens}", key="max_new_tokens")
    check_temperature(temperature)
    check_seed(seed, "seed")
    if not 0 < top_p <= 1:
        raise LorasumError(f"must be in (0, 1], got {top_p}", key="top_p")
    tok, model = loaded.tokenizer, loaded.model
    adapters = adapters_for(loaded, adapters or [])
    prompt = build_prompt(tok, question, template)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=template != "chat").to(next(model.parameters()).device)
    check_generation_length(loaded, enc["input_ids"].shape[1], max_new_tokens)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    finite = LogitsProcessorList([_FiniteScores(adapters)])
    general = [a for a, _ in adapters_for(loaded, list(general))]
    if route == "prompt":  # the one adapter whose training questions are nearest this prompt, applied in place
        adapters, route = [adapters[_prompt_choice(loaded, adapters, question)]], None
    with serving(loaded, adapters, route, params, general) as served, loaded.autocast():
        out = served.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, logits_processor=finite, **sampling)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _prompt_choice(loaded: LoadedModel, terms: list, question: str) -> int:
    meta = terms[0][0].lorasum if terms and isinstance(terms[0][0].lorasum, dict) else {}
    length = int((meta.get("train") or {}).get("max_length", 64))  # the questions as the adapters saw them
    example = tokenize_records(loaded.tokenizer, [Record(question, "", "", 0.0)], length)
    return int(prompt_choices(loaded, terms, {"prompt": example}, DataConfig(), length)["prompt"][0])
