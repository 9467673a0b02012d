"""Property-based fault injection over every reader of user files: data records, adapter configs and tensors, job
specs, experiment configs and results files. For any input the answer is a clean LorasumError (one line) or a
correct result: never another exception, never a partial write. Derandomized, so CI sees the same cases every run.
"""

from __future__ import annotations

import json
import math
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lorasum.delta.factors import delta_matrix
from lorasum.delta.peft_format import load_adapter
from lorasum.errors import LorasumError

FUZZ = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _json(obj) -> str:
    """JSON as other tools write it: NaN/Infinity included (lorasum must refuse them, not crash)."""
    return json.dumps(obj, allow_nan=True)


def _one_line(e: LorasumError) -> str:
    text = str(e)
    assert text and "\n" not in text.strip(), text
    return text


@pytest.fixture
def scratch():
    """A fresh folder per example (hypothesis reruns a test body many times within one pytest test)."""
    made: list[Path] = []

    def new() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="lorasum-fuzz-")))
        return made[-1]

    yield new
    for p in made:
        shutil.rmtree(p, ignore_errors=True)


# --- data records ---------------------------------------------------------------------------------------------------
field_text = st.one_of(st.text(max_size=20), st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=20))
rows = st.lists(st.dictionaries(st.sampled_from(["question", "answer", "category", "other"]),
                                st.one_of(field_text, scalars, st.lists(scalars, max_size=2)), max_size=4),
                min_size=1, max_size=12)
raw_lines = st.lists(st.one_of(st.text(max_size=30).map(lambda t: t.replace("\n", " ")),
                               st.builds(_json, json_values), st.just("[" * 5000), st.just('{"question": NaN}')),
                     min_size=1, max_size=6)


@FUZZ
@given(rows=rows, extra=raw_lines, mangle=st.booleans(), spec_filter=st.sampled_from(["", "[category=a]",
                                                                                      "[nosuch=None]"]))
def test_data_reader_gives_records_or_one_clean_error(scratch, rows, extra, mangle, spec_filter):
    from lorasum.lm.data import DataConfig, load_domain

    folder = scratch()
    lines = [_json(r) for r in rows] + (extra if mangle else [])
    (folder / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        dom = load_domain(f"d{spec_filter}", DataConfig(data_dir=str(folder)))
    except LorasumError as e:
        _one_line(e)
        return
    kept = [r for split in ("train", "validation", "test") for r in dom.splits[split]]
    assert all(isinstance(r.question, str) and r.question.strip() and isinstance(r.answer, str) and r.answer.strip()
               for r in kept)  # an empty question or answer is never trained on
    if not mangle and not spec_filter:
        usable = [r for r in rows if isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
                  and r["question"].strip() and r["answer"].strip()]
        assert len(kept) == len(usable)


# --- adapter configs and tensors ------------------------------------------------------------------------------------
LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def _write_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(_json(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _valid(ranks: list[int], alphas: list[float], seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer, r in zip(LAYERS, ranks):
        tensors[f"base_model.model.{layer}.lora_A.weight"] = torch.randn(r, 6, generator=gen)
        tensors[f"base_model.model.{layer}.lora_B.weight"] = torch.randn(5, r, generator=gen)
    config = {"peft_type": "LORA", "r": ranks[0], "lora_alpha": alphas[0], "target_modules": ["q_proj", "down_proj"],
              "rank_pattern": {"down_proj": ranks[1]} if ranks[1] != ranks[0] else {},
              "alpha_pattern": {"down_proj": alphas[1]} if alphas[1] != alphas[0] else {}, "bias": "none"}
    return config, tensors


@FUZZ
@given(ranks=st.lists(st.integers(1, 4), min_size=2, max_size=2),
       alphas=st.lists(st.sampled_from([1, 4, 16.0, 64, 0.5]), min_size=2, max_size=2), seed=st.integers(0, 99))
def test_a_valid_adapter_loads_to_the_dense_delta_of_its_tensors(scratch, ranks, alphas, seed):
    config, tensors = _valid(ranks, alphas, seed)
    ad = load_adapter(_write_adapter(scratch() / "a", config, tensors))
    for layer, r, alpha in zip(LAYERS, ranks, alphas):
        A = tensors[f"base_model.model.{layer}.lora_A.weight"]
        B = tensors[f"base_model.model.{layer}.lora_B.weight"]
        torch.testing.assert_close(delta_matrix(ad.layers[layer]), alpha / r * B @ A, rtol=1e-6, atol=1e-6)


config_keys = st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
                               "fan_in_fan_out", "peft_type", "bias", "use_dora", "init_lora_weights", "zzz"])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8])


@FUZZ
@given(changes=st.dictionaries(config_keys, json_values, max_size=3), patterns=st.sampled_from(
    [None, {"(a+)+$": 2}, {"down_proj": "x"}, {"[": 2}, {".*": -1}, {"q_proj|down_proj": 3}]),
    dtype=dtypes, shape_slip=st.integers(0, 2), poison=st.sampled_from([None, math.nan, math.inf]),
    rename=st.sampled_from([None, "lora_magnitude_vector", "weird", "lora_A.bias"]))
