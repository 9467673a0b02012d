"""Token-weighted perplexity, exp(total NLL / predicted tokens), kept per example so models can be paired."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import schema
from ..errors import LorasumError
from ..files import atomic_write_text
from ..progress import progress
from .adapters import adapters_for
from .data import DataConfig, Example, Split, collate, load_domain, require_nonempty, require_predicted_tokens, \
    tokenize_records
from .models import LoadedModel, check_positions
from ..delta.apply import applied
from .prompt_routing import prompt_choices
from .routing import serving


@dataclass(frozen=True)
class ExampleNLL:
    domain: str
    index: int  # position in the domain's (content-ordered) split
    nll: float  # summed negative log-likelihood over the predicted tokens, nats
    tokens: int  # predicted tokens (padding never counted)


@dataclass(frozen=True)
class Perplexity:
    nll: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "loss": self.loss, "tokens": self.tokens}


def batch_nll(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL and predicted-token count for a collated batch.  # (b,), (b,)

    Labels are shifted (not logits), so the (b, n, V) logits are read in place without a copy.
    """
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    b, n, v = logits.shape
    labels = F.pad(batch["labels"].to(device)[:, 1:], (0, 1), value=-100)  # (b, n): position t predicts t+1
    nll = F.cross_entropy(logits.reshape(b * n, v).float(), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(b, n)
    mask = labels != -100
    return (nll * mask).sum(1), mask.sum(1)


@torch.no_grad()
def per_example_nll(model: torch.nn.Module, examples: dict[str, list[Example]], pad_id: int, batch_size: int = 16,
                    loss_on: str = "all", desc: str = "eval") -> list[ExampleNLL]:
    """NLL of every example of every domain. Batches are formed from length-sorted examples (less padding)."""
    was_training = model.training
    model.eval()
    flat = [(d, i, e) for d, exs in examples.items() for i, e in enumerate(exs)]
    order = sorted(range(len(flat)), key=lambda j: len(flat[j][2].input_ids))
    out: list[ExampleNLL | None] = [None] * len(flat)
    total_tokens = sum(len(e.input_ids) for _, _, e in flat)
    with progress(total=total_tokens, desc=desc, unit="tok") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([flat[j][2] for j in idx], pad_id, loss_on)
            nll, n = batch_nll(model, batch)
            for j, a, b in zip(idx, nll.tolist(), n.tolist()):
                out[j] = ExampleNLL(flat[j][0], flat[j][1], a, int(b))
            bar.update(int(batch["attention_mask"].sum()))
    model.train(was_training)
    return out  # type: ignore[return-value]


def summarize(rows: list[ExampleNLL], domains: list[str]) -> dict[str, dict]:
    """Per-domain perplexity, the pooled figure over their union (exp(ΣNLL/Σtokens)) and the macro mean."""
    result: dict[str, dict] = {}
    for d in domains:
        sel = [r for r in rows if r.domain == d]
        result[d] = Perplexity(sum(r.nll for r in sel), sum(r.tokens for r in sel)).as_dict()
    if len(domains) > 1:
        result["pooled"] = Perplexity(sum(r.nll for r in rows), sum(r.tokens for r in rows)).as_dict()
        result["macro_mean"] = {"perplexity": sum(result[d]["perplexity"] for d in domains) / len(domains)}
    return result


def check_finite_nll(rows: list[ExampleNLL], adapters: list) -> None:
    """A loss that is Inf or NaN is refused, not reported: it comes from weights pushed out of range (a huge
    adapter weight) or a base model that overflows in its precision."""
    bad = next((r for r in rows if not math.isfinite(r.nll)), None)
    if bad is None:
        return
    where = f"example {bad.index} of domain '{bad.domain}'"
    if adapters:
        terms = " + ".join(f"{w:g}*{a.name}" for a, w in adapters)
        raise LorasumError(f"the loss is {bad.nll} on {where} with adapters {terms}: the weighted deltas push the "
                           "model's activations out of range; use smaller weights")
    raise LorasumError(f"the base model's loss is {bad.nll} on {where}; with --dtype float16/bfloat16, try float32")


def example_rows(rows: list[ExampleNLL]) -> list[dict]:
    return [asdict(r) for r in rows]


def prompt_routed_nll(loaded: LoadedModel, terms: list[tuple], examples: dict[str, list[Example]],
                      data: DataConfig, max_length: int, batch_size: int, loss_on: str) -> tuple[list, dict]:
    """Each example served by the one adapter whose training questions' centroid is nearest its prompt's features
    (lm.prompt_routing; never its answer): (rows in the examples' order, {domain: {adapter: examples sent}})."""
    choice = prompt_choices(loaded, terms, examples, data, max_length, batch_size)
    adapters = [a for a, _ in terms]
    rows: dict = {}
    for k, a in enumerate(adapters):
        picked = {d: [i for i, c in enumerate(choice[d]) if c == k] for d in examples}
        group = {d: [examples[d][i] for i in idx] for d, idx in picked.items() if idx}
        if not group:
            continue
        with applied(loaded.model, [(a, 1.0)]), loaded.autocast():
            for r in per_example_nll(loaded.model, group, loaded.tokenizer.pad_token_id, batch_size, loss_on):
                rows[(r.domain, picked[r.domain][r.index])] = ExampleNLL(r.domain, picked[r.domain][r.index], r.nll,
                                                                         r.tokens)
    ordered = [rows[(d, i)] for d, exs in examples.items() for i in range(len(exs))]
    chosen = {d: {a.name: int((choice[d] == k).sum()) for k, a in enumerate(adapters)} for d in examples}
    return ordered, chosen


def evaluate(loaded: LoadedModel, domains: list[str], adapters=None, data: DataConfig | None = None,
             split: str = "test", max_length: int = 64, batch_size: int = 16, loss_on: str = "all",
             per_example: str | None = None, route: str | None = None, params: dict | None = None,
             general=()) -> dict:
    """Perplexity of the base model plus the weighted sum of adapters, per domain, pooled and macro-averaged.

    `adapters`: folders, Adapters or (folder or Adapter, weight) pairs (see delta.peft_format.load_terms). The sum
    is applied in place to the loaded model's weights and restored from a saved copy afterwards, so the model is
    unchanged when this returns (no round-off accumulates over many calls). `per_example` names a JSONL file for
    each example's NLL and token count. With `route` (lm.routing: "arrow", at `params`) the adapters are kept
    separate and routed per token instead (`general`: general-domain adapters for GenKnowSub).
    """
    schema.require(Split, split, "split")
    if not domains:
        raise LorasumError("eval needs at least one domain")
    if len(set(domains)) != len(domains):
        raise LorasumError(f"a domain is named twice: {', '.join(domains)}", key="data")
    check_positions(loaded, max_length)
    data = data or DataConfig()
    loaded_domains = [load_domain(d, data) for d in domains]
    require_nonempty(loaded_domains, split)
    examples = {d.spec: tokenize_records(loaded.tokenizer, d.records[split], max_length) for d in loaded_domains}
    require_predicted_tokens(examples, split, max_length, loss_on)
    adapters = adapters_for(loaded, adapters or [])
    general = [a for a, _ in adapters_for(loaded, list(general))]
    chosen = None
    if route == "prompt":
        rows, chosen = prompt_routed_nll(loaded, adapters, examples, data, max_length, batch_size, loss_on)
    else:
        with serving(loaded, adapters, route, params, general) as model, loaded.autocast():
            rows = per_example_nll(model, examples, loaded.tokenizer.pad_token_id, batch_size, loss_on)
    check_finite_nll(rows, adapters)
    if per_example:
        atomic_write_text(per_example, "".join(json.dumps(r) + "\n" for r in example_rows(rows)))
    return {
        "model": loaded.model_id,
        "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters],
        "split": split,
        **({"route": {"name": route, "params": params, "general": [a.name for a in general],
                      **({"chosen": chosen} if chosen is not None else {})}} if route else {}),
        "results": summarize(rows, domains),
    }
