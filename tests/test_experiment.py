"""End-to-end `smoke` grid on tiny-gpt2 with three domains the test writes: files, tables, fit, resume, kill -9."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_smoke_domains
from lorasum.cli.main import main
from lorasum.study.config import load_config
from lorasum.stats import linear_fit

# Subprocesses use the parent's thread count: float reductions (and so the bytes of results.json) depend on it.
ENV = {**os.environ, "LORASUM_PROGRESS": "0", "OMP_NUM_THREADS": str(__import__("torch").get_num_threads())}


def _write_domains(folder: Path) -> None:
    write_smoke_domains(folder)  # short records: answers survive smoke's max length of 32 bytes


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    _write_domains(root / "data")
    args = ["experiment", "--preset", "smoke", "--domains", "alpha", "beta", "gamma", "--data-dir",
            str(root / "data"), "--out", str(root / "run")]
    assert main(args) == 0
    return root, args


def _walk_numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_numbers(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_files_exist_and_every_table_cell_is_finite(smoke_run):
    run = smoke_run[0] / "run"
    for f in ("results.json", "report.md", "report.html", "config.json", "timings.json",
              "figures/rms_vs_pct_change.png", "figures/cosine_heatmap.png", "figures/perplexity_bars.png"):
        assert (run / f).is_file(), f
    r = json.loads((run / "results.json").read_text())
    for section in ("perplexity", "pairs", "compositions", "unlearning"):
        for path, v in _walk_numbers(r[section]):
            if isinstance(v, float) or v is None:
                assert v is not None and math.isfinite(v), f"{section}{path} = {v}"
    # the grid: 7 partitions; pairs and the triple compared; three unlearning rows
    assert len(r["compositions"]) == 4 and len(r["unlearning"]) == 3
    assert {m for m in r["models"] if m.startswith("adapter[")} == {
        "adapter[alpha]", "adapter[beta]", "adapter[gamma]", "adapter[alpha+beta]", "adapter[alpha+gamma]",
        "adapter[beta+gamma]", "adapter[alpha+beta+gamma]"}
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "Table 3" in html and "paper" in html
    for u in r["unlearning"]:  # in place: apply all fundamentals, remove one == sum of the other two
        assert u["inplace_check"]["rel_error_weights"] < 1e-6


def test_fit_equals_a_fit_recomputed_from_its_points(smoke_run):
    r = json.loads((smoke_run[0] / "run" / "results.json").read_text())
    pts = r["fit"]["points"]  # one point per pair (its mean over seeds): n is the number of pairs
    assert len(pts) == 3 and r["fit"]["n"] == 3 and len(r["fit"]["points_per_seed"]) == 3 * len(r["config"]["seeds"])
    ref = linear_fit([p[0] for p in pts], [p[1] for p in pts], r["fit"]["level"])
    for k in ("slope", "intercept", "r2"):
        assert r["fit"][k] == pytest.approx(ref[k], rel=1e-9)
    pairs = [c for c in r["compositions"] if c["level"] == 2]
    assert sorted(p[1] for p in pts) == pytest.approx(sorted(c["pct_change"]["mean"] for c in pairs))


def test_summed_ppl_matches_lorasum_eval_of_the_same_adapters(smoke_run, capsys):
    """The grid's 'sum' row is the same number `lorasum eval` gives for the two adapters."""
    root, _ = smoke_run
    r = json.loads((root / "run" / "results.json").read_text())
    cfg = load_config(str(root / "run" / "config.json"))
    spec = json.loads(json.dumps(r["models"]["sum[alpha+beta]"]))
    assert spec["terms"] == [["alpha", 1.0], ["beta", 1.0]]
    keys = {}
    for d in (root / "run" / "adapters").iterdir():
        meta = json.loads((d / "lorasum.json").read_text())
        if not meta["data"]["skip"]:  # not the second-sample reference of the domain
            keys[meta["partition"]] = d
    capsys.readouterr()
    rc = main(["eval", "--model", "tiny-gpt2", "--data-dir", cfg.data_dir, "--data", "alpha", "beta",
               "--adapter", str(keys["alpha"]), "--adapter", str(keys["beta"]), "--max-test", str(cfg.max_test),
               "--max-length", str(cfg.train.max_length), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    row = next(c for c in r["compositions"] if c["subset"] == ["alpha", "beta"])
    assert out["results"]["pooled"]["perplexity"] == pytest.approx(row["summed"]["mean"], rel=1e-6)


def test_rerun_recomputes_nothing(smoke_run, monkeypatch):
    root, args = smoke_run
    before = (root / "run" / "results.json").read_bytes()

    def boom(*a, **k):
        raise AssertionError("a job ran again")

    monkeypatch.setattr("lorasum.study.executors.run_job", boom)
    assert main(args) == 0
    assert (root / "run" / "results.json").read_bytes() == before


def test_changed_config_is_refused_naming_the_key(smoke_run, capsys):
    root, args = smoke_run
    capsys.readouterr()
    assert main(args + ["--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model" in err and "--overwrite" in err


def test_changing_an_eval_cap_retrains_nothing(smoke_run, tmp_path):
    from lorasum.study.experiment import plan

    root, _ = smoke_run
    cfg = load_config(str(root / "run" / "config.json"))
    p1 = plan(cfg, tmp_path)
    cfg.max_test = cfg.max_test + 3
    p2 = plan(cfg, tmp_path)
    assert {k: s["key"] for k, s in p1.train.items()} == {k: s["key"] for k, s in p2.train.items()}
    test1 = {k: s["key"] for k, s in p1.evals.items() if k.split == "test"}
    test2 = {k: s["key"] for k, s in p2.evals.items() if k.split == "test"}
    assert test1 and set(test1.values()).isdisjoint(test2.values())
    val1 = {k: s["key"] for k, s in p1.evals.items() if k.split == "validation"}  # choose the best single
    assert val1 and val1 == {k: s["key"] for k, s in p2.evals.items() if k.split == "validation"}
    assert {k: s["key"] for k, s in p1.sims.items()} == {k: s["key"] for k, s in p2.sims.items()}


def test_job_in_a_fresh_process_gives_the_same_artifact(smoke_run, tmp_path):
    """`lorasum job SPEC.json` reproduces an eval artifact byte for byte in a new process."""
    from lorasum.study.experiment import plan
    from lorasum.study.plan import EvalKey

    root, _ = smoke_run
    cfg = load_config(str(root / "run" / "config.json"))
    p = plan(cfg, root / "run")
    spec = p.evals[EvalKey("sum[alpha+gamma]", "gamma", cfg.seeds[0])]
    art = root / "run" / "evals" / f"{spec['key']}.json"
    want = art.read_bytes()
    art.unlink()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "lorasum.cli", "job", str(spec_file)], check=True, capture_output=True,
                   env=ENV)
    assert art.read_bytes() == want


def _kill_at(args, pause: str, marker: Path, timeout=300, meanwhile=None) -> str:
    """Run the experiment in a subprocess paused by the test-only hook (LORASUM_TEST_PAUSE) at `pause`; once its
    marker file says it is there, call `meanwhile(pid)` (if given), then SIGKILL it. Returns the marker's text (the
    temp file held, for a write)."""
    env = {**ENV, "LORASUM_TEST_PAUSE": pause, "LORASUM_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "lorasum.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    try:
        while not marker.is_file():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before reaching {pause}"
            assert time.time() - t0 < timeout, f"the run did not reach {pause} in {timeout} s"
            time.sleep(0.01)
        assert proc.poll() is None
        if meanwhile is not None:
            meanwhile(proc.pid)
        return marker.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_sigkill_during_training_and_during_a_write_then_resume_is_byte_identical(smoke_run, tmp_path):
    root, args = smoke_run
    run = tmp_path / "run"
    args = [a if a != str(root / "run") else str(run) for a in args]

    def second_run_is_refused(pid: int) -> None:  # even one that would switch the folder to another config
        other = subprocess.run([sys.executable, "-m", "lorasum.cli", *args, "--domains", "alpha", "beta", "--overwrite"],
                               capture_output=True, text=True, env=ENV)
        assert other.returncode == 2
        assert other.stderr.startswith(f"lorasum: error: --out {run} is in use by another lorasum run (pid {pid} ")
        assert len(other.stderr.strip().splitlines()) == 1

    # killed after the first optimizer step of the first adapter: nothing of it is saved
    _kill_at(args, "train", tmp_path / "train.marker", meanwhile=second_run_is_refused)
    assert json.loads((run / "config.json").read_text())["domains"] == ["alpha", "beta", "gamma"]
    assert (run / "checks").is_dir()  # the data-stats job ran before training
    assert not list(run.glob("adapters/*/adapter_model.safetensors"))
    assert not (run / "results.json").exists()

    # resumed, then killed inside the first eval artifact's atomic write: temp file complete, not yet renamed
    held = Path(_kill_at(args, "write:/evals/", tmp_path / "write.marker"))
    assert held.parent == run / "evals" and held.name.endswith(".tmp") and held.is_file()
    assert not [p for p in (run / "evals").iterdir() if not p.name.startswith(".")]  # no eval artifact yet
    assert len(list(run.glob("adapters/*/adapter_model.safetensors"))) == 10  # 7 partitions + 3 split-sample ceilings
    assert not (run / "results.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "lorasum.cli", *args], check=True, capture_output=True,
                             text=True, env=ENV)
    assert "was killed; resuming from its finished jobs" in resumed.stderr
    assert (run / "results.json").read_bytes() == (root / "run" / "results.json").read_bytes()
    assert not held.exists()  # the killed write's temp file was removed by the resume
    assert not [p for p in run.rglob(".*") if p.name != ".lorasum.lock"]


def test_a_truncated_adapter_is_retrained_and_the_run_completes(smoke_run, tmp_path, capfd):
    root, args = smoke_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    args = [a if a != str(root / "run") else str(run) for a in args]
    weights = sorted(run.glob("adapters/*/adapter_model.safetensors"))[0]
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) - 100])  # a torn write a resume must not trust
    capfd.readouterr()
    assert main(args) == 0
    err = capfd.readouterr().err
    assert f"{weights} is truncated" in err and "its job runs again" in err
    assert weights.read_bytes() == whole  # retrained, to the same bytes
    assert (run / "results.json").read_bytes() == (root / "run" / "results.json").read_bytes()
    assert main(args) == 0 and "truncated" not in capfd.readouterr().err  # and trusted from then on


