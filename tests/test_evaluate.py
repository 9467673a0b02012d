"""Perplexity against hand computations from the logits, EOS counting with pad == EOS, pooled/macro figures, the
per-example file, and the sum of two adapters against stock PEFT (GPT-2 Conv1D and Llama)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import LOOSER, color_rows, float32_noise, model_device, on_cpu64, write_jsonl

from lorasum.lm.data import DataConfig, Record, load_domain, tokenize_record, tokenize_records
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.evaluate import evaluate, per_example_nll
from lorasum.delta.apply import apply_adapters
from lorasum.lm.models import load_model


def hand_nll(model, ids: list[int], weights: list[int] | None = None) -> tuple[float, int]:
    """Σ -log p(token t | tokens < t) over t >= 1, from one unpadded forward pass on the model's device, then
    log_softmax and gather on the CPU in float64."""
    with torch.no_grad():
        logits = on_cpu64(model(input_ids=torch.tensor([ids], device=model_device(model))).logits[0])  # (n, V)
    logp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]  # (n-1,)
    w = torch.ones_like(logp) if weights is None else torch.tensor(weights[1:], dtype=torch.float64)
    return float(-(logp * w).sum()), int(w.sum())


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2", device="cpu")


RECORDS = [Record("hi", "yo", "d", 0.0), Record("what is two plus two?", "four, of course", "d", 0.0),
           Record("and three?", "three plus two is five", "d", 0.0)]


# --- the perplexity computation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_per_example_nll_equals_hand_computation(model_name, device):
    lm = load_model(model_name, device=device)
    ref = load_model(model_name, device="cpu").model.double()  # the reference: the same weights in float64
    exs = tokenize_records(lm.tokenizer, RECORDS, 64)
    # a float32 forward pass of these 2-layer models is off the float64 one by ~1e-7 per token's nll (~5.5 nats):
    # rel 1e-5 of a sum of 5-30 terms leaves > 10x room on the CPU
    rel = 1e-5 * LOOSER[device]
    rows = per_example_nll(lm.model, {"d": exs}, lm.tokenizer.pad_token_id, batch_size=3)  # one padded batch
    for row, ex in zip(rows, exs):
        nll, n = hand_nll(ref, ex.input_ids)
        assert row.tokens == n == len(ex.input_ids) - 1  # every token after the first is predicted, EOS included
        assert row.nll == pytest.approx(nll, rel=rel)
    # loss on answer tokens only: the prompt positions drop out of both the sum and the count
    rows = per_example_nll(lm.model, {"d": exs}, lm.tokenizer.pad_token_id, batch_size=3, loss_on="answer")
    for row, ex in zip(rows, exs):
        nll, n = hand_nll(ref, ex.input_ids, ex.answer_mask)
        assert row.tokens == n == sum(ex.answer_mask)
        assert row.nll == pytest.approx(nll, rel=rel)


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_eos_counted_and_padding_excluded(model_name):
    """pad == EOS: the record's own EOS is predicted and counted; the padding after it (same id) is not."""
    lm = load_model(model_name, device="cpu")
    tok = lm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    short = tokenize_record(tok, Record("hi", "yo", "d", 0.0), 64)
    long = tokenize_record(tok, Record("a much longer question here", "and a longer answer too", "d", 0.0), 64)
    alone = per_example_nll(lm.model, {"d": [short]}, tok.pad_token_id, batch_size=1)[0]
    padded = per_example_nll(lm.model, {"d": [short, long]}, tok.pad_token_id, batch_size=2)[0]
    assert padded.tokens == alone.tokens == len(short.input_ids) - 1
    # equal up to float32 round-off of a ~100-nat sum: 1e-5 per predicted token
    assert padded.nll / padded.tokens == pytest.approx(alone.nll / alone.tokens, abs=1e-5)
    assert padded.nll == pytest.approx(alone.nll, rel=1e-6)
    # the EOS term is in the sum: dropping the final EOS removes exactly -log p(EOS | record)
    without_eos = per_example_nll(lm.model, {"d": [tokenize_record(tok, Record("hi", "yo", "d", 0.0), 64)]},
                                  tok.pad_token_id, batch_size=1)[0]
    with torch.no_grad():
        logits = on_cpu64(lm.model(input_ids=torch.tensor([short.input_ids[:-1]], device=model_device(lm.model)))
                          .logits[0, -1])
    eos_term = -float(logits.log_softmax(-1)[tok.eos_token_id])
    truncated = tokenize_record(tok, Record("hi", "yo", "d", 0.0), len(short.input_ids) - 1)
    cut = per_example_nll(lm.model, {"d": [truncated]}, tok.pad_token_id, batch_size=1)[0]
    assert without_eos.nll == pytest.approx(alone.nll)
    assert cut.tokens == alone.tokens - 1
    assert alone.nll - cut.nll == pytest.approx(eos_term, abs=1e-4)


