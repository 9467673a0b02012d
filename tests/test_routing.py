"""Arrow routing (lm.routing): lorasum's route against PEFT's create_arrow_model run directly, the bfloat16 autocast
trap, the model restored afterwards, and the one-line refusals of what Arrow cannot route."""

import contextlib
import math

import pytest
import torch

from conftest import TINY_CAPS, one_line_error, write_smoke_domains
from lorasum.errors import LorasumError
from lorasum.study.config import load_config
from lorasum.study.experiment import plan, run_experiment
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.data import load_domain, tokenize_records
from lorasum.lm.evaluate import evaluate, per_example_nll
from lorasum.lm.models import load_model, weights_fingerprint
from lorasum.lm.routing import ARROW_SEED


def _direct_arrow_nll(model_id: str, folders: list, top_k: int, temperature: float, data, autocast=None) -> float:
    """Pooled test perplexity of PEFT's own Arrow model, built here with create_arrow_model on a fresh base."""
    from peft import ArrowConfig, create_arrow_model

    lm = load_model(model_id, device="cpu")
    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=ARROW_SEED)
    model = create_arrow_model(lm.model, [str(f) for f in folders], cfg)
    examples = {d: tokenize_records(lm.tokenizer, load_domain(d, data).records["test"], 32)
                for d in ("colors", "shapes")}
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        rows = per_example_nll(model, examples, lm.tokenizer.pad_token_id, 4)
    return math.exp(sum(r.nll for r in rows) / sum(r.tokens for r in rows))


