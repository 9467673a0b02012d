"""Activation- and function-space interference of two adapters on tiny random GPT-2 (Conv1D) and Llama (Linear):
against a dense float64 computation from inputs captured independently (each prompt run alone, so padding is
excluded by construction) and against a model whose weights are patched by hand; exact identities (b = a, b = −a,
b = 2a); the API takes prompts only; bad input is one line."""

import inspect

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from conftest import LOOSER, float32_noise
from lorasum.delta.factors import Adapter, LoraFactors
from lorasum.errors import LorasumError
from lorasum.lm.interference import (INTERFERENCE, SYMMETRIC, activation_stats, capture_inputs, mean_kl,
                                     pair_interference, prepare_inputs, question_prompts, stats_from_inputs)
from lorasum.lm.models import load_model

MODELS = ["tiny-gpt2", "tiny-llama"]
PROMPTS_A = question_prompts(["what color is item 3?", "hi", "and the next one, item 4?"])
PROMPTS_B = question_prompts(["how many sides has a square?", "a pentagon?"])
EPS32 = torch.finfo(torch.float32).eps


def _targets(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and n.rsplit(".", 1)[-1] in names}


def _adapter(lm, seed: int, r: int = 4, scale: float = 2.0) -> Adapter:
    """Random factors on every default target: A ~ N(0, 1/in), B ~ 0.3·N(0, 1), s = 2 (a visible but mild delta)."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for n, m in _targets(lm.model, lm.default_targets).items():
        conv = isinstance(m, Conv1D)
        fan_in, fan_out = m.weight.shape if conv else m.weight.shape[::-1]
        layers[n] = LoraFactors(torch.randn(r, fan_in, generator=gen) / fan_in ** 0.5,
                                torch.randn(fan_out, r, generator=gen) * 0.3, scale, conv)
    return Adapter(f"r{seed}", "", {}, layers)


def _scaled(adapter: Adapter, c: float) -> Adapter:
    return Adapter(f"{c}*{adapter.name}", "", {}, {n: LoraFactors(f.A, f.B, f.scale * c, f.fan_in_fan_out)
                                                  for n, f in adapter.layers.items()})


# --- dense references --------------------------------------------------------------------------------------------

def _dense_in_layout(f: LoraFactors) -> torch.Tensor:
    """ΔW = s·B A in float64, in the base weight's layout: (out, in), or transposed (in, out) for Conv1D."""
    d = f.scale * (f.B.double() @ f.A.double())  # (out, in)
    return d.T if f.fan_in_fan_out else d


def _apply_dense(h: torch.Tensor, f: LoraFactors) -> torch.Tensor:
    """What the layer adds for inputs h (T, in): h ΔW for Conv1D (y = x W), h ΔWᵀ for Linear (y = x Wᵀ)."""
    d = _dense_in_layout(f)
    return h @ d if f.fan_in_fan_out else h @ d.T