def test_eval_pooled_macro_and_per_example_file(tmp_path, gpt2):
    write_jsonl(tmp_path / "a.jsonl", color_rows(80))
    write_jsonl(tmp_path / "b.jsonl", [{"question": f"q{i}", "answer": "x" * (i % 9 + 1)} for i in range(80)])
    data = DataConfig(data_dir=str(tmp_path))
    pe = tmp_path / "out" / "per_example.jsonl"
    res = evaluate(gpt2, ["a", "b"], [], data, per_example=str(pe))
    rows = [json.loads(line) for line in pe.read_text().splitlines()]
    # one row per test record of each domain, with indices in the domain's split order
    for d in ("a", "b"):
        test = load_domain(d, data).records["test"]
        mine = [r for r in rows if r["domain"] == d]
        assert sorted(r["index"] for r in mine) == list(range(len(test)))
        for r in mine:  # each row's NLL and token count, by hand from the logits
            ex = tokenize_record(gpt2.tokenizer, test[r["index"]], 64)
            nll, n = hand_nll(gpt2.model, ex.input_ids)
            assert r["tokens"] == n and r["nll"] == pytest.approx(nll, rel=1e-5)
    # per domain, pooled (exp ΣNLL / Σtokens over the union) and the macro mean, recomputed from the file
    per = {d: (sum(r["nll"] for r in rows if r["domain"] == d), sum(r["tokens"] for r in rows if r["domain"] == d))
           for d in ("a", "b")}
    out = res["results"]
    for d, (nll, n) in per.items():
        assert out[d]["tokens"] == n
        assert out[d]["loss"] == pytest.approx(nll / n, rel=1e-12)
        assert out[d]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    nll, n = per["a"][0] + per["b"][0], per["a"][1] + per["b"][1]
    assert out["pooled"]["tokens"] == n
    assert out["pooled"]["loss"] == pytest.approx(nll / n, rel=1e-12)
    assert out["pooled"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    macro = (math.exp(per["a"][0] / per["a"][1]) + math.exp(per["b"][0] / per["b"][1])) / 2
    assert out["macro_mean"]["perplexity"] == pytest.approx(macro, rel=1e-12)
    # the pooled figure is not the macro mean here (the domains differ): both are reported
    assert abs(out["pooled"]["perplexity"] - macro) > 1e-6
    assert res["model"] == "tiny-gpt2" and res["adapters"] == [] and res["split"] == "test"


def test_eval_cli_json_and_split(tmp_path, run_cli):
    write_jsonl(tmp_path / "a.jsonl", color_rows(60))
    write_jsonl(tmp_path / "b.jsonl", color_rows(60, start=500))
    rc, out, err, _ = run_cli("eval", "--model", "tiny-llama", "--data-dir", tmp_path, "--data", "a+b",
                              "--split", "validation", "--json", "--max-length", 40, "--batch-size", 3)
    assert rc == 0, err
    res = json.loads(out)
    assert res["model"] == "tiny-llama" and res["adapters"] == [] and res["split"] == "validation"
    assert set(res["results"]) == {"a", "b", "pooled", "macro_mean"}
    lm = load_model("tiny-llama", device="cpu")
    data = DataConfig(data_dir=str(tmp_path))
    total_nll, total_n = 0.0, 0
    for d in ("a", "b"):
        nll = n = 0
        for rec in load_domain(d, data).records["validation"]:
            x, k = hand_nll(lm.model, tokenize_record(lm.tokenizer, rec, 40).input_ids)
            nll, n = nll + x, n + k
        assert res["results"][d]["tokens"] == n
        assert res["results"][d]["loss"] == pytest.approx(nll / n, rel=1e-5)
        total_nll, total_n = total_nll + nll, total_n + n
    assert res["results"]["pooled"]["perplexity"] == pytest.approx(math.exp(total_nll / total_n), rel=1e-5)
    rc, out, err, _ = run_cli("eval", "--model", "tiny-llama", "--data-dir", tmp_path, "--data", "a",
                              "--split", "validation", "--max-length", 40)
    assert rc == 0 and "perplexity" in out and f"{res['results']['a']['perplexity']:.4f}" in out


# --- adapters: the sum against stock PEFT ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("wa, wb", [(1.0, 0.5), (0.5, -1.0)])
def test_sum_of_two_adapters_equals_stock_peft(model_name, wa, wb, tiny_adapters, tiny_data, peft_sum_model,
                                               tmp_path, device):
    a, b = tiny_adapters[model_name]["colors"], tiny_adapters[model_name]["shapes"]
    data = tiny_adapters["data"]
    lm = load_model(model_name, device=device)
    before = state(lm.model)
    pe = tmp_path / "pe.jsonl"
    res = evaluate(lm, ["colors", "shapes"], [(a, wa), (b, wb)], data, per_example=str(pe), batch_size=5)
    assert_same_state(lm.model, before)  # weights restored bit-identically
    assert res["adapters"] == [{"name": a.name, "path": str(a), "weight": wa},
                               {"name": b.name, "path": str(b), "weight": wb}]

    ref32 = peft_sum_model(model_name, [a, b], [wa, wb])  # stock PEFT's sum on the CPU
    ref = peft_sum_model(model_name, [a, b], [wa, wb]).double()  # and in float64
    rows = [json.loads(line) for line in pe.read_text().splitlines()]
    loose = LOOSER[device]
    for d in ("colors", "shapes"):
        test = load_domain(d, data).records["test"]
        nll = n = 0
        for r in (r for r in rows if r["domain"] == d):
            x, k = hand_nll(ref, tokenize_record(lm.tokenizer, test[r["index"]], 64).input_ids)
            # float32 forward passes vs float64: ~1e-7 relative per token; rel 1e-5 of a 30-300-nat sum
            assert r["tokens"] == k and r["nll"] == pytest.approx(x, rel=1e-5 * loose)
            nll, n = nll + x, n + k
        assert res["results"][d]["tokens"] == n
        assert res["results"][d]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5 * loose)

    # logits: lorasum's in-place sum vs PEFT with the summed adapter active
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = on_cpu64(lm.model(input_ids=ids.to(device)).logits)
        want = ref(input_ids=ids).logits
        want32 = ref32(input_ids=ids).logits
        apply_adapters(lm.model, [(load_adapter(a), wa), (load_adapter(b), wb)])
        got = on_cpu64(lm.model(input_ids=ids.to(device)).logits)
    assert (want - base_logits).abs().max() > 1e-2  # the adapters change the model: the comparison has teeth
    # lorasum's float32 sum applied in place is as close to the exact logits as PEFT's own float32 forward (10x)
    torch.testing.assert_close(got, want, atol=float32_noise(want32, want, device), rtol=0)