def test_a_results_json_without_its_digest_is_reported_only_as_unsigned(smoke_run, tmp_path):
    root, _ = smoke_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    assert main(["report", str(run)]) == 0
    assert "unsigned" not in (run / "report.md").read_text() + (run / "report.html").read_text()
    results = json.loads((run / "results.json").read_text())
    del results["digest"]
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run)]) == 0
    mark = "unsigned: results.json carries no digest; it may have been edited"
    assert mark in (run / "report.md").read_text() and mark in (run / "report.html").read_text()


def _eval_losses(root: Path, partitions: list[str], domains: list[str], tmp: Path, capsys) -> dict:
    """Per-example NLL and tokens of base + Σ adapters(partitions) on each domain, by `lorasum eval --per-example`,
    summed here: {domain: (ΣNLL, Σtokens)}."""
    cfg = load_config(str(root / "run" / "config.json"))
    folders = {}
    for d in (root / "run" / "adapters").iterdir():
        meta = json.loads((d / "lorasum.json").read_text())
        if not meta["data"]["skip"]:  # not the second-sample reference of the domain
            folders[meta["partition"]] = d
    per = tmp / f"{'_'.join(partitions)}-{'_'.join(domains)}.jsonl"
    capsys.readouterr()
    rc = main(["eval", "--model", "tiny-gpt2", "--data-dir", cfg.data_dir, "--data", *domains,
               *[x for p in partitions for x in ("--adapter", str(folders[p]))], "--max-test", str(cfg.max_test),
               "--max-length", str(cfg.train.max_length), "--per-example", str(per), "--json"])
    assert rc == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in per.read_text().splitlines()]
    return {d: (sum(r["nll"] for r in rows if r["domain"] == d), sum(r["tokens"] for r in rows if r["domain"] == d))
            for d in domains}