def test_a_mangled_adapter_is_refused_in_one_line_or_loads_exactly(scratch, changes, patterns, dtype, shape_slip,
                                                                   poison, rename):
    config, tensors = _valid([2, 2], [16, 16], 0)
    config.update(changes)
    if patterns is not None:
        config["alpha_pattern"] = patterns
    key = f"base_model.model.{LAYERS[0]}.lora_A.weight"
    t = tensors.pop(key)
    t = t[: max(1, t.shape[0] - shape_slip)].to(dtype)
    if poison is not None and t.is_floating_point():
        t[0, 0] = poison
    tensors[key.replace("lora_A.weight", rename) if rename else key] = t
    try:
        ad = load_adapter(_write_adapter(scratch() / "a", config, tensors))
    except LorasumError as e:
        _one_line(e)
        return
    for layer, f in ad.layers.items():  # accepted: finite, floating, and its rank is its tensors' rank
        assert f.A.is_floating_point() and torch.isfinite(delta_matrix(f)).all()
        assert f.A.shape[0] == f.B.shape[1] and f.scale > 0 and math.isfinite(f.scale)


@FUZZ
@given(weight=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e300, -1e300, 1e-300])))
def test_compose_writes_a_complete_finite_adapter_or_nothing(scratch, weight):
    from lorasum.cli.main import main

    folder = scratch()
    config, tensors = _valid([2, 3], [16, 8], 1)
    a = _write_adapter(folder / "a", config, tensors)
    out = folder / "out"
    rc = main(["compose", f"{a}:{weight!r}", str(a), "--out", str(out)])
    assert rc in (0, 2)
    if rc == 2:
        assert not out.exists() and sorted(p.name for p in folder.iterdir()) == ["a"]
    else:
        ad = load_adapter(out)
        assert all(torch.isfinite(delta_matrix(f)).all() for f in ad.layers.values())


# --- job specs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_specs(tmp_path_factory):
    from conftest import write_data_folder

    from lorasum.study.config import load_config
    from lorasum.study.experiment import plan
    from lorasum.study.plan import CheckKey, SimKey, TrainKey

    root = tmp_path_factory.mktemp("fuzzspecs")
    write_data_folder(root / "data", colors=40, shapes=40)
    cfg = load_config(None, "smoke", {"domains": ["colors", "shapes"], "data_dir": str(root / "data")})
    p = plan(cfg, root / "run")
    seed = cfg.seeds[0]
    return [p.train[TrainKey("colors", seed)], p.sims[SimKey("pair", ("colors", "shapes"), seed)],
            p.checks[CheckKey("colors", seed)], next(iter(p.evals.values())), p.data_stats]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(obj, path, value):
    obj = json.loads(json.dumps(obj))
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


@FUZZ
@given(data=st.data(), value=json_values)
def test_a_mangled_job_spec_is_refused_in_one_line_before_any_work(real_specs, data, value):
    from lorasum.study.jobs import check_spec

    for spec in real_specs:
        check_spec(spec, "spec.json")  # the plan's own specs are valid
    spec = data.draw(st.sampled_from(real_specs))
    path, _ = data.draw(st.sampled_from(list(_paths(spec))))
    try:
        check_spec(_mutate(spec, path, value), "spec.json")
    except LorasumError as e:
        _one_line(e)


# --- experiment configs ---------------------------------------------------------------------------------------------
exp_keys = st.sampled_from(["domains", "seeds", "train", "splits", "max_records", "min_records", "threads", "model",
                            "init_modes", "unlearn_weights", "eval_scope", "retention_tolerance", "tune", "dtype",
                            "compositions", "trian"])


@FUZZ
@given(overrides=st.dictionaries(exp_keys, json_values, max_size=3), as_json=st.booleans())
def test_a_mangled_config_file_is_refused_in_one_line_or_loads(scratch, overrides, as_json):
    import yaml

    from lorasum.study.config import load_config

    folder = scratch()
    path = folder / ("c.json" if as_json else "c.yaml")
    path.write_text(_json(overrides) if as_json else yaml.safe_dump(overrides, allow_unicode=True))
    try:
        cfg = load_config(str(path), "smoke")
    except LorasumError as e:
        _one_line(e)
        return
    json.dumps(cfg.to_dict(), allow_nan=False)  # whatever is accepted can be recorded exactly


# --- results files --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import write_smoke_domains

    from lorasum.study.config import load_config
    from lorasum.study.experiment import run_experiment

    root = tmp_path_factory.mktemp("fuzzresults")
    write_smoke_domains(root / "data")
    cfg = load_config(None, "smoke", {"domains": ["alpha", "beta", "gamma"], "data_dir": str(root / "data")})
    run_experiment(cfg, root / "run")
    return root / "run"


@settings(FUZZ, max_examples=25)
@given(data=st.data(), value=json_values, cut=st.integers(0, 400))
def test_an_edited_or_truncated_results_file_is_refused_and_nothing_is_rewritten(finished_run, scratch, data, value,
                                                                                cut):
    from lorasum.cli.main import main

    good = json.loads((finished_run / "results.json").read_text())
    run = scratch()
    if data.draw(st.booleans()):
        path, old = data.draw(st.sampled_from([p for p in _paths(good) if p[0] and p[0][0] != "digest"]))
        mangled = _json(_mutate(good, path, value)).encode()
    else:
        full = (finished_run / "results.json").read_bytes()
        mangled = full[: max(0, len(full) - 1 - cut)]
    try:
        unchanged = json.loads(mangled) == good  # a mutation to the same value, or only the final newline cut
    except ValueError:
        unchanged = False
    (run / "results.json").write_bytes(mangled)
    rc = main(["report", str(run)])
    if unchanged:
        assert rc == 0
    else:
        assert rc == 2
        assert sorted(p.name for p in run.iterdir()) == ["results.json"]  # no figure, no report
