"""`lorasum generate`: text from the base model with a sum of adapters applied, to see what a composition does."""

from __future__ import annotations

import torch

from .data import PROMPT_TEMPLATE
from .evaluate import load_adapters_for
from .merge import apply_adapters, restore_weights, snapshot_weights


def build_prompt(tokenizer, question: str, template: str = "lorasum") -> str:
    """The training template (`Question: …\\nAnswer:`) by default; the model's own chat template on request."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            from .errors import LorasumError

            raise LorasumError("this tokenizer has no chat template; use --template lorasum")
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return PROMPT_TEMPLATE.format(question=question)


@torch.no_grad()
def generate(loaded, question: str, adapter_args: list[str] | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, template: str = "lorasum") -> str:
    """Greedy (temperature 0) or sampled continuation of the formatted prompt; the model is restored afterwards."""
    from .errors import LorasumError

    if max_new_tokens < 1:
        raise LorasumError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise LorasumError("--temperature must be >= 0 and --top-p in (0, 1]")
    tok, model = loaded.tokenizer, loaded.model
    adapters = load_adapters_for(loaded, adapter_args or [])
    snapshot = snapshot_weights(model, sorted({n for a, _ in adapters for n in a.layers}))
    prompt = build_prompt(tok, question, template)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=template != "chat").to(next(model.parameters()).device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    try:
        apply_adapters(model, adapters)
        with loaded.autocast():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **sampling)
    finally:
        restore_weights(model, snapshot)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
