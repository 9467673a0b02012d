"""How much two adapters get in each other's way on real inputs: activation- and function-space predictors of the
cost of summing them, computed from a small unlabeled sample of each domain's prompts (never their answers).

Activation space. Forward hooks on the BASE model (no adapter applied) capture each adapted module's input h at
every non-padding token t. From the factors (never the dense ΔW), u_t = ΔW_a h_t = s_a·B_a(A_a h_t) and
v_t = ΔW_b h_t = s_b·B_b(A_b h_t), in float64. This holds for both layouts: a Linear computes W h with W (out, in);
GPT-2's Conv1D computes h W with W (in, out) and its delta is (s·B A)ᵀ (`delta.factors.dense_delta`), so it adds
h (s·B A)ᵀ = (s·B A h)ᵀ too. Per adapted layer l, over the sample's T tokens:

    ratio_l  = sqrt(Σ_t ‖v_t‖²) / sqrt(Σ_t ‖u_t‖²)      how far b's delta moves a's hidden states, relative to a's own
    cosine_l = (1/T) Σ_t cos(u_t, v_t)                  (a token where u_t or v_t is zero counts as cosine 0)

and over the L layers: delta_ratio = (1/L) Σ_l ratio_l, delta_cosine = (1/L) Σ_l cosine_l, delta_cosine_rms =
sqrt((1/L) Σ_l cosine_l²). Direction "_a" uses a's inputs as above; "_b" uses b's inputs with a and b swapped
(ratio = ‖ΔW_a h‖ / ‖ΔW_b h‖). A layer where Σ‖u‖² = 0 has ratio inf (nan when both are 0).

Function space. kl_sum_a = (1/T) Σ_t KL(p_{base+Δa}(·|t) ‖ p_{base+Δa+Δb}(·|t)) over the next-token distributions at
a's non-padding tokens (log-softmax in float64; the weights changed exactly by `delta.apply.applied`); kl_sum_b
the same on b's inputs with base + Δb. It runs the summed model, so it is the dearest predictor here, kept as the
cheapest proxy that still does.

The symmetric value of each predictor is the mean of its two directions. `pair_interference` returns them all
with the wall seconds they took (to compare with the cost of evaluating the sum); `INTERFERENCE` names its keys.
For many pairs, `capture_inputs` once per domain and `stats_from_inputs` per pair skip the repeated forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from ..delta.apply import applied
from ..delta.factors import Adapter, LoraFactors, check_compatible
from ..errors import LorasumError
from .data import PROMPT_TEMPLATE
from .models import LoadedModel, check_positions

Sample = Sequence[str] | Mapping[str, torch.Tensor]  # prompts, or a batch of input_ids + attention_mask
KL_ROWS = 256  # next-token distributions turned to float64 at once (256 × a 49k vocabulary: 100 MB)

INTERFERENCE: dict[str, str] = {
    "delta_ratio": "mean of delta_ratio_a and delta_ratio_b",
    "delta_ratio_a": "on a's inputs, mean over layers of sqrt(Σ‖ΔW_b h‖²) / sqrt(Σ‖ΔW_a h‖²) over tokens",
    "delta_ratio_b": "on b's inputs, mean over layers of sqrt(Σ‖ΔW_a h‖²) / sqrt(Σ‖ΔW_b h‖²) over tokens",
    "delta_cosine": "mean of delta_cosine_a and delta_cosine_b",
    "delta_cosine_a": "on a's inputs, mean over layers of the token-mean cos(ΔW_a h, ΔW_b h)",
    "delta_cosine_b": "on b's inputs, mean over layers of the token-mean cos(ΔW_a h, ΔW_b h)",
    "delta_cosine_rms": "mean of delta_cosine_rms_a and delta_cosine_rms_b",
    "delta_cosine_rms_a": "on a's inputs, RMS over layers of the token-mean cos(ΔW_a h, ΔW_b h)",
    "delta_cosine_rms_b": "on b's inputs, RMS over layers of the token-mean cos(ΔW_a h, ΔW_b h)",
    "kl_sum": "mean of kl_sum_a and kl_sum_b",
    "kl_sum_a": "mean over a's tokens of KL(p_{base+Δa} ‖ p_{base+Δa+Δb}), nats",
    "kl_sum_b": "mean over b's tokens of KL(p_{base+Δb} ‖ p_{base+Δa+Δb}), nats",
    "tokens_a": "non-padding tokens of a's sample",
    "tokens_b": "non-padding tokens of b's sample",
    "seconds_activation": "wall seconds of the activation-space predictors (one base forward per sample)",
    "seconds_kl": "wall seconds of the KL predictors (two forwards per sample, with the weights changed)",
    "seconds": "wall seconds of the whole call, tokenization included",
}
SYMMETRIC = ("delta_ratio", "delta_cosine", "delta_cosine_rms", "kl_sum")  # one value per pair


# --- inputs ------------------------------------------------------------------------------------------------------

def question_prompts(questions: Sequence[str]) -> list[str]:
    """The training template's prompt of each question (`Question: q\\nAnswer:`), its answer left out."""
    return [PROMPT_TEMPLATE.format(question=q) for q in questions]


