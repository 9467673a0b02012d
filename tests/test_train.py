"""Training: validation loss goes down and the best epoch is kept, the saved folder is a stock PEFT adapter that
reloads with no missing/unexpected keys and identical logits, lorasum.json, --overwrite, the base left unchanged."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import LOOSER, color_rows, float32_noise, on_cpu64, one_line_error, write_data_folder, write_jsonl

from lorasum.lm.data import DataConfig, load_domain, partition_records, tokenize_records
from lorasum.delta.peft_format import load_adapter
from lorasum.lm.evaluate import evaluate
from lorasum.delta.apply import apply_adapters
from lorasum.lm.models import load_model, weights_fingerprint
from lorasum.lm.train import TrainConfig, train_adapter

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_training_lowers_validation_loss_and_keeps_best_epoch(model_name, tiny_adapters):
    data = tiny_adapters["data"]
    lm = load_model(model_name, device="cpu")
    for domain in ("colors", "shapes"):
        folder = tiny_adapters[model_name][domain]
        result = tiny_adapters[model_name]["results"][domain]
        base = evaluate(lm, [domain], [], data, split="validation")["results"][domain]
        tuned = evaluate(lm, [domain], [str(folder)], data, split="validation")["results"][domain]
        assert tuned["tokens"] == base["tokens"]
        assert tuned["loss"] < base["loss"] - 0.05, (base, tuned)
        # the saved adapter is the best epoch: its validation loss is the minimum recorded during training
        losses = [e["val_loss"] for e in result.epochs]
        assert result.best_epoch == 1 + losses.index(min(losses))
        assert tuned["loss"] == pytest.approx(min(losses), rel=1e-4)
        assert all(e["val_loss"] < base["loss"] for e in result.epochs)


def test_lorasum_json_contents(tiny_adapters, tiny_data):
    folder = tiny_adapters["tiny-gpt2"]["colors"]
    result = tiny_adapters["tiny-gpt2"]["results"]["colors"]
    data = tiny_adapters["data"]
    meta = json.loads((folder / "lorasum.json").read_text())
    cfg = TrainConfig(epochs=2, lr=2e-2, batch_size=8, seed=0, dropout=0.0)  # as in conftest.tiny_adapters
    assert meta["train"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert meta["seed"] == 0 and meta["partition"] == "colors" and meta["domains"] == ["colors"]
    # data fingerprints: the file's sha256 and the split sizes actually used
    import hashlib

    dom = meta["data"]["domains"][0]
    assert dom["sha256"] == hashlib.sha256((tiny_data / "colors.jsonl").read_bytes()).hexdigest()
    assert dom["spec"] == "colors" and dom["source"] == "colors.jsonl"
    assert dom["split_sizes"] == load_domain("colors", data).sizes() == {"train": 32, "validation": 8, "test": 8}
    assert sum(dom["available"].values()) == 200
    assert meta["data"]["split_seed"] == 0 and meta["data"]["max_records"] == {"train": 32, "validation": 8,
                                                                                 "test": 8}
    # per-epoch losses, throughput and wall time
    assert [e["epoch"] for e in meta["epochs"]] == [1, 2] and meta["best_epoch"] == result.best_epoch
    assert meta["epochs"] == json.loads(json.dumps(result.epochs))
    train_ex = tokenize_records(load_model("tiny-gpt2", device="cpu").tokenizer,
                                partition_records([load_domain("colors", data)], "train"), 64)
    tokens = 2 * sum(len(e.input_ids) for e in train_ex)  # every non-padding token of both epochs
    assert meta["tokens_per_s"] > 0 and meta["wall_s"] > 0
    assert meta["tokens_per_s"] * meta["wall_s"] >= tokens * 0.999  # train time (the divisor) <= wall time
    # provenance: versions, git revision, base model id and weights hash
    prov = meta["provenance"]
    assert prov["torch"] == torch.__version__.split("+")[0] or prov["torch"] == torch.__version__
    assert prov["transformers"] == transformers.__version__ and prov["peft"] == peft.__version__
    rev = prov["git_revision"].removesuffix("+dirty")
    assert len(rev) == 40 and int(rev, 16) >= 0
    # the project's own revision: HEAD itself, or an ancestor when a commit landed while the tests ran
    git = subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", rev, "HEAD"], capture_output=True)
    assert git.returncode == 0, f"{rev} is not a commit of this repository's history"
    assert meta["lorasum_version"] == prov["lorasum"]
    assert meta["base_model"]["id"] == "tiny-gpt2" and meta["base_model"]["model_type"] == "gpt2"
    sha = meta["base_model"]["weights_sha256"]
    assert sha == weights_fingerprint(load_model("tiny-gpt2", device="cpu").model)
    assert sha != weights_fingerprint(load_model("tiny-llama", device="cpu").model)
    # the PEFT config names the canonical base id and the paper's r=4, alpha=64 on the GPT-2 preset
    cfg_json = json.loads((folder / "adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == "tiny-gpt2"
    assert (cfg_json["r"], cfg_json["lora_alpha"], cfg_json["fan_in_fan_out"]) == (4, 64, True)
    assert sorted(cfg_json["target_modules"]) == ["c_attn", "c_proj"]


@pytest.mark.parametrize("model_name, layers", [("tiny-gpt2", 6), ("tiny-llama", 10)])
def test_saved_adapter_reloads_in_stock_peft(model_name, layers, tiny_adapters, strict_reload, device):
    folder = tiny_adapters[model_name]["colors"]
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "lorasum.json"] or \
        files == ["adapter_config.json", "adapter_model.safetensors", "lorasum.json"]
    # 2 blocks x (c_attn, attn.c_proj, mlp.c_proj) on GPT-2; 2 x (q, k, v, o, down) on Llama
    assert len(load_adapter(folder).layers) == layers
    ref32 = strict_reload(load_model(model_name, device="cpu").model, folder).eval()
    ref = strict_reload(load_model(model_name, device="cpu").model, folder).eval().double()
    lm = load_model(model_name, device=device)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = on_cpu64(lm.model(input_ids=ids.to(device)).logits)
        want, want32 = ref(input_ids=ids).logits, ref32(input_ids=ids).logits
        apply_adapters(lm.model, [(load_adapter(folder), 1.0)])
        got = on_cpu64(lm.model(input_ids=ids.to(device)).logits)
    assert (want - base).abs().max() > 1e-2
    # against PEFT in float64, within 10x of PEFT's own float32 error (a fixed 1e-5 failed on another CPU: 1.6e-5)
    torch.testing.assert_close(got, want, atol=float32_noise(want32, want, device), rtol=0)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_leaves_the_model_unchanged_and_loss_on_answer(tmp_path, device):
    write_jsonl(tmp_path / "d.jsonl", color_rows(60))
    data = DataConfig(data_dir=str(tmp_path), max_records={"train": 16, "validation": 4})
    lm = load_model("tiny-llama", device=device)
    before, modules = _state(lm.model), [(n, type(m)) for n, m in lm.model.named_modules()]
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    res = train_adapter(lm, "d", tmp_path / "out", TrainConfig(epochs=1, lr=2e-2, loss_on="answer"), data)
    after = lm.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert [(n, type(m)) for n, m in lm.model.named_modules()] == modules  # LoRA layers unloaded
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, logits)
    assert all(p.device.type == torch.device(device).type for p in lm.model.parameters())  # nothing moved it
    # loss on answer tokens: the recorded validation loss (on `device`) is the answer-only loss of the saved adapter,
    # recomputed on the CPU in other batches: float32 means over ~50 tokens, each ~1e-7 relative; 1e-4 leaves 1000x
    cpu = lm if device == "cpu" else load_model("tiny-llama", device="cpu")
    ans = evaluate(cpu, ["d"], [str(tmp_path / "out")], data, split="validation", loss_on="answer")["results"]["d"]
    alltok = evaluate(cpu, ["d"], [str(tmp_path / "out")], data, split="validation")["results"]["d"]
    assert ans["loss"] == pytest.approx(res.epochs[0]["val_loss"], rel=1e-4 * LOOSER[device])
    assert ans["tokens"] < alltok["tokens"]
    assert json.loads((tmp_path / "out" / "lorasum.json").read_text())["train"]["loss_on"] == "answer"


def test_train_cli_params_overwrite_and_merged_partition(tmp_path, run_cli):
    write_data_folder(tmp_path / "data")
    params = tmp_path / "best.json"
    params.write_text(json.dumps({"params": {"r": 2, "alpha": 8, "epochs": 3, "lr": 0.01}}))
    out = tmp_path / "runs" / "cs"
    common = ["train", "--model", "tiny-gpt2", "--data-dir", tmp_path / "data", "--data", "colors+shapes",
              "--out", out, "--max-train", 8, "--max-validation", 4, "--max-length", 32]
    # defaults < --params file < explicit flags
    rc, stdout, err, _ = run_cli(*common, "--params", params, "--epochs", 1, "--seed", 3)
    assert rc == 0, err
    assert "epoch 1:" in stdout and "epoch 2:" not in stdout and str(out) in stdout
    meta = json.loads((out / "lorasum.json").read_text())
    assert (meta["train"]["r"], meta["train"]["alpha"], meta["train"]["epochs"], meta["train"]["lr"]) == (2, 8, 1, 0.01)
    assert meta["train"]["max_length"] == 32 and meta["seed"] == 3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    # a merged partition: both domains' fingerprints, each capped on its own
    assert meta["domains"] == ["colors", "shapes"]
    assert [d["split_sizes"]["train"] for d in meta["data"]["domains"]] == [8, 8]

    # a finished adapter is never replaced without --overwrite, and nothing is touched
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(run_cli(*common, "--seed", 4, "--epochs", 1), out, "--overwrite", quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert sorted(p.name for p in out.parent.iterdir()) == ["cs"]  # no temp folders left beside it

    rc, stdout, err, _ = run_cli(*common, "--seed", 4, "--epochs", 1, "--overwrite")
    assert rc == 0, err
    meta2 = json.loads((out / "lorasum.json").read_text())
    assert meta2["seed"] == 4 and meta2["train"]["r"] == 4  # the defaults again: no --params this time
    # the training seed never moves records between splits
    assert meta2["data"]["domains"] == meta["data"]["domains"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["cs"]


def test_bf16_autocast_learns_like_fp32(tiny_data, tmp_path):
    """Mixed precision wraps forward passes only; training must still learn as fp32 does (a regression: with the
    backward pass and optimizer step inside torch.autocast the adapter did not learn)."""
    from lorasum.lm.data import DataConfig
    from lorasum.lm.models import load_model
    from lorasum.lm.train import TrainConfig, train_adapter

    data = DataConfig(data_dir=str(tiny_data), max_records={"train": 48, "validation": 16})
    cfg = TrainConfig(epochs=4, lr=2e-2, batch_size=8, dropout=0.0, max_length=48)
    losses = {}
    for ac in (None, "bfloat16"):
        lm = load_model("tiny-llama", autocast=ac, device="cpu")
        res = train_adapter(lm, "colors", tmp_path / str(ac), cfg, data)
        losses[ac] = min(e["val_loss"] for e in res.epochs)
    untrained = math.log(len(load_model("tiny-llama", device="cpu").tokenizer))  # ~ a random byte model's loss
    assert losses[None] < untrained - 0.2, losses
    assert losses["bfloat16"] == pytest.approx(losses[None], rel=0.02), losses


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> Path:
    """A tiny local model of an architecture without a target preset (OPT), saved as a transformers folder."""
    from transformers import OPTConfig, OPTForCausalLM

    from lorasum.lm.models import TARGET_PRESETS, byte_tokenizer

    assert "opt" not in TARGET_PRESETS
    tok = byte_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-opt"
    OPTForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_unknown_architecture_needs_targets_then_trains_only_those(opt_folder, tmp_path, run_cli):
    from lorasum.errors import LorasumError
    from lorasum.lm.models import targets_for

    with pytest.raises(LorasumError, match="no LoRA target preset for architecture 'opt'; pass --targets"):
        targets_for("opt")
    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(60))
    out = tmp_path / "out"
    common = ["train", "--model", opt_folder, "--data-dir", tmp_path / "data", "--data", "colors", "--out", out,
              "--max-train", 8, "--max-validation", 4, "--max-length", 32]
    err = one_line_error(run_cli(*common), quiet=True)
    assert err.startswith("lorasum: error: no LoRA target preset for architecture 'opt'; pass --targets"), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    rc, stdout, err, _ = run_cli(*common, "--targets", "q_proj", "v_proj")
    assert rc == 0, err
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    assert sorted(load_adapter(out).layers) == [f"model.decoder.layers.{i}.self_attn.{m}_proj"
                                                for i in (0, 1) for m in ("q", "v")]
    assert json.loads((out / "lorasum.json").read_text())["base_model"]["id"] == "tiny-opt"


def test_targets_override_the_preset(tmp_path, run_cli):
    write_jsonl(tmp_path / "data" / "colors.jsonl", color_rows(60))
    out = tmp_path / "out"
    rc, stdout, err, _ = run_cli("train", "--model", "tiny-gpt2", "--data-dir", tmp_path / "data", "--data", "colors",
                                 "--out", out, "--max-train", 8, "--max-validation", 4, "--max-length", 32,
                                 "--targets", "c_attn")
    assert rc == 0, err
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn"]  # not the preset's c_attn + c_proj
    assert json.loads((out / "lorasum.json").read_text())["train"]["targets"] == ["c_attn"]
    adapter = load_adapter(out)
    assert sorted(adapter.layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(float(f.B.abs().max()) > 0 for f in adapter.layers.values())  # trained, not left at PEFT's zero init
