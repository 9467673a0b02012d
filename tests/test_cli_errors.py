"""Bad input through the CLI: exit 2, exactly one `lorasum: error:` line naming the culprit, no traceback, no
warnings, and nothing half-written (no --out folder, no temp folders, no --per-example file)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import color_rows, one_line_error, split_of, write_jsonl

from lorasum.lm.data import DataConfig
from lorasum.errors import LorasumError
from lorasum.lm.evaluate import evaluate
from lorasum.lm.models import load_model


# every refusal here also prints nothing on stdout and raises no warning
assert_one_line_error = partial(one_line_error, quiet=True, no_warnings=True)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def peft_adapter(out: Path, model, targets, r: int = 2) -> Path:
    """A stock PEFT adapter (no lorasum.json, no base id) with non-zero factors."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                           fan_in_fan_out=model.config.model_type == "gpt2"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(str(out))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    return out


# --- data ---------------------------------------------------------------------------------------------------------
def test_missing_data_file(tmp_path, ddir, run_cli):
    missing = tmp_path / "nowhere" / "math.jsonl"
    out = tmp_path / "out"
    before = listing(tmp_path)
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data", missing, "--out", out),
                          "data file not found", missing)
    assert listing(tmp_path) == before  # no --out folder, no temp folder
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data", missing), missing)
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", tmp_path / "nodir", "--data", "x"),
                          "data directory not found", tmp_path / "nodir")


def test_unknown_domain_lists_the_ones_found(tmp_path, ddir, run_cli):
    out = tmp_path / "out"
    err = assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data",
                                        "colors+maths", "--out", out), "'maths'", "colors, shapes")
    assert not out.exists()
    assert_one_line_error(run_cli("data", "stats", "--model", "tiny-gpt2", "--data-dir", ddir, "nope"),
                          "'nope'", "colors, shapes")
    assert "found:" in err


def test_record_without_field_names_file_and_line(tmp_path, ddir, run_cli):
    bad = ddir / "bad.jsonl"
    write_jsonl(bad, [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"},
                      {"question": "q3", "reply": "a3"}])
    out = tmp_path / "out"
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "bad",
                                  "--out", out), f"{bad}:3", "'answer'")
    assert not out.exists()
    write_jsonl(bad, [{"question": "q1", "answer": "a1"}, {"question": None, "answer": "a2"}])
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "bad"),
                          f"{bad}:2", "'question'")
    # a custom field name that the file lacks
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--answer-field", "response"), f"{ddir / 'colors.jsonl'}:1", "'response'")


def test_non_utf8_and_bad_json_lines(tmp_path, ddir, run_cli):
    bad = ddir / "latin.jsonl"
    bad.write_bytes(b'{"question": "q1", "answer": "a1"}\n{"question": "caf\xe9", "answer": "a2"}\n')
    out = tmp_path / "out"
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "latin",
                                  "--out", out), f"{bad}:2", "UTF-8")
    assert not out.exists()
    bad.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2", "answer": \n')
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "latin"),
                          f"{bad}:3", "JSON")


def test_empty_split(tmp_path, ddir, run_cli):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(200) if split_of(f"q{i}", f"a{i}") == "train"]
    rows = rows[:20]
    write_jsonl(ddir / "trainonly.jsonl", rows)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data",
                                  "colors+trainonly", "--out", out), "'trainonly'", "empty validation split")
    assert not out.exists()
    pe = tmp_path / "pe.jsonl"
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "trainonly",
                                  "--per-example", pe), "'trainonly'", "empty test split")
    assert not pe.exists()
    # a filter that selects nothing names the spec
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data",
                                  "colors[category=purple]"), "colors[category=purple]", "selects no records")


@pytest.mark.parametrize("cmd", ["train", "eval", "stats"])
def test_max_length_below_8(tmp_path, ddir, run_cli, cmd):
    out = tmp_path / "out"
    args = {"train": ["train", "--data", "colors", "--out", out], "eval": ["eval", "--data", "colors"],
            "stats": ["data", "stats", "colors"]}[cmd]
    assert_one_line_error(run_cli(*args, "--model", "tiny-gpt2", "--data-dir", ddir, "--max-length", 7),
                          "--max-length 7", "at least 8")
    assert not out.exists()


