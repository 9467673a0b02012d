"""Units of work as JSON job specs with content-derived keys; `lorasum job SPEC.json` runs one anywhere.

A spec declares everything its result depends on (model, data fingerprints, hyperparameters, the keys of the
adapters it reads), and its key is a hash of exactly that: changing an eval cap changes eval keys only, so nothing
is retrained. Paths (`run_dir`) are not part of the key. Artifacts land under the run folder by key:
`adapters/<key>/` (stock PEFT + lorasum.json), `evals/<key>.json`, `sims/<key>.json`, each written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .data import DataConfig
from .errors import LorasumError
from .files import atomic_write_json

KINDS = ("train", "eval", "similarity", "inplace", "data_stats")
_NOT_IN_KEY = ("run_dir", "key", "device", "data_dir")


def job_key(spec: dict) -> str:
    """sha256 of the spec's canonical JSON without its location; stable across machines and runs."""
    body = {k: v for k, v in spec.items() if k not in _NOT_IN_KEY}
    return spec["kind"] + "-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]


def with_key(spec: dict) -> dict:
    return {**spec, "key": job_key(spec)}


def artifact_path(spec: dict) -> Path:
    run = Path(spec["run_dir"])
    key = spec.get("key") or job_key(spec)
    return run / {"train": "adapters", "eval": "evals", "similarity": "sims", "inplace": "checks",
                 "data_stats": "checks"}[spec["kind"]] / (
        key if spec["kind"] == "train" else f"{key}.json")


def is_done(spec: dict) -> bool:
    p = artifact_path(spec)
    return (p / "adapter_model.safetensors").is_file() if spec["kind"] == "train" else p.is_file()


def adapter_dir(run_dir: str | Path, train_key: str) -> Path:
    return Path(run_dir) / "adapters" / train_key


def _data_config(spec: dict) -> DataConfig:
    d = spec["data"]
    return DataConfig(spec.get("data_dir"), d["question_field"], d["answer_field"], d["split_seed"],
                      {k: v for k, v in d["max_records"].items() if v is not None})


def _check_sources(spec: dict, domains) -> None:
    """The data files must still be the ones the key was derived from."""
    for dom in domains:
        want = spec["data"]["sources"].get(dom.spec.split("[")[0])
        if want and dom.source_sha256 and want != dom.source_sha256:
            raise LorasumError(f"{dom.source} changed since the job was planned (sha256 differs); rerun the "
                               "experiment to re-plan")