def test_eval_cli_adapter_sum_matches_api_and_zero_weight_is_base(tiny_adapters, run_cli):
    a, b = tiny_adapters["tiny-gpt2"]["colors"], tiny_adapters["tiny-gpt2"]["shapes"]
    data_dir = tiny_adapters["data"].data_dir
    caps = ["--max-test", "8"]
    args = ["eval", "--model", "tiny-gpt2", "--data-dir", data_dir, "--data", "colors", "shapes", *caps, "--json"]
    rc, out, err, _ = run_cli(*args, "--adapter", f"{a}:1", "--adapter", f"{b}:-1")
    assert rc == 0, err
    res = json.loads(out)
    api = evaluate(load_model("tiny-gpt2", device="cpu"), ["colors", "shapes"], [(a, 1.0), (b, -1.0)],
                   DataConfig(data_dir=data_dir, max_records={"test": 8}))
    assert res["adapters"] == [{"name": a.name, "path": str(a), "weight": 1.0},
                               {"name": b.name, "path": str(b), "weight": -1.0}]
    for k in ("colors", "shapes", "pooled"):
        assert res["results"][k] == pytest.approx(api["results"][k], rel=1e-9)
    rc, out, _, _ = run_cli(*args)
    base = json.loads(out)["results"]
    rc, out, _, _ = run_cli(*args, "--adapter", f"{a}:0")
    zero = json.loads(out)["results"]
    assert zero == base  # W + 0·ΔW is W exactly
    assert res["results"]["pooled"]["loss"] != base["pooled"]["loss"]


def test_eval_in_bfloat16_accepts_an_adapter_trained_in_float32(tiny_adapters):
    """The weights hash is of float32 weights: a half-precision model must not be refused as 'other weights'."""
    a = tiny_adapters["tiny-gpt2"]["colors"]
    data = tiny_adapters["data"]
    full = evaluate(load_model("tiny-gpt2", device="cpu"), ["colors"], [str(a)], data)["results"]["colors"]
    half = evaluate(load_model("tiny-gpt2", dtype="bfloat16", device="cpu"), ["colors"], [str(a)],
                    data)["results"]["colors"]
    assert half["tokens"] == full["tokens"]
    assert half["loss"] == pytest.approx(full["loss"], rel=0.02)  # bf16 round-off only