def test_out_folder_with_finished_adapter_is_refused(tmp_path, ddir, run_cli):
    out = tmp_path / "done"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    (out / "adapter_model.safetensors").write_bytes(b"old")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--out", out), str(out), "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "done"]


# --- adapters -------------------------------------------------------------------------------------------------------
def test_adapter_folder_without_config(tmp_path, ddir, run_cli):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    pe = tmp_path / "pe.jsonl"
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--adapter", folder, "--per-example", pe), str(folder), "adapter_config.json")
    assert not pe.exists()
    assert_one_line_error(run_cli("generate", "--model", "tiny-gpt2", "--adapter", f"{tmp_path / 'nope'}:0.5", "hi"),
                          str(tmp_path / "nope"), "not found")


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory) -> dict[str, Path]:
    """Adapters that do not fit the built-in tiny models."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mismatch")
    torch.manual_seed(0)
    out = {"llama_on_gpt2": peft_adapter(root / "llama", load_model("tiny-llama", device="cpu").model,
                                         ["q_proj", "v_proj", "down_proj"])}
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    out["narrow_llama"] = peft_adapter(root / "narrow", narrow, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    deep = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=256, n_embd=64, n_layer=3, n_head=4))
    out["deep_gpt2"] = peft_adapter(root / "deep", deep, ["c_attn", "c_proj"])
    return out


@pytest.mark.parametrize("case, model, pattern", [
    ("llama_on_gpt2", "tiny-gpt2", r"layer 'model\.layers\.\d\.(self_attn\.[qv]_proj|mlp\.down_proj)' is not in the model"),
    ("narrow_llama", "tiny-llama", r"layer 'model\.layers\.\d\.(self_attn\.[qkvo]_proj|mlp\.down_proj)': the model's "
                                   r"weight is \(\d+, \d+\) but the adapter's delta is \(\d+, \d+\)"),
    ("deep_gpt2", "tiny-gpt2", r"layer 'transformer\.h\.2\.(attn\.c_attn|attn\.c_proj|mlp\.c_proj)' is not in the model"),
], ids=["llama-adapter-on-gpt2", "hidden-32-on-hidden-64", "3-layer-gpt2-on-2-layer"])
def test_adapter_that_does_not_fit_the_model(case, model, pattern, mismatched, ddir, tmp_path, run_cli):
    folder = mismatched[case]
    pe = tmp_path / "pe.jsonl"
    err = assert_one_line_error(run_cli("eval", "--model", model, "--data-dir", ddir, "--data", "colors",
                                        "--adapter", f"{folder}:0.5", "--per-example", pe))
    assert re.search(pattern, err), err
    assert not pe.exists()
    err = assert_one_line_error(run_cli("generate", "--model", model, "--adapter", folder, "hello"))
    assert re.search(pattern, err), err
    # API level: nothing was applied before the mismatch was found
    lm = load_model(model, device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    with pytest.raises(LorasumError, match=pattern):
        evaluate(lm, ["colors"], [str(folder)], DataConfig(data_dir=str(ddir)))
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())


def test_lorasum_adapter_for_another_base_names_both(tiny_adapters, ddir, run_cli):
    folder = tiny_adapters["tiny-llama"]["colors"]
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--adapter", folder), folder.name, "'tiny-llama'", "'tiny-gpt2'")


def test_error_is_one_line_in_a_real_process(mismatched, ddir, tmp_path):
    """Outside pytest's capture: the process's whole stderr (warnings, logging, progress) is the one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORASUM_PROGRESS",)}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lorasum.cli", "eval", "--model", "tiny-gpt2", "--data-dir",
                           str(ddir), "--data", "colors", "--adapter", str(mismatched["llama_on_gpt2"]),
                           "--per-example", str(out / "pe.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("lorasum: error: layer '"), proc.stderr
    assert not out.exists()


def test_non_empty_out_without_adapter_is_never_replaced(tmp_path, ddir, run_cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    common = ["train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--out", out,
              "--max-train", 4, "--max-validation", 2, "--max-length", 16]
    assert_one_line_error(run_cli(*common), str(out), "not empty", "notes.txt", "--overwrite")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]  # no temp folder left beside it
    # --overwrite replaces only what lorasum made: a folder holding the user's file is still refused
    assert_one_line_error(run_cli(*common, "--overwrite"), str(out), "notes.txt", "lorasum did not write")
    assert listing(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "mine"]


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_out_without_a_name_is_refused_before_training(tmp_path, ddir, run_cli, monkeypatch, out):
    import lorasum.lm.train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(lorasum.lm.train, "_fit", lambda *a, **k: pytest.fail("trained before refusing --out"))
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--out", out), f"--out '{out}'", "names no folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sub"]


def test_no_answer_tokens_left_names_domain_and_split(tmp_path, ddir, run_cli):
    """Every answer truncated away: the perplexity would be NaN (and JSON writing crash); refused up front."""
    pe, out = tmp_path / "pe.jsonl", tmp_path / "out"
    assert_one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "shapes",
                                  "--loss-on", "answer", "--max-length", 16, "--json", "--per-example", pe),
                          "colors test: no answer tokens left at --max-length 16", "--loss-on all", "data stats")
    assert not pe.exists()
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                  "--out", out, "--loss-on", "answer", "--max-length", 16),
                          "colors train: no answer tokens left at --max-length 16")
    # answers survive in the training split but not in the validation split: refused before training, too
    rows = [{"question": q, "answer": f"a{i}"} for i in range(300) for q in ("q", "q" * 40)
            if (split_of(q, f"a{i}") == "train") == (q == "q")]
    write_jsonl(ddir / "mixed.jsonl", rows)
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "mixed",
                                  "--out", out, "--loss-on", "answer", "--max-length", 24),
                          "mixed validation: no answer tokens left at --max-length 24")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # the same data with loss on all tokens is fine
    rc, stdout, err, _ = run_cli("eval", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                                 "--max-length", 16, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["results"]["colors"]["tokens"] > 0


# --- bad arguments that used to end in a traceback (exit 1) --------------------------------------------------------
def _train(*extra):
    return ["train", "--model", "tiny-gpt2", "--data-dir", "{data}", "--data", "colors", "--out", "{w}/out",
            "--max-train", 4, "--max-validation", 2, *extra]


BAD_ARGS = {
    "threads-negative": (_train("--threads", -1), ["--threads must be a whole number from 1 to 1024, got -1"]),
    "device-bogus": (_train("--device", "bogus"), ["--device 'bogus'", "cpu, cuda"]),
    "device-cuda-index": (_train("--device", "cuda:99"), ["--device cuda:99"]),
    "device-cuda": (_train("--device", "cuda"), ["--device cuda", "use cpu"]),
    "targets-nope": (_train("--targets", "nope", "c_attn"), ["--targets nope matched no", "c_attn, c_fc, c_proj"]),
    "model-empty-folder": (["eval", "--model", "{w}/empty", "--data-dir", "{data}", "--data", "colors"],
                           ["--model {w}/empty", "config.json"]),
    "model-corrupt-gguf": (["generate", "--model", "{w}/bad.gguf", "hi"], ["{w}/bad.gguf", "GGUF"]),
    "model-truncated-gguf": (["generate", "--model", "{w}/short.gguf", "hi"], ["{w}/short.gguf", "GGUF"]),
    "model-hub-id-unreachable": (["generate", "--model", "lorasum-tests/no-such-model-4f2a", "hi"],
                                 ["cannot load model 'lorasum-tests/no-such-model-4f2a'"]),
    "per-example-folder": (["eval", "--model", "tiny-gpt2", "--data-dir", "{data}", "--data", "colors",
                            "--per-example", "{w}/empty"], ["--per-example {w}/empty is a folder"]),
    "compose-out-under-file": (["compose", "{w}/ad", "{w}/ad:-1", "--out", "{w}/afile/x"],
                               ["--out {w}/afile/x", "{w}/afile is a file"]),
    "merge-out-under-file": (["merge", "--model", "tiny-gpt2", "--adapter", "{w}/ad", "--out", "{w}/afile/x/y"],
                             ["--out {w}/afile/x/y", "{w}/afile is a file"]),
    "params-wrong-type": (_train("--params", "{w}/params.json"),
                          ["'r' must be an integer", "'4'", "--params {w}/params.json"]),
    "params-targets-not-list": (_train("--params", "{w}/params2.json"), ["'targets' must be a list"]),
}


@pytest.fixture(scope="module")
def bad_args_workspace(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("bad_args")
    write_jsonl(w / "data" / "colors.jsonl", color_rows(40))
    (w / "empty").mkdir()
    (w / "bad.gguf").write_bytes(b"not a gguf file at all, " * 40)
    (w / "short.gguf").write_bytes(b"GGUF\x03")
    (w / "afile").write_text("a file, not a folder")
    (w / "params.json").write_text(json.dumps({"r": "4", "alpha": 8}))
    (w / "params2.json").write_text(json.dumps({"targets": "c_attn"}))
    peft_adapter(w / "ad", load_model("tiny-gpt2", device="cpu").model, ["c_attn"])
    return w


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_give_one_line_and_leave_nothing(case, bad_args_workspace, run_cli, monkeypatch, caplog):
    import logging
    import time
    import types

    import huggingface_hub.utils._http as hub_http

    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    # offline, the hub client retries with back-off (about 30 s): the waiting is skipped, its output is not
    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fast.sleep = lambda s: None
    monkeypatch.setattr(hub_http, "time", fast)
    w = bad_args_workspace
    args, culprits = BAD_ARGS[case]
    fill = {"w": str(w), "data": str(w / "data")}
    before = {p: p.read_bytes() if p.is_file() else None for p in w.rglob("*")}
    assert_one_line_error(run_cli(*[str(a).format(**fill) for a in args]), *[c.format(**fill) for c in culprits])
    assert {p: p.read_bytes() if p.is_file() else None for p in w.rglob("*")} == before
    # pytest's log capture swallows what a real process prints (e.g. one warning per HTTP retry): none may be logged
    noisy = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert noisy == [], noisy[:3]


def test_non_utf8_line_in_csv_names_file_and_line(tmp_path, ddir, run_cli):
    bad = ddir / "latin.csv"
    # a quoted field spanning two lines comes first: the line named is the physical line of the bad byte
    bad.write_bytes(b'question,answer\nq1,a1\n"two\nlines",a2\nq3,caf\xe9\nq4,a4\n')
    out = tmp_path / "out"
    assert_one_line_error(run_cli("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "latin",
                                  "--out", out), f"{bad}:5", "not valid UTF-8", "re-encode")
    assert not out.exists()
    assert_one_line_error(run_cli("data", "stats", "--model", "tiny-gpt2", "--data-dir", ddir, "latin"), f"{bad}:5")


def test_demo_never_replaces_a_folder_it_was_not_told_to(tmp_path, run_cli):
    """`lorasum demo --out DIR` on a folder holding the user's file: refused in one line, the file kept."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    one_line_error(run_cli("demo", "--model", "tiny-gpt2", "--out", out), f"--out {out} exists and is not empty",
                   "--overwrite", quiet=True)
    assert (out / "notes.txt").read_text() == "keep me" and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_adapter_files_get_the_usual_permissions(tmp_path):
    """safetensors writes 0600; a published folder's files follow the umask like every other file lorasum writes."""
    import os

    import torch

    from lorasum.delta.factors import Adapter, LoraFactors
    from lorasum.delta.peft_format import save_adapter

    a = Adapter("a", "", {"r": 2, "lora_alpha": 2}, {"m.lin": LoraFactors(torch.ones(2, 3), torch.ones(4, 2), 1.0)})
    save_adapter(a, tmp_path / "out")
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {n: 0o666 & ~mask for n in ("adapter_config.json", "adapter_model.safetensors", "lorasum.json")} \
        or modes == {n: 0o666 & ~mask for n in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.mark.parametrize("module", ["lorasum", "lorasum.cli"])
def test_python_dash_m_runs_the_command(module, tmp_path):
    """`python -m lorasum` and `python -m lorasum.cli` are the `lorasum` command: help on stdout, and a bad
    command refused in one line with exit 2."""
    ok = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "usage: lorasum" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", module, "combobulate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "combobulate" in bad.stderr, bad.stderr