def _captured(model: torch.nn.Module, layers: list[str], prompts: list[str], tok) -> dict[str, torch.Tensor]:
    """Each layer's inputs (T, in) in float64 over every token, each prompt run alone (no padding at all)."""
    modules, store = dict(model.named_modules()), {n: [] for n in layers}
    handles = [modules[n].register_forward_hook(lambda m, args, out, n=n: store[n].append(args[0][0].double()))
               for n in layers]
    with torch.no_grad():
        for p in prompts:
            model(input_ids=torch.tensor([tok(p)["input_ids"]]))
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def _dense_stats(h: dict[str, torch.Tensor], a: Adapter, b: Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) ratio sqrt(Σ‖ΔW_b h‖²)/sqrt(Σ‖ΔW_a h‖²) and (L,) mean cos(ΔW_a h, ΔW_b h), from dense float64 ΔW."""
    ratio, cosine = [], []
    for n in sorted(a.layers):
        u, v = _apply_dense(h[n], a.layers[n]), _apply_dense(h[n], b.layers[n])  # (T, out)
        ratio.append(v.norm() / u.norm())
        cosine.append(torch.nn.functional.cosine_similarity(u, v, dim=1).mean())
    return torch.stack(ratio), torch.stack(cosine)


def _patched_logits(name: str, dtype: torch.dtype, adapters: list[Adapter], prompts: list[str]) -> torch.Tensor:
    """(T, V) logits of every prompt (each alone) with W += ΔW (in its layout) for each adapter, patched by hand."""
    lm = load_model(name, device="cpu")
    model = lm.model.to(dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for ad in adapters:
            for n, f in ad.layers.items():
                modules[n].weight += _dense_in_layout(f).to(dtype)
        return torch.cat([model(input_ids=torch.tensor([lm.tokenizer(p)["input_ids"]])).logits[0] for p in prompts])


def _dense_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


# --- activation space --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_activation_stats_vs_dense_float64(name, device):
    lm = load_model(name, device=device)
    a, b = _adapter(lm, 0), _adapter(lm, 1)
    got = activation_stats(lm, a, b, PROMPTS_A, batch_size=2)  # padded batches of 2 prompts
    assert got.layers == sorted(a.layers) and got.tokens == sum(len(lm.tokenizer(p)["input_ids"]) for p in PROMPTS_A)
    ref64 = load_model(name, device="cpu")
    ref64.model.double()
    h64 = _captured(ref64.model, got.layers, PROMPTS_A, lm.tokenizer)
    h32 = _captured(load_model(name, device="cpu").model, got.layers, PROMPTS_A, lm.tokenizer)
    ratio64, cos64 = _dense_stats(h64, a, b)
    ratio32, cos32 = _dense_stats(h32, a, b)  # the same reference from float32 inputs: float32's own noise
    # the captured inputs are each prompt's own, token for token: padding is left out
    inputs = capture_inputs(lm, {n: m for n, m in lm.model.named_modules() if n in a.layers}, PROMPTS_A, batch_size=2)
    for n in got.layers:
        assert torch.allclose(inputs[n].double().cpu(), h64[n], rtol=0, atol=float32_noise(h32[n], h64[n], device))
    assert torch.allclose(torch.from_numpy(got.ratio), ratio64, rtol=0,
                          atol=float32_noise(ratio32, ratio64, device))
    assert torch.allclose(torch.from_numpy(got.cosine), cos64, rtol=0, atol=float32_noise(cos32, cos64, device))
    assert got.mean_ratio == pytest.approx(float(ratio64.mean()), abs=float32_noise(ratio32, ratio64, device))
    assert got.rms_cosine == pytest.approx(float(cos64.pow(2).mean().sqrt()), abs=float32_noise(cos32, cos64, device))


@pytest.mark.parametrize("name", MODELS)
def test_activation_identities(name):
    """b = a: ratio 1, cosine 1; b = −a: ratio 1, cosine −1; b = 2a: ratio 2 on a's side and ½ on b's. The same
    float64 products of the same captured h, so exact up to float64 round-off (1e-12 of values of order 1)."""
    lm = load_model(name, device="cpu")
    a = _adapter(lm, 0)
    for other, ratio, cos in ((a, 1.0, 1.0), (_scaled(a, -1.0), 1.0, -1.0), (_scaled(a, 2.0), 2.0, 1.0)):
        got = activation_stats(lm, a, other, PROMPTS_A)
        assert got.ratio == pytest.approx([ratio] * len(got.layers), abs=1e-12)
        assert got.cosine == pytest.approx([cos] * len(got.layers), abs=1e-12)
    head = lm.model.lm_head  # a delta on the LM head: its input is hooked on the whole model, not its body
    gen = torch.Generator().manual_seed(5)
    on_head = Adapter("head", "", {}, {"lm_head": LoraFactors(torch.randn(2, head.in_features, generator=gen),
                                                              torch.randn(head.out_features, 2, generator=gen), 1.0)})
    got = activation_stats(lm, on_head, _scaled(on_head, -3.0), PROMPTS_A)
    assert got.layers == ["lm_head"] and got.ratio == pytest.approx([3.0]) and got.cosine == pytest.approx([-1.0])
    res = pair_interference(lm, a, _scaled(a, 2.0), PROMPTS_A, PROMPTS_B, kl=False)
    assert res["delta_ratio_a"] == pytest.approx(2.0, abs=1e-12) and res["delta_ratio_b"] == pytest.approx(0.5)
    assert res["delta_ratio"] == pytest.approx(1.25) and "kl_sum" not in res


# --- function space ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_kl_vs_hand_patched_weights(name, device):
    lm = load_model(name, device=device)
    a, b = _adapter(lm, 0), _adapter(lm, 1)
    got, tokens = mean_kl(lm, a, b, PROMPTS_A, batch_size=2)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        pa = _patched_logits(name, dtype, [a], PROMPTS_A)
        pab = _patched_logits(name, dtype, [a, b], PROMPTS_A)
        refs[dtype] = (_dense_kl(pa, pab), pa)
    kl64, logits64 = refs[torch.float64]
    assert tokens == logits64.shape[0]
    # float32 noise of the same computation, and at least the KL moved by logits off by ~eps32·max|logit|
    tol = max(float32_noise(refs[torch.float32][0][None], kl64[None], device),
              10 * LOOSER[device] * EPS32 * float(logits64.abs().max()))
    assert float(kl64) > 100 * tol  # the deltas matter: the comparison is not of two round-off noises
    assert got == pytest.approx(float(kl64), abs=tol)


def test_pair_interference_is_symmetrised_and_timed():
    lm = load_model("tiny-llama", device="cpu")
    a, b = _adapter(lm, 0), _adapter(lm, 1)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = pair_interference(lm, a, b, PROMPTS_A, PROMPTS_B)
    assert list(res) == list(INTERFERENCE)  # every named key, in the registry's order
    for name in SYMMETRIC:
        assert res[name] == pytest.approx((res[f"{name}_a"] + res[f"{name}_b"]) / 2)
    side_a, side_b = activation_stats(lm, a, b, PROMPTS_A), activation_stats(lm, b, a, PROMPTS_B)
    assert res["delta_ratio_a"] == side_a.mean_ratio and res["delta_ratio_b"] == side_b.mean_ratio
    assert res["kl_sum_b"] == mean_kl(lm, b, a, PROMPTS_B)[0]
    assert res["seconds"] >= res["seconds_activation"] + res["seconds_kl"] > 0
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())  # the base weights, restored
    # inputs captured once serve every pair of the domain
    inputs = capture_inputs(lm, {n: m for n, m in lm.model.named_modules() if n in a.layers}, PROMPTS_A)
    again = stats_from_inputs(inputs, a, b)
    assert again.ratio.tolist() == side_a.ratio.tolist() and again.cosine.tolist() == side_a.cosine.tolist()


# --- inputs only -------------------------------------------------------------------------------------------------

def test_takes_inputs_only_and_ignores_labels():
    params = set(inspect.signature(pair_interference).parameters)
    assert not params & {"answers", "labels", "targets", "records"}
    lm = load_model("tiny-gpt2", device="cpu")
    a, b = _adapter(lm, 0), _adapter(lm, 1)
    batch = prepare_inputs(lm, PROMPTS_A)
    assert set(batch) == {"input_ids", "attention_mask"}
    with_labels = dict(batch, labels=torch.full_like(batch["input_ids"], -100))
    from_text = pair_interference(lm, a, b, PROMPTS_A, PROMPTS_B)
    from_ids = pair_interference(lm, a, b, with_labels, prepare_inputs(lm, PROMPTS_B))
    for k in INTERFERENCE:
        if not k.startswith("seconds"):
            assert from_ids[k] == from_text[k]


def test_max_length_cuts_prompts():
    lm = load_model("tiny-gpt2", device="cpu")
    batch = prepare_inputs(lm, PROMPTS_A, max_length=8)
    assert batch["input_ids"].shape[1] == 8
    assert batch["attention_mask"].sum(1).tolist() == [min(8, len(lm.tokenizer(p)["input_ids"])) for p in PROMPTS_A]


# --- bad input ---------------------------------------------------------------------------------------------------

def _bad_cases(lm, a, b):
    other = Adapter("few", "", {}, dict(list(b.layers.items())[:2]))
    ids = prepare_inputs(lm, PROMPTS_A)
    return [
        (lambda: pair_interference(lm, a, b, [], PROMPTS_B), "sample of a's domain is empty"),
        (lambda: pair_interference(lm, a, b, PROMPTS_A, [""]), "sample of b's domain is empty"),
        (lambda: pair_interference(lm, a, b, "just one string", PROMPTS_B), "list of prompts"),
        (lambda: pair_interference(lm, a, other, PROMPTS_A, PROMPTS_B), "adapters must target the same layers"),
        (lambda: pair_interference(lm, a, b, PROMPTS_A, PROMPTS_B, max_length=10_000), "max_length"),
        (lambda: pair_interference(lm, a, b, PROMPTS_A, PROMPTS_B, batch_size=0), "batch_size"),
        (lambda: activation_stats(lm, a, b, {"input_ids": ids["input_ids"]}), "needs tensors"),
        (lambda: activation_stats(lm, a, b, dict(ids, attention_mask=ids["attention_mask"][:, :2])), "one shape"),
        (lambda: activation_stats(lm, a, b, dict(ids, attention_mask=torch.zeros_like(ids["input_ids"]))),
         "is empty"),
        (lambda: mean_kl(lm, a, b, dict(ids, input_ids=ids["input_ids"] + 10_000)), "vocabulary"),
        (lambda: stats_from_inputs({}, a, b), "has no captured inputs"),
    ]


def test_bad_input_is_one_line():
    lm = load_model("tiny-gpt2", device="cpu")
    a, b = _adapter(lm, 0), _adapter(lm, 1)
    for call, words in _bad_cases(lm, a, b):
        with pytest.raises(LorasumError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    llama = load_model("tiny-llama", device="cpu")
    with pytest.raises(LorasumError, match="not in the model"):
        activation_stats(llama, a, b, PROMPTS_A)
