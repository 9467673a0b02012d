"""`lorasum generate`: text from the base model with a sum of adapters applied, to see what a composition does."""

from __future__ import annotations

import torch

from ..delta.apply import applied
from ..errors import LorasumError
from .adapters import adapters_for
from .data import PROMPT_TEMPLATE
from .models import LoadedModel


def build_prompt(tokenizer, question: str, template: str = "lorasum") -> str:
    """The training template (`Question: …\\nAnswer:`) by default; the model's own chat template on request."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LorasumError("this tokenizer has no chat template; use --template lorasum")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(question=question)


@torch.no_grad()
def generate(loaded: LoadedModel, question: str, adapters=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, template: str = "lorasum") -> str:
    """Greedy (temperature 0) or sampled continuation of the formatted prompt with the weighted sum of `adapters`
    (as for evaluate) applied; the model is restored afterwards."""
    if max_new_tokens < 1:
        raise LorasumError(f"must be at least 1, got {max_new_tokens}", key="max_new_tokens")
    if not temperature >= 0:
        raise LorasumError(f"must be >= 0 (0 is greedy), got {temperature}", key="temperature")
    if not 0 < top_p <= 1:
        raise LorasumError(f"must be in (0, 1], got {top_p}", key="top_p")
    tok, model = loaded.tokenizer, loaded.model
    adapters = adapters_for(loaded, adapters or [])
    prompt = build_prompt(tok, question, template)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=template != "chat").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with applied(model, adapters), loaded.autocast():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, **sampling)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