@pytest.mark.parametrize("model_id", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("top_k, temperature", [(1, 1.0), (2, 0.5)])
def test_arrow_eval_is_pefts_create_arrow_model_and_leaves_the_model_as_it_was(tiny_adapters, model_id, top_k,
                                                                               temperature):
    t = tiny_adapters
    folders = [t[model_id]["colors"], t[model_id]["shapes"]]
    lm = load_model(model_id, device="cpu")
    before = weights_fingerprint(lm.model)
    res = evaluate(lm, ["colors", "shapes"], [(str(f), 1.0) for f in folders], t["data"], max_length=32,
                   batch_size=4, route="arrow", params={"top_k": top_k, "router_temperature": temperature})
    ours = res["results"]["pooled"]["perplexity"]
    assert res["route"] == {"name": "arrow", "params": {"top_k": top_k, "router_temperature": temperature},
                            "general": []}
    assert ours == pytest.approx(_direct_arrow_nll(model_id, folders, top_k, temperature, t["data"]), rel=1e-5)
    summed = evaluate(lm, ["colors", "shapes"], [(str(f), 1.0) for f in folders], t["data"], max_length=32,
                      batch_size=4)["results"]["pooled"]["perplexity"]
    assert abs(ours - summed) > 1e-4 * summed  # routing is not the sum: the comparison above can fail
    assert weights_fingerprint(lm.model) == before
    assert not any("lora" in n for n, _ in lm.model.named_modules())


def test_arrow_runs_under_bfloat16_autocast_where_stock_peft_raises(tiny_adapters):
    t = tiny_adapters
    folders = [t["tiny-llama"]["colors"], t["tiny-llama"]["shapes"]]
    with pytest.raises(RuntimeError, match="scatter"):  # the trap: PEFT 0.21's Arrow layer under CPU bf16 autocast
        _direct_arrow_nll("tiny-llama", folders, 1, 1.0, t["data"], autocast=torch.bfloat16)
    lm = load_model("tiny-llama", device="cpu", autocast="bfloat16")
    res = evaluate(lm, ["colors", "shapes"], [(str(f), 1.0) for f in folders], t["data"], max_length=32,
                   batch_size=4, route="arrow", params={"top_k": 1, "router_temperature": 1.0})
    assert math.isfinite(res["results"]["pooled"]["perplexity"])


def test_arrow_with_general_adapters_is_pefts_genknowsub(tiny_adapters):
    from peft import ArrowConfig, create_arrow_model

    t = tiny_adapters
    folders = [t["tiny-gpt2"]["colors"], t["tiny-gpt2"]["shapes"]]
    lm = load_model("tiny-gpt2", device="cpu")
    res = evaluate(lm, ["colors"], [(str(f), 1.0) for f in folders], t["data"], max_length=32, batch_size=4,
                   route="arrow", params={"top_k": 2, "router_temperature": 1.0}, general=[(str(folders[1]), 1.0)])
    ref = load_model("tiny-gpt2", device="cpu")
    model = create_arrow_model(ref.model, [str(f) for f in folders],
                               ArrowConfig(top_k=2, router_temperature=1.0, use_gks=True, rng_seed=ARROW_SEED),
                               general_adapter_paths=[str(folders[1])])
    examples = {"colors": tokenize_records(ref.tokenizer, load_domain("colors", t["data"]).records["test"], 32)}
    rows = per_example_nll(model, examples, ref.tokenizer.pad_token_id, 4)
    assert res["results"]["colors"]["perplexity"] == pytest.approx(
        math.exp(sum(r.nll for r in rows) / sum(r.tokens for r in rows)), rel=1e-5)
    assert res["route"]["general"] == [load_adapter(folders[1]).name]


@pytest.fixture
def arrow_args(tiny_adapters, tiny_data):
    t = tiny_adapters["tiny-gpt2"]
    return ["eval", "--model", "tiny-gpt2", "--data-dir", str(tiny_data), "--data", "colors",
            "--max-test", str(TINY_CAPS["test"]), "--max-length", "32"], t["colors"], t["shapes"]


def test_arrow_from_the_command_line_prints_the_route(run_cli, arrow_args):
    base, a, b = arrow_args
    rc, out, err, _ = run_cli(*base, "--adapter", a, "--adapter", b, "--route", "arrow", "--top-k", "2")
    assert rc == 0, err
    assert "routed by arrow(top_k=2, router_temperature=1)" in out


@pytest.mark.parametrize("extra, culprits", [
    (["--route", "arrow", "--adapter", "A"], ["at least two --adapter"]),
    (["--route", "arrow", "--adapter", "A", "--adapter", "B", "--top-k", "3"], ["--top-k", "at most", "2"]),
    (["--route", "arrow", "--adapter", "A", "--adapter", "B:0.5"], ["weight 1", "0.5"]),
    (["--route", "arrow", "--method", "ties", "--adapter", "A", "--adapter", "B"], ["--route", "--method"]),
    (["--method", "arrow", "--adapter", "A", "--adapter", "B"], ["--route arrow"]),
    (["--general", "A", "--adapter", "A", "--adapter", "B"], ["--route arrow"]),
    (["--route", "arrow", "--adapter", "A", "--adapter", "B", "--router-temperature", "0"], ["--router-temperature"]),
    (["--route", "arrow", "--adapter", "A", "--adapter", "B", "--density", "0.2"], ["--density", "arrow"]),
])
def test_what_arrow_cannot_route_is_refused_in_one_line(run_cli, arrow_args, extra, culprits):
    base, a, b = arrow_args
    args = [str(a) if x == "A" else str(b) if x == "B" else f"{b}:0.5" if x == "B:0.5" else x for x in extra]
    one_line_error(run_cli(*base, *args), *culprits, quiet=True)


def test_arrow_refuses_adapters_of_different_ranks(run_cli, arrow_args, tmp_path, tiny_data):
    from lorasum.lm.data import DataConfig
    from lorasum.lm.train import TrainConfig, train_adapter

    base, a, _ = arrow_args
    lm = load_model("tiny-gpt2", device="cpu")
    other = tmp_path / "r8"
    train_adapter(lm, "shapes", other, TrainConfig(epochs=1, r=8, batch_size=8),
                  DataConfig(data_dir=str(tiny_data), max_records=dict(TINY_CAPS)))
    one_line_error(run_cli(*base, "--adapter", a, "--adapter", other, "--route", "arrow"), "one rank", "r=8",
                   quiet=True)


def test_merge_and_compose_refuse_a_route(run_cli, arrow_args, tmp_path):
    _, a, b = arrow_args
    one_line_error(run_cli("compose", a, b, "--method", "arrow", "--out", tmp_path / "c"), "routes", "merges nothing",
                   absent=tmp_path / "c")


def test_prompt_route_sends_each_example_to_its_nearest_training_centroid(tiny_adapters, run_cli, arrow_args,
                                                                         tmp_path):
    """`eval --route prompt`: every example's NLL is the one a single adapter alone gives it, and the examples
    matching each adapter are as many as the choices reported."""
    import json

    t = tiny_adapters
    folders = [t["tiny-gpt2"]["colors"], t["tiny-gpt2"]["shapes"]]
    lm = load_model("tiny-gpt2", device="cpu")

    def per_example(adapters, route=None):
        f = tmp_path / f"{len(adapters)}-{route}-{adapters[0][0][-6:]}.jsonl"
        res = evaluate(lm, ["colors", "shapes"], adapters, t["data"], max_length=32, batch_size=4, route=route,
                       per_example=str(f))
        return res, {(r["domain"], r["index"]): r["nll"] for r in map(json.loads, f.read_text().splitlines())}

    res, routed = per_example([(str(f), 1.0) for f in folders], "prompt")
    alone = [per_example([(str(f), 1.0)])[1] for f in folders]
    names = [load_adapter(f).name for f in folders]
    matched = {d: {n: 0 for n in names} for d in ("colors", "shapes")}
    for key, nll in routed.items():
        hits = [k for k in (0, 1) if nll == pytest.approx(alone[k][key], rel=1e-6)]
        assert hits, key  # served by one adapter alone
        if len(hits) == 1:
            matched[key[0]][names[hits[0]]] += 1
    chosen = res["route"]["chosen"]
    for d in matched:
        assert sum(chosen[d].values()) == TINY_CAPS["test"]
        for n in names:
            assert matched[d][n] <= chosen[d][n]
    base, a, b = arrow_args
    rc, out, err, _ = run_cli(*base, "--adapter", a, "--adapter", b, "--route", "prompt")
    assert rc == 0, err
    one_line_error(run_cli(*base, "--adapter", a, "--adapter", b, "--route", "prompt", "--top-k", "2"), "--top-k",
                   quiet=True)


def test_generate_with_a_route(run_cli, arrow_args):
    _, a, b = arrow_args
    for route in ("prompt", "arrow"):
        rc, out, err, _ = run_cli("generate", "--model", "tiny-gpt2", "--adapter", a, "--adapter", b, "--route", route,
                                  "--max-new-tokens", "3", "red?")
        assert rc == 0, err


def test_general_domains_give_arrow_genknowsub_in_the_experiment(tmp_path):
    """`general`: one adapter per general partition and seed, read by every Arrow eval (and only by those), and the
    report says GenKnowSub ran; without it the report says it did not."""
    data = write_smoke_domains(tmp_path / "data")
    cfg = load_config(preset="smoke", overrides={"data_dir": str(data), "domains": ["alpha", "beta"],
                                                 "compositions": ["sum", "arrow"], "general": ["gamma"]})
    p = plan(cfg, (tmp_path / "run").resolve())
    gamma = p.train[next(k for k in p.train if k.partition == "gamma")]["key"]
    for k, spec in p.evals.items():
        assert (spec.get("general") == [{"train_key": gamma, "weight": 1.0}]) == k.model.startswith("arrow")
    run_experiment(cfg, tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Arrow ran with GenKnowSub" in md and "trained on gamma" in md


@pytest.mark.parametrize("general, culprit", [(["alpha"], "also in 'domains'"), ([], "distinct single domains"),
                                              (["a+b"], "distinct single domains")])
def test_general_refuses_bad_values_naming_the_key(tmp_path, general, culprit):
    with pytest.raises(LorasumError, match="general") as e:
        load_config(preset="smoke", overrides={"domains": ["alpha", "beta"], "general": general})
    assert culprit in str(e.value) and "\n" not in str(e.value)