def run_job(spec: dict, loaded=None) -> Path:
    """Run one job and return its artifact path; `loaded` reuses an in-process model (else it is loaded)."""
    if spec.get("kind") not in KINDS:
        raise LorasumError(f"job spec: 'kind' must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
    out = artifact_path(spec)
    if is_done(spec):
        return out
    if spec["kind"] == "similarity":
        _run_similarity(spec, out)
        return out
    if loaded is None:
        from .models import load_model

        loaded = load_model(spec["model"], spec.get("device"), spec.get("dtype"), spec.get("autocast"))
    if spec["kind"] == "inplace":
        _run_inplace(spec, out, loaded)
    elif spec["kind"] == "data_stats":
        from .datastats import data_stats

        atomic_write_json(out, {"rows": data_stats(spec["domains"], loaded.tokenizer, _data_config(spec),
                                                   spec["max_length"])})
    elif spec["kind"] == "train":
        from .data import load_domain, partition_domains
        from .train import TrainConfig, train_adapter

        data = _data_config(spec)
        _check_sources(spec, [load_domain(d, data) for d in partition_domains(spec["partition"])])
        train_adapter(loaded, spec["partition"], out, TrainConfig.from_dict(spec["train"]), data, overwrite=True)
    else:
        _run_eval(spec, out, loaded)
    return out


def _run_eval(spec: dict, out: Path, loaded) -> None:
    from .data import load_domain, require_nonempty, require_predicted_tokens, tokenize_records
    from .delta import load_adapter
    from .evaluate import per_example_nll
    from .merge import apply_adapters, restore_weights, snapshot_weights

    data = _data_config(spec)
    split = spec.get("split", "test")  # absent in test-split specs, so their keys predate the field
    dom = load_domain(spec["domain"], data)
    _check_sources(spec, [dom])
    require_nonempty([dom], split)
    examples = tokenize_records(loaded.tokenizer, dom.records[split], spec["max_length"])
    # a split with nothing to predict would give a NaN perplexity: refuse it, naming domain, split and the fix
    require_predicted_tokens({dom.spec: examples}, split, spec["max_length"], spec["loss_on"])
    adapters = [(load_adapter(adapter_dir(spec["run_dir"], a["train_key"])), float(a["weight"]))
                for a in spec["adapters"]]
    snapshot = snapshot_weights(loaded.model, sorted({n for a, _ in adapters for n in a.layers}))
    try:
        apply_adapters(loaded.model, adapters)
        with loaded.autocast():
            rows = per_example_nll(loaded.model, {dom.spec: examples}, loaded.tokenizer.pad_token_id,
                                   spec["batch_size"], spec["loss_on"], desc=f"eval {dom.spec}")
    finally:
        restore_weights(loaded.model, snapshot)
    atomic_write_json(out, {"domain": dom.spec, "nll": [r.nll for r in rows], "tokens": [r.tokens for r in rows]})


def _run_similarity(spec: dict, out: Path) -> None:
    """cos per layer between two (weighted sums of) adapters, the RMS, and the per-layer norms of both sides."""
    from .delta import load_adapter
    from .similarity import layer_cosines, layer_norms, rms
    from .compose import weighted_sum

    def side(items: list[dict]):
        return weighted_sum([(load_adapter(adapter_dir(spec["run_dir"], a["train_key"])), float(a["weight"]))
                             for a in items])

    a, b = side(spec["a"]), side(spec["b"])
    cos = layer_cosines(a, b)
    atomic_write_json(out, {"layers": cos, "rms": rms(cos), "norm_a": layer_norms(a), "norm_b": layer_norms(b)})


def _run_inplace(spec: dict, out: Path, loaded) -> None:
    """Unlearning in place: apply all fundamentals, then subtract one; compare with adding only the others."""
    from .delta import load_adapter
    from .merge import apply_adapters, restore_weights, snapshot_weights

    blocks = {k: load_adapter(adapter_dir(spec["run_dir"], k)) for k in spec["all"]}
    removed = blocks[spec["removed"]]
    names = sorted({n for a in blocks.values() for n in a.layers})
    snapshot = snapshot_weights(loaded.model, names)
    try:
        apply_adapters(loaded.model, [(a, 1.0) for a in blocks.values()])
        apply_adapters(loaded.model, [(removed, 1.0)], sign=-1.0)
        after_removal = snapshot_weights(loaded.model, names)
        restore_weights(loaded.model, snapshot)
        apply_adapters(loaded.model, [(a, 1.0) for k, a in blocks.items() if k != spec["removed"]])
        direct = snapshot_weights(loaded.model, names)
    finally:
        restore_weights(loaded.model, snapshot)
    diff2 = sum(float((after_removal[n].double() - direct[n].double()).pow(2).sum()) for n in names)
    w2 = sum(float(direct[n].double().pow(2).sum()) for n in names)
    d2 = sum(float((direct[n].double() - snapshot[n].double()).pow(2).sum()) for n in names)
    atomic_write_json(out, {"rel_error_weights": (diff2 / w2) ** 0.5 if w2 else 0.0,
                            "rel_error_delta": (diff2 / d2) ** 0.5 if d2 else 0.0,
                            "max_abs_diff": max(float((after_removal[n] - direct[n]).abs().max()) for n in names)})


# What each kind of spec must hold (besides kind and run_dir); `data` must hold DATA_KEYS.
REQUIRED = {"train": ("model", "partition", "data", "train"),
            "eval": ("model", "adapters", "domain", "data", "max_length", "batch_size", "loss_on"),
            "similarity": ("a", "b"),
            "inplace": ("model", "all", "removed"),
            "data_stats": ("model", "domains", "data", "max_length")}
DATA_KEYS = ("question_field", "answer_field", "split_seed", "max_records", "sources")


def check_spec(spec, where: str) -> None:
    """A job spec must be an object with a known kind, run_dir, its kind's keys and a key matching its content."""
    fix = "write it again from the plan (experiment.plan) or rerun the experiment"
    if not isinstance(spec, dict):
        raise LorasumError(f"{where}: expected a JSON object (a job spec), got {type(spec).__name__}; {fix}")
    if spec.get("kind") not in KINDS:
        raise LorasumError(f"{where}: 'kind' must be one of {', '.join(KINDS)}, got {spec.get('kind')!r}")
    missing = [k for k in ("run_dir", *REQUIRED[spec["kind"]]) if k not in spec]
    data = spec.get("data")
    if "data" in REQUIRED[spec["kind"]] and isinstance(data, dict):
        missing += [f"data.{k}" for k in DATA_KEYS if k not in data]
    elif "data" in REQUIRED[spec["kind"]] and "data" in spec:
        missing.append("data (an object)")
    if missing:
        raise LorasumError(f"{where}: {'an' if spec['kind'][0] in 'aei' else 'a'} {spec['kind']} job spec needs {', '.join(missing)}; {fix}")
    for field in ("a", "b", "adapters"):
        terms = spec.get(field)
        if field in REQUIRED[spec["kind"]] and not (isinstance(terms, list) and all(
                isinstance(t, dict) and isinstance(t.get("train_key"), str)
                and isinstance(t.get("weight"), (int, float)) and not isinstance(t.get("weight"), bool)
                for t in terms)):
            raise LorasumError(f"{where}: '{field}' must be a list of {{\"train_key\": str, \"weight\": number}}, "
                               f"got {terms!r:.60}; {fix}")
    if isinstance(data, dict) and not isinstance(data.get("max_records", {}), dict):
        raise LorasumError(f"{where}: 'data.max_records' must be an object of split caps; {fix}")
    if "key" in spec and spec["key"] != job_key(spec):
        raise LorasumError(f"{where}: 'key' {spec['key']} does not match the spec's content ({job_key(spec)}); "
                           f"the spec was edited: {fix}")


def run_job_file(path: str) -> Path:
    """`lorasum job SPEC.json`: run one job in this (fresh) process."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise LorasumError(f"cannot read job spec {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorasumError(f"job spec {path} is not valid JSON ({e}); write the spec as one JSON object") from None
    check_spec(spec, f"job spec {path}")
    return run_job(spec)
