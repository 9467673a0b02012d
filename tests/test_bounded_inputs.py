"""Bounded inputs: every value a user supplies is bounded where it enters (YAML size and alias expansion, data files
in test_bounded_data_files.py, counts and merge hyperparameters, output names), and every refusal is one line
naming the file, field or value, with exit code 2 and nothing left behind. Memory bombs run in a subprocess under
an address-space limit, so a regression fails in seconds instead of exhausting the machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_line_error
from delta_fixtures import make_adapter

from lorasum import yamlfile
from lorasum.errors import LorasumError, show

SRC = str(Path(__file__).resolve().parents[1] / "src")
BOMB = "&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"  # nine levels of nine aliases each: 9**9 values, ~330 bytes
for level in "bcdefghi":
    BOMB = f"{BOMB}\n- &{level} [{','.join([f'*{chr(ord(level) - 1)}'] * 9)}]"


def bounded_cli(argvs: list[list[str]], memory: int = 3 << 30, timeout: int = 120) -> list[tuple[int, str, str]]:
    """Run `lorasum ARGV` for each argv in one fresh process limited to `memory` bytes of address space."""
    code = ("import contextlib, io, json, resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
            "from lorasum.cli.main import main\n"
            "res = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    out, err = io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        rc = main(argv)\n"
            "    res.append([rc, out.getvalue(), err.getvalue()])\n"
            "print(json.dumps(res))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "LORASUM_PROGRESS": "0"}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    return [tuple(r) for r in json.loads(p.stdout.splitlines()[-1])]


# --- YAML: one reader, an alias/size/depth budget -----------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_in_one_line_wherever_it_sits(tmp_path):
    """The bomb under domains, tune.space, unlearn_weights, and as --space: refused before any value is built."""
    files = {
        "domains": f"domains:\n- {BOMB}\n",
        "tune": "tune:\n  space:\n    lr:\n      choices:\n      - " + BOMB.replace("\n", "\n      ") + "\n",
        "unlearn": f"unlearn_weights:\n- {BOMB}\n",
        "space": "lr:\n  choices:\n  - " + BOMB.replace("\n", "\n  ") + "\n",
    }
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text)
        assert len(text) < 700
    argvs = [["experiment", "--config", str(paths[n]), "--out", str(tmp_path / f"run-{n}")]
             for n in ("domains", "tune", "unlearn")]
    argvs.append(["tune", "--data", "colors", "--trials", "1", "--space", str(paths["space"]),
                  "--out", str(tmp_path / "tuned")])
    start = time.monotonic()
    for (name, path), result in zip(paths.items(), bounded_cli(argvs)):
        one_line_error(result, str(path), f"more than {yamlfile.MAX_YAML_NODES} values")
    assert time.monotonic() - start < 90
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())


def test_yaml_budgets_at_and_past_their_limits(tmp_path, monkeypatch):
    fix = "fix it"
    monkeypatch.setattr(yamlfile, "MAX_YAML_NODES", 9)
    assert yamlfile.parse_yaml("a: &x [1, 2]\nb: *x", "f.yaml", fix) == {"a": [1, 2], "b": [1, 2]}  # 9 values
    with pytest.raises(LorasumError, match=r"f.yaml: YAML expands to more than 9 values"):
        yamlfile.parse_yaml("a: &x [1, 2, 3]\nb: *x", "f.yaml", fix)  # 11 values, one alias counted in full
    monkeypatch.setattr(yamlfile, "MAX_YAML_DEPTH", 3)
    assert yamlfile.parse_yaml("[[[1]]]", "f.yaml", fix) == [[[1]]]
    with pytest.raises(LorasumError, match="nested more than 3 levels"):
        yamlfile.parse_yaml("[[[[1]]]]", "f.yaml", fix)
    with pytest.raises(LorasumError, match="refers to a node that contains it"):
        yamlfile.parse_yaml("&a [*a]", "f.yaml", fix)
    monkeypatch.setattr(yamlfile, "MAX_YAML_BYTES", 20)
    f = tmp_path / "s.yaml"
    f.write_text("a: " + "x" * 16 + "\n")  # 20 bytes
    assert yamlfile.read_yaml(f, "config", fix) == {"a": "x" * 16}
    f.write_text("a: " + "x" * 17 + "\n")
    with pytest.raises(LorasumError, match=rf"config {f} is 21 bytes; YAML files are limited to 20 bytes"):
        yamlfile.read_yaml(f, "config", fix)


@pytest.mark.parametrize("content, culprit", [
    (b"lr:\n  choices: [" + b"9" * 5000 + b"]\n", "4300 digits"),
    (b"\x00\x01\xff\xfe binary", "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b"lr: {low: 1, high: " + b"[" * 5000 + b"]" * 5000 + b"}\n", "nested"),
])
def test_a_hostile_space_file_is_one_line(tmp_path, run_cli, content, culprit):
    space = tmp_path / "space.yaml"
    space.write_bytes(content)
    out = tmp_path / "out"
    one_line_error(run_cli("tune", "--data", "colors", "--trials", "1", "--space", space, "--out", out),
                   f"--space {space}", culprit)
    assert not out.exists()


def test_a_space_that_is_a_fifo_is_refused_without_opening_it(tmp_path, run_cli):
    fifo = tmp_path / "space.yaml"
    os.mkfifo(fifo)
    one_line_error(run_cli("tune", "--data", "colors", "--trials", "1", "--space", fifo, "--out", tmp_path / "o"),
                   str(fifo), "not a regular file")


def test_messages_quote_a_bounded_form_of_any_value():
    bomb: list = [1, 2]
    for _ in range(64):
        bomb = [bomb, bomb]  # 2**64 leaves: the full repr could never be built
    start = time.monotonic()
    for value in (bomb, 10**5000, "x" * 10**6, b"\0" * 10**6, {"k": bomb}):
        assert len(show(value)) <= 64
    assert time.monotonic() - start < 1
    assert show([1, "a", None]) == "[1, 'a', None]"
    from lorasum import schema
    from lorasum.lm.train import TrainConfig

    with pytest.raises(LorasumError) as e:
        schema.parse(TrainConfig, {"lr": bomb}, "run.yaml")
    assert str(e.value).startswith("run.yaml: 'lr' must be a number, got [[[") and len(str(e.value)) < 150


# --- counts and merge hyperparameters ------------------------------------------------------------------------------
@pytest.fixture
def ddir_rows() -> dict[str, int]:
    """The shared `ddir` with 40 colors records only."""
    return {"colors": 40, "shapes": 0}


def test_counts_are_bounded_where_they_enter(tmp_path, ddir, run_cli):
    from lorasum.cluster import MAX_WORKERS, ExecutorOptions
    from lorasum.lm.train import LIMITS, TrainConfig

    out = tmp_path / "out"
    base = ("train", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--out", out)
    for flag, key in (("--r", "r"), ("--epochs", "epochs"), ("--batch-size", "batch_size")):
        TrainConfig(**{key: LIMITS[key]}).check()  # at the limit: accepted
        one_line_error(run_cli(*base, flag, LIMITS[key] + 1), f"{flag} must be at least 1 and at most {LIMITS[key]}")
    assert not out.exists()
    with pytest.raises(LorasumError) as e:
        ExecutorOptions("ray", MAX_WORKERS + 1).check()
    assert e.value.key == "workers" and f"at most {MAX_WORKERS}" in str(e.value)
    try:
        ExecutorOptions("ray", MAX_WORKERS).check()
    except LorasumError as e2:
        assert e2.key != "workers"  # Ray may be missing here; the count itself is accepted
    one_line_error(run_cli("demo", "--data-dir", ddir, "--domain", "colors", "--train-records", "0", "--out", out),
                   "--train-records must be at least 1")
    one_line_error(run_cli("demo", "--data-dir", ddir, "--domain", "colors", "--test-records", str(10**9),
                           "--out", out), "--test-records must be at least 1 and at most 100000")
    assert not out.exists()


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return make_adapter(tmp_path / "a", seed=0), make_adapter(tmp_path / "b", seed=1)


def test_merge_hyperparameters_are_bounded(tmp_path, pair, run_cli):
    from lorasum.delta.registry import MAX_LAM, method_params

    a, b = pair
    out = tmp_path / "c"
    assert method_params("task_arithmetic", {"lam": MAX_LAM})["lam"] == MAX_LAM
    one_line_error(run_cli("compose", a, b, "--method", "task_arithmetic", "--lam", "1e308", "--out", out),
                   "--lam must be a finite number in [-1000, 1000], got 1e+308")
    err = one_line_error(run_cli("compose", a, b, "--method", "ties", "--density", "1e-300", "--out", out),
                         "--density 1e-300 keeps no entry of layer")
    assert not out.exists()
    from lorasum.delta.peft_format import load_adapter

    smallest = min(f.B.shape[0] * f.A.shape[1] for f in load_adapter(a).layers.values())
    assert f"({smallest} entries)" in err or "entries)" in err
    rc, _, err, _ = run_cli("compose", a, b, "--method", "ties", "--density", repr(1.0001 / smallest), "--out", out)
    assert rc == 0, err  # one entry of the smallest layer kept: accepted
    one_line_error(run_cli("compose", a, b, "--method", "", "--out", tmp_path / "d"), "'' is not a merge method")
    assert not (tmp_path / "d").exists()


def test_a_method_without_adapters_and_peft_ranks_are_refused_before_loading(tmp_path, pair, run_cli, monkeypatch):
    import lorasum.cli.algebra as algebra
    import lorasum.cli.core as core

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(core, "load", no_load)
    monkeypatch.setattr(algebra, "load", no_load)
    one_line_error(run_cli("generate", "--model", "tiny-gpt2", "hi", "--method", "ties"),
                   "--method 'ties' merges adapters, and none is given")
    one_line_error(run_cli("eval", "--model", "tiny-gpt2", "--data", "colors", "--method", "mean"), "--method 'mean'")
    wide = make_adapter(tmp_path / "wide", r=8)
    out = tmp_path / "c"
    one_line_error(run_cli("compose", pair[0], wide, "--method", "peft_linear", "--model", "tiny-gpt2", "--out", out),
                   "--method peft_linear (PEFT's add_weighted_adapter) needs every adapter at one rank, got ranks 4, 8")
    assert not out.exists()


def test_search_weights_max_length_beyond_positions_leaves_no_study(tmp_path, ddir, pair, run_cli):
    out = tmp_path / "search"
    one_line_error(run_cli("search-weights", *pair, "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors",
                           "--trials", "1", "--max-length", "100000", "--out", out),
                   "--max-length 100000", "256 positions")
    assert not out.exists()


# --- tune --out and the study name ---------------------------------------------------------------------------------
def _mount_tmpfs(where: Path, *options: str) -> bool:
    where.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=1m", *options)), "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_tune_out_is_checked_where_it_enters(tmp_path, ddir, run_cli):
    base = ("tune", "--model", "tiny-gpt2", "--data-dir", ddir, "--data", "colors", "--trials", "1")
    long = "x" * 256
    one_line_error(run_cli(*base, "--out", tmp_path / long), "--out", "256 bytes")
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        (mnt / "tuned").mkdir()
        (mnt / "tuned" / "study.db").write_bytes(b"")  # a study to resume
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for out in (mnt / "new", mnt / "tuned"):
            one_line_error(run_cli(*base, "--out", out), f"--out {out}", "is not writable")
        assert sorted(p.name for p in mnt.iterdir()) == ["tuned"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_the_study_name_is_escaped_in_summary_md(tmp_path):
    import optuna

    from lorasum.tune.summary import write_summary

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(study_name="<img src=x onerror=alert(1)> **bold** [l](http://e)\n# head")
    write_summary(study, tmp_path, {})
    title = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert title == (r"# Tuning: &lt;img src=x onerror=alert\(1\)&gt; \*\*bold\*\* \[l\]\(http://e\) \# head")


def test_progress_off_silences_library_bars(tmp_path, pair, run_cli, monkeypatch):
    """LORASUM_PROGRESS=0 (set for every test) also silences transformers' shard bars and GGUF's bare tqdm."""
    import types

    from transformers.utils import logging as hf_logging

    from lorasum.progress import quiet_module

    monkeypatch.setenv("TQDM_DISABLE", "0")  # restored after the test; main sets it under LORASUM_PROGRESS=0
    rc, out, err, _ = run_cli("merge", "--model", "tiny-gpt2", "--adapter", pair[0], "--out", tmp_path / "m")
    assert rc == 0 and err == "", err
    assert not hf_logging.is_progress_bar_enabled()
    from tqdm.auto import tqdm

    module = types.SimpleNamespace(tqdm=tqdm)
    quiet_module(module)
    assert module.tqdm(range(3), desc="GGUF").disable


def test_json_reads_are_bounded_and_refuse_special_files(tmp_path, monkeypatch):
    import lorasum.jsonfile as jsonfile

    at = tmp_path / "at.json"
    at.write_text('{"a": 1}' + " " * 92)  # exactly 100 bytes
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 100)
    assert jsonfile.read_json(at, "run config", "fix it") == {"a": 1}
    past = tmp_path / "past.json"
    past.write_text('{"a": 1}' + " " * 93)
    with pytest.raises(LorasumError, match=r"run config .*past\.json is 101 bytes, over the 0 MiB .*; fix it$"):
        jsonfile.read_json(past, "run config", "fix it")
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(LorasumError, match=r"results file .*results\.json is not a regular file; rerun"):
        jsonfile.read_json(fifo, "results file", "rerun")
