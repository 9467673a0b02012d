"""Generation: greedy output is deterministic, equals a hand-written argmax loop (also on stock PEFT with the
adapter), is unchanged by a zero-weight adapter, and leaves the model's weights as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import one_line_error

from lorasum.lm.generate import build_prompt, generate
from lorasum.lm.models import load_model


def argmax_loop(model, tok, question: str, n: int) -> str:
    """Reference greedy decoding: the training template, one token at a time, stop at EOS."""
    ids = tok(f"Question: {question}\nAnswer:")["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if t == tok.eos_token_id:
                break
            new.append(t)
    return tok.decode(new, skip_special_tokens=True).strip()


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_greedy_matches_reference_with_and_without_adapters(model_name, tiny_adapters, strict_reload):
    lm = load_model(model_name, device="cpu")
    before = state(lm.model)
    q = "what color is item 7?"
    base = generate(lm, q, max_new_tokens=20)
    assert base == generate(lm, q, max_new_tokens=20)  # deterministic
    assert base == argmax_loop(lm.model, lm.tokenizer, q, 20)
    folder = tiny_adapters[model_name]["colors"]
    assert generate(lm, q, [(folder, 0.0)], max_new_tokens=20) == base  # a zero-weight adapter changes nothing
    assert same_state(lm.model, before)
    tuned = generate(lm, q, [str(folder)], max_new_tokens=20)
    assert same_state(lm.model, before)  # the adapter is removed again, bit for bit
    ref = strict_reload(load_model(model_name, device="cpu").model, folder).eval()
    assert tuned == argmax_loop(ref, lm.tokenizer, q, 20)
    assert tuned != base  # the adapter (trained on this question's pattern) changes the continuation
    assert generate(lm, q, max_new_tokens=20) == base


def test_sampling_is_seeded_and_restores_the_model():
    lm = load_model("tiny-llama", device="cpu")
    before = state(lm.model)
    q = "pick something"
    runs = {seed: generate(lm, q, max_new_tokens=12, temperature=1.0, seed=seed) for seed in (0, 1, 2)}
    assert runs[1] == generate(lm, q, max_new_tokens=12, temperature=1.0, seed=1)
    assert len(set(runs.values())) > 1  # a random model sampled at T=1: seeds give different text
    assert same_state(lm.model, before)


def test_prompt_template_and_chat_template_error():
    lm = load_model("tiny-gpt2", device="cpu")
    assert build_prompt(lm.tokenizer, "why?") == "Question: why?\nAnswer:"
    from lorasum.errors import LorasumError

    with pytest.raises(LorasumError, match="no chat template"):
        build_prompt(lm.tokenizer, "why?", template="chat")


def test_generate_cli(tiny_adapters, run_cli):
    folder = tiny_adapters["tiny-gpt2"]["shapes"]
    rc, out, err, _ = run_cli("generate", "--model", "tiny-gpt2", "--adapter", f"{folder}:0.5",
                              "--max-new-tokens", 16, "how many sides has a square?")
    assert rc == 0, err
    lm = load_model("tiny-gpt2", device="cpu")
    assert out == generate(lm, "how many sides has a square?", [(folder, 0.5)], max_new_tokens=16) + "\n"
    for bad, culprit in ((["--max-new-tokens", 0], "--max-new-tokens"), (["--top-p", 0], "--top-p"),
                         (["--temperature", -1], "--temperature"), (["--template", "chat"], "chat template")):
        one_line_error(run_cli("generate", "--model", "tiny-gpt2", *bad, "hi"), culprit, quiet=True)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_two_adapters_equal_stock_peft_with_both_deltas(model_name, tiny_adapters, peft_sum_model):
    """generate with A and B:0.5 equals greedy decoding on stock PEFT's exact sum (add_weighted_adapter, cat)."""
    lm = load_model(model_name, device="cpu")
    before = state(lm.model)
    q = "what color is item 12?"
    colors, shapes = tiny_adapters[model_name]["colors"], tiny_adapters[model_name]["shapes"]
    both = generate(lm, q, [str(colors), (shapes, 0.5)], max_new_tokens=20)
    assert same_state(lm.model, before)
    ref = peft_sum_model(model_name, [colors, shapes], [1.0, 0.5])
    assert both == argmax_loop(ref, lm.tokenizer, q, 20)
    # both deltas matter: the next-token logits of the sum differ from those of each adapter alone
    summed = next_logits(lm, q, [colors, (shapes, 0.5)])
    assert not torch.allclose(summed, next_logits(lm, q, [colors]), atol=1e-4)
    assert not torch.allclose(summed, next_logits(lm, q, [(shapes, 0.5)]), atol=1e-4)


def next_logits(lm, q, terms):
    from lorasum.delta.apply import applied
    from lorasum.delta.peft_format import load_terms

    enc = lm.tokenizer(build_prompt(lm.tokenizer, q), return_tensors="pt")
    with applied(lm.model, load_terms(terms)), torch.no_grad():
        return lm.model(**enc).logits[0, -1]


def test_chat_template_formats_the_prompt(tiny_adapters, strict_reload):
    """--template chat: the tokenizer's own template (the tiny byte tokenizer has none, so one is set here)."""
    lm = load_model("tiny-gpt2", device="cpu")
    lm.tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    q = "what color is item 3?"
    prompt = build_prompt(lm.tokenizer, q, template="chat")
    assert prompt == "<user>what color is item 3?\n<assistant>"
    folder = tiny_adapters["tiny-gpt2"]["colors"]
    got = generate(lm, q, [str(folder)], max_new_tokens=12, template="chat")
    ref = strict_reload(load_model("tiny-gpt2", device="cpu").model, folder).eval()
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            t = int(ref(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if t == lm.tokenizer.eos_token_id:
                break
            new.append(t)
    assert got == lm.tokenizer.decode(new, skip_special_tokens=True).strip()
    # the base model continues the two templates differently (so the chat prompt is really the one used)
    assert generate(lm, q, max_new_tokens=12, template="chat") != generate(lm, q, max_new_tokens=12)
