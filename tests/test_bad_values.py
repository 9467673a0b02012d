"""Bad values for train, eval and generate: each refused where it enters with one line naming the flag and the
value, before any work and with nothing written; a training run whose loss diverges saves nothing."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import conftest
import pytest
from delta_fixtures import make_adapter

from lorasum.errors import LorasumError
from lorasum.lm.train import SEED_LIMIT, TrainConfig, check_seed

SMALL = ("--max-train", "16", "--max-validation", "4", "--max-test", "4")


one_line_error = partial(conftest.one_line_error, quiet=True)  # a refusal here also prints nothing on stdout


@pytest.fixture
def ddir_rows() -> dict[str, int]:
    """The shared `ddir` with 80 colors records only."""
    return {"colors": 80, "shapes": 0}


def train(run_cli, ddir: Path, out: Path, *flags):
    return run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--out", out, *SMALL,
                   *flags)


# --- training values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [
    ("--alpha", "-64"), ("--alpha", "0"), ("--alpha", "nan"), ("--alpha", "inf"),
    ("--weight-decay", "-0.1"), ("--weight-decay", "nan"),
    ("--warmup-ratio", "-5"), ("--warmup-ratio", "1"), ("--warmup-ratio", "nan"),
    ("--seed", str(2**64)), ("--seed", str(SEED_LIMIT)), ("--seed", "-1"),
    ("--lr", "nan"), ("--dropout", "nan"),
])
def test_train_value_rules(tmp_path, ddir, run_cli, flag, value):
    out = tmp_path / "out"
    one_line_error(train(run_cli, ddir, out, flag, value), flag, value)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_params_file_values_are_keyed(tmp_path, ddir, run_cli):
    params = tmp_path / "best.json"
    params.write_text(json.dumps({"params": {"alpha": -64}}))
    out = tmp_path / "out"
    one_line_error(train(run_cli, ddir, out, "--params", params), str(params), "'alpha'", "-64")
    assert not out.exists()


def test_train_config_check_and_seed_rule():
    for bad in ({"alpha": -64.0}, {"weight_decay": -1.0}, {"warmup_ratio": 1.0}, {"seed": 2**64},
                {"max_grad_norm": 0.0}):
        with pytest.raises(LorasumError) as e:
            TrainConfig(**bad).check()
        assert e.value.key == next(iter(bad))
    TrainConfig(seed=SEED_LIMIT - 1, warmup_ratio=0.5, weight_decay=0.1).check()
    assert check_seed(0) == 0
    for bad in (-1, SEED_LIMIT, True, 1.5, "3"):
        with pytest.raises(LorasumError, match="experiment.seed"):
            check_seed(bad, "experiment.seed")


def test_diverging_loss_saves_nothing(tmp_path, ddir, run_cli):
    out = tmp_path / "out"
    one_line_error(train(run_cli, ddir, out, "--lr", "1e30", "--batch-size", "4"), "at step 2 of epoch 1",
                   "lr 1e+30", "alpha/r = 64/4 = 16", "lower lr or alpha")
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_a_huge_alpha_is_refused_or_named_with_its_scale_when_it_diverges(tmp_path, ddir, run_cli):
    out = tmp_path / "out"
    one_line_error(train(run_cli, ddir, out, "--alpha", "1e300"), "--alpha 1e+300 makes the LoRA scale",
                   "= 2.5e+299, beyond float32's range")  # refused before any work
    one_line_error(train(run_cli, ddir, out, "--alpha", "1e20", "--batch-size", "4"), "at step 2 of epoch 1",
                   "alpha/r = 1e+20/4 = 2.5e+19", "lower lr or alpha")
    assert not out.exists()


# --- positions ------------------------------------------------------------------------------------------------------
def test_max_length_beyond_the_models_positions(tmp_path, ddir, run_cli):
    out = tmp_path / "out"
    one_line_error(train(run_cli, ddir, out, "--max-length", "300"), "--max-length 300", "256", "tiny-gpt2")
    assert not out.exists()
    pe = tmp_path / "pe.jsonl"
    one_line_error(run_cli("eval", "--model", "tiny-llama", "--data-dir", ddir, "--data", "colors",
                           "--max-length", "257", "--per-example", pe), "--max-length 257", "256", "tiny-llama")
    assert not pe.exists()
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "what colour?", "--max-new-tokens", "300"),
                   "--max-new-tokens 300", "256")


# --- model folders --------------------------------------------------------------------------------------------------
def test_pickle_only_model_folder(tmp_path, run_cli):
    from lorasum.lm.models import load_model

    folder = tmp_path / "pickled"
    load_model("tiny-gpt2", device="cpu").model.config.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    one_line_error(run_cli("generate", "--model", folder, "q"), str(folder), "pytorch_model.bin",
                   "never loads", "safetensors")


# --- generation -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e-30"])
def test_temperature_must_be_finite(run_cli, value):
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "q", "--temperature", value), "--temperature",
                   value if value != "-1" else "-1.0")


@pytest.mark.parametrize("sampling", [[], ["--temperature", "1"]])
def test_generate_refuses_overflowing_scores(tmp_path, run_cli, sampling):
    a = make_adapter(tmp_path / "a")
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "q", "--adapter", f"{a}:1e30", "--max-new-tokens", "4",
                           *sampling), "1e+30*a", "NaN or Inf")
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "q", "--adapter", f"{a}:1e300"), "1e+300", "'a'")


def test_generate_seed_rule(run_cli):
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "q", "--seed", str(2**64)), "--seed", str(2**64))


# --- outputs ----------------------------------------------------------------------------------------------------
def test_per_example_refuses_an_existing_file(tmp_path, ddir, run_cli):
    pe = tmp_path / "notes.txt"
    pe.write_text("the user's own file\n")
    one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", *SMALL,
                           "--per-example", pe), "--per-example", str(pe), "--overwrite")
    assert pe.read_text() == "the user's own file\n"
    rc, _, err, _ = run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", *SMALL,
                            "--per-example", pe, "--overwrite")
    assert rc == 0, err
    assert all("nll" in json.loads(line) for line in pe.read_text().splitlines())


def test_outputs_are_checked_before_any_work(tmp_path, ddir, run_cli, monkeypatch):
    """--out is checked before training, loading adapters or the model: a bad --out is the error, not the work."""
    import lorasum.lm.train as train_mod

    def no_training(*a, **k):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(train_mod, "train_adapter", no_training)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    one_line_error(train(run_cli, ddir, out), str(blocker), "is a file")
    missing = tmp_path / "no-such-adapter"
    one_line_error(run_cli("compose", missing, "--out", out), str(blocker), "is a file")
    one_line_error(run_cli("merge", "--model", "no-such-model", "--adapter", missing, "--out", out),
                   str(blocker), "is a file")