def prepare_inputs(loaded: LoadedModel, sample: Sample, max_length: int = 128, what: str = "sample"
                   ) -> dict[str, torch.Tensor]:
    """{"input_ids", "attention_mask"} (n, L) long: prompts tokenized as given, cut to `max_length` tokens and
    right-padded, or a ready batch checked (any other key, such as labels, is dropped). `what` names it in errors."""
    if isinstance(sample, Mapping):
        return _checked_batch(loaded, sample, what)
    if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
        raise LorasumError(f"the {what} must be a list of prompts or a batch of input_ids and attention_mask, got "
                           f"{type(sample).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise LorasumError(f"must be a whole number of at least 1, got {max_length!r}", key="max_length")
    check_positions(loaded, max_length)
    if bad := [type(s).__name__ for s in sample if not isinstance(s, str)]:
        raise LorasumError(f"the {what} must hold prompt strings, got a {bad[0]}")
    ids = [x[:max_length] for x in (loaded.tokenizer(s)["input_ids"] for s in sample) if x]
    if not ids:
        raise LorasumError(f"the {what} is empty (no prompt with a token); give at least one prompt of the domain")
    n = max(len(x) for x in ids)
    batch = torch.full((len(ids), n), loaded.tokenizer.pad_token_id, dtype=torch.long)  # (b, n)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return {"input_ids": batch, "attention_mask": mask}


def _checked_batch(loaded: LoadedModel, sample: Mapping, what: str) -> dict[str, torch.Tensor]:
    """A ready batch: 2-d integer input_ids and a 0/1 attention_mask of the same shape, ids in the vocabulary."""
    ids, mask = sample.get("input_ids"), sample.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise LorasumError(f"the {what} batch needs tensors 'input_ids' and 'attention_mask'")
    if ids.ndim != 2 or ids.shape != mask.shape or ids.is_floating_point() or mask.is_floating_point():
        raise LorasumError(f"the {what} batch needs integer input_ids and attention_mask of one shape (n, length), "
                           f"got {tuple(ids.shape)} and {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise LorasumError(f"the {what} batch's attention_mask must hold only 0 and 1")
    if not bool(mask.any()):
        raise LorasumError(f"the {what} is empty (no unmasked token); give at least one prompt of the domain")
    vocab = loaded.model.get_input_embeddings().num_embeddings
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise LorasumError(f"the {what} batch holds token ids outside the model's vocabulary of {vocab}")
    check_positions(loaded, int(ids.shape[1]), key="input_ids")
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


def _chunks(batch: dict[str, torch.Tensor], size: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(input_ids, attention_mask) row blocks of at most `size` rows, on the model's device."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise LorasumError(f"must be a whole number of at least 1, got {size!r}", key="batch_size")
    n = batch["input_ids"].shape[0]
    return [(batch["input_ids"][i:i + size].to(device), batch["attention_mask"][i:i + size].to(device))
            for i in range(0, n, size)]


# --- the adapted modules -----------------------------------------------------------------------------------------

def adapted_modules(model: torch.nn.Module, a: Adapter, b: Adapter) -> dict[str, torch.nn.Module]:
    """{layer: module} for the layers a and b share (`check_compatible`), each a Linear/Conv1D of their shape."""
    layers, modules = check_compatible([a, b]), dict(model.named_modules())
    out = {}
    for layer in layers:
        module = modules.get(layer)
        module = getattr(module, "base_layer", module)  # a PEFT-wrapped layer: its base layer sees the same h
        if not isinstance(module, (torch.nn.Linear, Conv1D)):
            found = "not in the model" if module is None else f"a {type(module).__name__}, not Linear/Conv1D"
            raise LorasumError(f"layer '{layer}' is {found}; use the base model the adapters were trained on")
        w = module.weight
        shape = (int(w.shape[1]), int(w.shape[0])) if isinstance(module, Conv1D) else tuple(w.shape)  # (out, in)
        if shape != a.layers[layer].shape:
            raise LorasumError(f"layer '{layer}': the model's map is {shape[1]} → {shape[0]} but the adapters' delta "
                               f"is {a.layers[layer].shape[1]} → {a.layers[layer].shape[0]}; use the base model "
                               "the adapters were trained on")
        out[layer] = module
    return out


def delta_times(f: LoraFactors, h: torch.Tensor) -> torch.Tensor:
    """ΔW h for rows h (T, in): s · (h Aᵀ) Bᵀ, (T, out), in h's dtype; the same for Linear and Conv1D layers."""
    return f.scale * ((h @ f.A.to(h).T) @ f.B.to(h).T)


# --- activation space --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActivationStats:
    """Per adapted layer, on one sample: ratio_l = sqrt(Σ‖ΔW_b h‖²)/sqrt(Σ‖ΔW_a h‖²), cosine_l = mean cos."""

    layers: list[str]
    ratio: np.ndarray  # (L,)
    cosine: np.ndarray  # (L,)
    tokens: int

    @property
    def mean_ratio(self) -> float:
        return float(self.ratio.mean())

    @property
    def mean_cosine(self) -> float:
        return float(self.cosine.mean())

    @property
    def rms_cosine(self) -> float:
        return float(np.sqrt((self.cosine ** 2).mean()))


def _token_sums(fa: LoraFactors, fb: LoraFactors, h: torch.Tensor) -> torch.Tensor:
    """(3,) float64: Σ_t ‖u_t‖², Σ_t ‖v_t‖², Σ_t cos(u_t, v_t) for rows h (T, in), u = ΔW_a h, v = ΔW_b h."""
    h = h.to(torch.float64)
    u, v = delta_times(fa, h), delta_times(fb, h)  # (T, out)
    nu, nv = u.norm(dim=1), v.norm(dim=1)  # (T,)
    den = nu * nv
    cos = torch.where(den > 0, (u * v).sum(1) / torch.where(den > 0, den, 1.0), 0.0)
    return torch.stack([(nu ** 2).sum(), (nv ** 2).sum(), cos.sum()])


@torch.no_grad()
def capture_inputs(loaded: LoadedModel, modules: Mapping[str, torch.nn.Module], sample: Sample,
                   max_length: int = 128, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{layer: (T, in) float32 at least}: each module's input h at the sample's T non-padding tokens, from forward
    hooks on the model as it is (the base model: no adapter applied). Holds T × Σ_l in_l floats (SmolLM2's 150 adapted
    layers over 500 tokens: 230 MB), so capture a domain once and reuse it for every pair it is in."""
    model = loaded.model
    device = next(model.parameters()).device
    chunks = _chunks(prepare_inputs(loaded, sample, max_length), batch_size, device)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])[current["mask"]]  # (t, in) non-padding rows
            store[name].append(rows.to(torch.promote_types(rows.dtype, torch.float32)))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    body = _body(model, modules.values())
    was_training = model.training
    model.eval()
    try:
        for ids, mask in chunks:
            current["mask"] = mask.bool().reshape(-1)
            with loaded.autocast():
                body(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = sum(int(mask.sum()) for _, mask in chunks)
    out = {n: torch.cat(v) for n, v in store.items()}
    if bad := [n for n, h in out.items() if h.shape[0] != tokens]:
        raise LorasumError(f"layer '{bad[0]}' ran {out[bad[0]].shape[0]} times for {tokens} tokens (not once per "
                           "forward pass); its inputs cannot be read by token")
    return out


def _body(model: torch.nn.Module, modules) -> torch.nn.Module:
    """The model without its LM head (transformers' `base_model`) when every hooked module is inside it: the
    vocabulary projection is no input of an adapted layer, so it need not run; else the whole model."""
    body = getattr(model, "base_model", model)
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in modules) else model


def stats_from_inputs(inputs: Mapping[str, torch.Tensor], a: Adapter, b: Adapter) -> ActivationStats:
    """ActivationStats of b's delta against a's on captured inputs {layer: (T, in)}, over a's layers (sorted);
    ΔW h from the factors in float64 (`delta_times`)."""
    layers = sorted(a.layers)
    if missing := [n for n in layers if n not in inputs or n not in b.layers]:
        raise LorasumError(f"layer '{missing[0]}' of adapter '{a.name}' has no captured inputs or is not in "
                           f"adapter '{b.name}'; capture the layers both adapters target")
    sums = []
    for n in layers:
        h = inputs[n]
        if h.shape[-1] != a.layers[n].shape[1] or h.shape[-1] != b.layers[n].shape[1]:
            raise LorasumError(f"layer '{n}': captured inputs have {h.shape[-1]} features but the adapters' delta "
                               f"takes {a.layers[n].shape[1]}; use the base model the adapters were trained on")
        sums.append(_token_sums(_on(a.layers[n], h.device), _on(b.layers[n], h.device), h))
    acc = torch.stack(sums).cpu().numpy()  # (L, 3)
    tokens = int(inputs[layers[0]].shape[0])
    if tokens == 0:
        raise LorasumError("the captured inputs hold no token; give at least one prompt of the domain")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(acc[:, 1]) / np.sqrt(acc[:, 0])
    return ActivationStats(layers, ratio, acc[:, 2] / tokens, tokens)


def activation_stats(loaded: LoadedModel, a: Adapter, b: Adapter, sample: Sample, max_length: int = 128,
                     batch_size: int = 16) -> ActivationStats:
    """b's delta against a's on this sample's hidden states, per adapted layer (see the module docstring): one
    forward pass of the base model, hooks at each adapted module's input, padding excluded."""
    inputs = capture_inputs(loaded, adapted_modules(loaded.model, a, b), sample, max_length, batch_size)
    return stats_from_inputs(inputs, a, b)


def _on(f: LoraFactors, device: torch.device) -> LoraFactors:
    """The factors in float64 on `device`."""
    return LoraFactors(f.A.to(device, torch.float64), f.B.to(device, torch.float64), f.scale, f.fan_in_fan_out)


# --- function space ----------------------------------------------------------------------------------------------

def _token_logits(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, V) float32 next-token logits at the non-padding positions of one block."""
    with loaded.autocast():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits  # (b, n, V)
    return logits[mask.bool()].float()


def kl_sum(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Σ_t KL(p_t ‖ q_t) = Σ_t Σ_v p_t(v) (log p_t(v) − log q_t(v)) over rows of logits (T, V), log-softmax in
    float64, KL_ROWS rows at a time."""
    total = 0.0
    for i in range(0, p_logits.shape[0], KL_ROWS):
        lp = p_logits[i:i + KL_ROWS].to(torch.float64).log_softmax(-1)  # (t, V)
        lq = q_logits[i:i + KL_ROWS].to(torch.float64).log_softmax(-1)
        p = lp.exp()
        total += float(torch.where(p > 0, p * (lp - lq), 0.0).sum())
    return total


@torch.no_grad()
def mean_kl(loaded: LoadedModel, a: Adapter, b: Adapter, sample: Sample, max_length: int = 128,
            batch_size: int = 16) -> tuple[float, int]:
    """(mean over the sample's non-padding tokens of KL(p_{base+Δa} ‖ p_{base+Δa+Δb}), tokens).

    base + Δa's logits of the whole sample are held (T × V float32) while the weights change to base + Δa + Δb.
    """
    model = loaded.model
    device = next(model.parameters()).device
    adapted_modules(model, a, b)
    chunks = _chunks(prepare_inputs(loaded, sample, max_length), batch_size, device)
    was_training = model.training
    model.eval()
    try:
        with applied(model, [(a, 1.0)]):
            alone = [_token_logits(loaded, ids, mask) for ids, mask in chunks]  # [(t, V)]
        with applied(model, [(a, 1.0), (b, 1.0)]):
            total = sum(kl_sum(p, _token_logits(loaded, ids, mask)) for p, (ids, mask) in zip(alone, chunks))
    finally:
        model.train(was_training)
    tokens = sum(int(p.shape[0]) for p in alone)
    return total / tokens, tokens


# --- one pair ----------------------------------------------------------------------------------------------------

def pair_interference(loaded: LoadedModel, a: Adapter, b: Adapter, inputs_a: Sample, inputs_b: Sample,
                      max_length: int = 128, batch_size: int = 16, kl: bool = True) -> dict[str, float]:
    """Every predictor of `INTERFERENCE` for the pair (a, b): both directions and their mean, token counts and wall
    seconds. inputs_a / inputs_b: prompts of each domain (no answers) or ready batches. `kl=False` skips the
    function-space ones (their keys are then absent)."""
    start = time.perf_counter()
    batches = {"a": prepare_inputs(loaded, inputs_a, max_length, "sample of a's domain"),
               "b": prepare_inputs(loaded, inputs_b, max_length, "sample of b's domain")}
    opts = dict(max_length=max_length, batch_size=batch_size)
    out: dict[str, float] = {}
    for side, (x, y) in (("a", (a, b)), ("b", (b, a))):
        st = activation_stats(loaded, x, y, batches[side], **opts)
        out.update({f"delta_ratio_{side}": st.mean_ratio, f"delta_cosine_{side}": st.mean_cosine,
                    f"delta_cosine_rms_{side}": st.rms_cosine, f"tokens_{side}": float(st.tokens)})
    out["seconds_activation"] = time.perf_counter() - start
    names = ["delta_ratio", "delta_cosine", "delta_cosine_rms"]
    if kl:
        begin = time.perf_counter()
        out["kl_sum_a"] = mean_kl(loaded, a, b, batches["a"], **opts)[0]
        out["kl_sum_b"] = mean_kl(loaded, b, a, batches["b"], **opts)[0]
        out["seconds_kl"] = time.perf_counter() - begin
        names.append("kl_sum")
    for name in names:
        out[name] = (out[f"{name}_a"] + out[f"{name}_b"]) / 2
    out["seconds"] = time.perf_counter() - start
    return {k: out[k] for k in INTERFERENCE if k in out}