def test_oracle_router_and_where_the_cost_lands_match_losses_recomputed_by_eval(smoke_run, tmp_path, capsys):
    """The oracle row (each domain served by its own block), its %Δ vs merged, the sum's %Δ vs the oracle and the
    per-domain split of the sum's gap, against per-example losses from separate `lorasum eval` runs."""
    root, _ = smoke_run
    r = json.loads((root / "run" / "results.json").read_text())
    pair = ["alpha", "beta"]
    own = {d: _eval_losses(root, [d], [d], tmp_path, capsys)[d] for d in pair}
    merged = _eval_losses(root, ["alpha+beta"], pair, tmp_path, capsys)
    summed = _eval_losses(root, pair, pair, tmp_path, capsys)
    tokens = sum(t for _, t in merged.values())
    assert tokens == sum(t for _, t in own.values()) == sum(t for _, t in summed.values())
    ppl = lambda parts: math.exp(sum(n for n, _ in parts) / tokens)  # noqa: E731  pooled over the pair
    oracle, ppl_merged, ppl_sum = ppl(own.values()), ppl(merged.values()), ppl(summed.values())
    assert ppl_sum > 1 and abs(ppl_sum - oracle) > 1e-3 * oracle  # the check distinguishes the sum from the oracle

    row = next(x for x in r["routing"] if x["subset"] == pair)["oracle"]
    assert row["route"] == {"alpha": "adapter[alpha]", "beta": "adapter[beta]"}
    assert row["perplexity"]["mean"] == pytest.approx(oracle, rel=1e-6)
    assert row["pct_change"]["mean"] == pytest.approx(100 * (oracle / ppl_merged - 1), abs=1e-4)
    assert row["sum_vs_oracle"]["mean"] == pytest.approx(100 * (ppl_sum / oracle - 1), abs=1e-4)
    lo, hi = row["pct_change"]["ci"]
    assert lo <= row["pct_change"]["mean"] <= hi

    cost = next(x for x in r["cost_by_domain"] if x["subset"] == pair)
    s = cost["models"]["sum"]
    for d in pair:
        assert cost["own"][d]["mean"] == pytest.approx(math.exp(own[d][0] / own[d][1]), rel=1e-6)
        assert cost["merged"][d]["mean"] == pytest.approx(math.exp(merged[d][0] / merged[d][1]), rel=1e-6)
        sd = s["domains"][d]
        assert sd["vs_own"]["mean"] == pytest.approx(100 * (math.exp((summed[d][0] - own[d][0]) / own[d][1]) - 1),
                                                     abs=1e-4)
        assert sd["vs_merged"]["mean"] == pytest.approx(
            100 * (math.exp((summed[d][0] - merged[d][0]) / own[d][1]) - 1), abs=1e-4)
        assert s["interference_by_domain"][d] == pytest.approx((summed[d][0] - own[d][0]) / tokens, abs=1e-7)
    assert s["oracle_gap"] == pytest.approx(math.log(oracle / ppl_merged), abs=1e-7)
    assert s["log_gap"] == pytest.approx(math.log(ppl_sum / ppl_merged), abs=1e-7)
    assert s["interference"] + s["oracle_gap"] == pytest.approx(s["log_gap"], abs=1e-12)
    verdicts = {f["claim"] for f in r["findings"] if f["subject"] == "alpha + beta"}
    assert {"oracle routing vs merged", "where the cost of the sum lands"} <= verdicts
    md = (root / "run" / "report.md").read_text()
    assert "oracle routing (own block per domain)" in md and "Where the cost lands" in md
