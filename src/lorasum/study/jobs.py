"""Units of work as JSON job specs with content-derived keys; `lorasum job SPEC.json` runs one anywhere.

A spec declares everything its result depends on (model, data fingerprints, hyperparameters, the keys of the
adapters it reads), and its key is a hash of exactly that: changing an eval cap changes eval keys only, so nothing
is retrained. Paths (`run_dir`) are not part of the key. Artifacts land under the run folder by key:
`adapters/<key>/` (stock PEFT + lorasum.json), `evals/<key>.json`, `sims/<key>.json`, `checks/<key>.json`, each
written atomically. Each kind is one entry of JOB_KINDS: its folder, the keys its spec needs, and its runner.
The spec's fields, its key and its trust model: `jobspec`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import schema
from ..delta.apply import apply_adapters, applied, snapshot_weights
from ..delta.compose import weighted_sum
from ..delta.peft_format import WEIGHTS_FILE, load_adapter
from ..delta.similarity import layer_cosines, layer_norms, rms
from ..delta.subspace import factor_similarity, factor_summary, null_rms
from ..errors import LorasumError
from ..files import atomic_write_json
from ..jsonfile import read_json
from ..lm.choices import SPLITS
from ..lm.data import DataConfig, load_domain, parse_spec, partition_domains, require_nonempty, \
    require_predicted_tokens, tokenize_records
from ..lm.combination import method_terms
from ..lm.routing import serving
from ..delta.registry import is_route
from ..lm.datastats import domain_stats
from ..lm.prompt_routing import prompt_features, squared_distances
from ..lm.evaluate import per_example_nll
from ..lm.models import LoadedModel, load_model
from ..lm.interference import question_prompts
from ..lm.pair_predictors import all_predictors
from ..lm.throughput import serving_throughput
from ..lm.train import TrainConfig, train_adapter
from .artifacts import readable
from .jobspec import AdapterTerm, DataSpec, JobSpec, adapter_dir, job_key
from ..tune.search import InputsChanged
from ..tune.weights import check_search, input_files, search_weights, validation_examples, \
    weight_list

NULL_SAMPLES = 200  # pairs of random deltas behind each random-null RMS


def _data(spec: dict) -> DataConfig:
    return schema.parse(DataSpec, spec["data"], "job spec", "data.", strict=True).config(spec.get("data_dir"))


def _terms(spec: dict, field: str) -> list[tuple]:
    """The spec's adapter terms, loaded: [(Adapter, weight)]."""
    return [(load_adapter(adapter_dir(spec["run_dir"], t["train_key"])), float(t["weight"])) for t in spec[field]]


def _check_sources(spec: dict, domains) -> None:
    """The data files must still be the ones the key was derived from."""
    for dom in domains:
        want = spec["data"]["sources"].get(parse_spec(dom.spec)[0])
        if want and dom.source_sha256 and want != dom.source_sha256:
            raise LorasumError(f"{dom.source} changed since the job was planned (sha256 differs); rerun the "
                               "experiment to re-plan")


# --- the runners: (spec, artifact path, loaded model or None) -----------------------------------------------------
def _run_train(spec: dict, out: Path, loaded: LoadedModel) -> None:
    """An adapter; a repair (`start`) continues the exact sum of its start adapters for `fraction` of the steps a
    full run of the recipe takes on the partition (at least one)."""
    data = _data(spec)
    domains = [load_domain(d, data) for d in partition_domains(spec["partition"])]
    _check_sources(spec, domains)
    cfg = TrainConfig.from_dict(spec["train"])
    start, steps = None, None
    if spec.get("start"):
        start = weighted_sum(_terms(spec, "start"), "sum")
        full = math.ceil(sum(len(d.records["train"]) for d in domains) / cfg.batch_size) * cfg.epochs
        steps = max(1, round(spec["fraction"] * full))
    train_adapter(loaded, spec["partition"], out, cfg, data, overwrite=True, sample=spec.get("sample", ""),
                  start=start, max_steps=steps)


def _run_eval(spec: dict, out: Path, loaded: LoadedModel) -> None:
    data = _data(spec)
    split = spec.get("split", "test")  # absent in test-split specs, so their keys predate the field
    dom = load_domain(spec["domain"], data)
    _check_sources(spec, [dom])
    require_nonempty([dom], split)
    examples = tokenize_records(loaded.tokenizer, dom.records[split], spec["max_length"])
    # a split with nothing to predict would give a NaN perplexity: refuse it, naming domain, split and the fix
    require_predicted_tokens({dom.spec: examples}, split, spec["max_length"], spec["loss_on"])
    route = spec.get("method") if is_route(spec.get("method") or "sum") else None
    terms = _terms(spec, "adapters") if route else _method_terms(spec)
    t0 = time.perf_counter()
    general = [a for a, _ in _terms(spec, "general")] if spec.get("general") else []
    with serving(loaded, terms, route, spec.get("params"), general) as model, loaded.autocast():
        apply_s = time.perf_counter() - t0  # compose + apply (or build the router): what replaces training a block
        rows = per_example_nll(model, {dom.spec: examples}, loaded.tokenizer.pad_token_id,
                               spec["batch_size"], spec["loss_on"], desc=f"eval {dom.spec}")
    atomic_write_json(out, {"domain": dom.spec, "nll": [r.nll for r in rows], "tokens": [r.tokens for r in rows]})
    return {"apply_s": round(apply_s, 4)}


_MERGED: dict = {}  # the last method terms: consecutive evals of one model on several domains check them once


def _method_terms(spec: dict) -> list[tuple]:
    """What an eval applies: the weighted terms (exact sum), or the method's merge at the terms' weights or at the
    best weights of the weight search named by `weights_from`."""
    terms = _terms(spec, "adapters")
    if spec.get("method") is None and spec.get("weights_from") is None:
        return terms
    weights = [w for _, w in terms]
    if spec.get("weights_from"):
        weights = weight_list(read_json(Path(spec["run_dir"]) / "searches" / f"{spec['weights_from']}.json",
                                        "weight search result", "rerun the experiment"), len(terms))
    method, params = spec.get("method") or "sum", spec.get("params") or {}
    key = json.dumps([[t["train_key"] for t in spec["adapters"]], weights, method, params], sort_keys=True)
    if key not in _MERGED:
        _MERGED.clear()
        _MERGED[key] = method_terms([a for a, _ in terms], weights, method, params)
    return _MERGED[key]


def _search_inputs(spec: dict, adapters: list, sources: dict) -> dict:
    """The study's input files by their names inside the run and data folders (as the key names them, not by
    path), so a run moved elsewhere or a job run on another machine keeps its study."""
    inputs = {f"data/{Path(f).name}": sha for f, sha in sources.items()}
    for term, adapter in zip(spec["adapters"], adapters):
        for f, sha in input_files([adapter], {}).items():
            inputs[f"adapters/{term['train_key']}/{Path(f).name}"] = sha
    return inputs


def _run_weight_search(spec: dict, out: Path, loaded: LoadedModel) -> None:
    """tune.weights on the subset's pooled validation split; the study lives beside the artifact (resumable). Its
    trials are keyed on the adapter and data files' sha256s: a study made from other contents (an adapter retrained
    at the same key) is removed, with one line on stderr, and the search starts again."""
    data = _data(spec)
    _check_sources(spec, [load_domain(d, data) for d in spec["domains"]])
    adapters = [a for a, _ in _terms(spec, "adapters")]
    search = check_search(adapters, spec["method"], spec.get("params"), spec["trials"])
    sources: dict = {}
    examples = validation_examples(loaded, spec["domains"], data, spec["max_length"], spec["loss_on"], sources)
    study_dir, setup = out.with_suffix(".study"), {"inputs": _search_inputs(spec, adapters, sources)}
    try:
        best = search_weights(loaded, search, examples, study_dir, setup=setup, batch_size=spec["batch_size"],
                              loss_on=spec["loss_on"])
    except InputsChanged as e:
        print(f"lorasum: note: {e}; this job's study is removed and its search starts again", file=sys.stderr)
        shutil.rmtree(study_dir)
        best = search_weights(loaded, search, examples, study_dir, setup=setup, batch_size=spec["batch_size"],
                              loss_on=spec["loss_on"])
    atomic_write_json(out, best)


def _run_similarity(spec: dict, out: Path, loaded: LoadedModel | None) -> None:
    """cos per layer between two (weighted sums of) adapters, the RMS, and the per-layer norms of both sides; for
    two single adapters also their A row-space and B column-space similarity and the random-null RMS."""
    ta, tb = _terms(spec, "a"), _terms(spec, "b")
    a, b = weighted_sum(ta), weighted_sum(tb)
    cos = layer_cosines(a, b)
    result = {"layers": cos, "rms": rms(cos), "norm_a": layer_norms(a), "norm_b": layer_norms(b)}
    if len(ta) == 1 and len(tb) == 1:
        per_layer = factor_similarity(ta[0][0], tb[0][0])
        summary = factor_summary(per_layer)
        result["factors"] = {"A": {n: v["A"] for n, v in per_layer.items()},
                             "B": {n: v["B"] for n, v in per_layer.items()},
                             "mean_A": summary["A"], "mean_B": summary["B"]}
        result["null"] = null_rms(ta[0][0], tb[0][0], samples=NULL_SAMPLES, seed=0)
    atomic_write_json(out, result)


def _run_inplace(spec: dict, out: Path, loaded: LoadedModel) -> None:
    """Unlearning in place: apply all fundamentals, then subtract one; compare with adding only the others."""
    blocks = {k: load_adapter(adapter_dir(spec["run_dir"], k)) for k in spec["all"]}
    removed = blocks[spec["removed"]]
    names = sorted({n for a in blocks.values() for n in a.layers})
    model = loaded.model
    base = snapshot_weights(model, names)
    with applied(model, [(a, 1.0) for a in blocks.values()]):
        apply_adapters(model, [(removed, 1.0)], sign=-1.0)
        after_removal = snapshot_weights(model, names)
    with applied(model, [(a, 1.0) for k, a in blocks.items() if k != spec["removed"]]):
        direct = snapshot_weights(model, names)
    diff2 = sum(float((after_removal[n].double() - direct[n].double()).pow(2).sum()) for n in names)
    w2 = sum(float(direct[n].double().pow(2).sum()) for n in names)
    d2 = sum(float((direct[n].double() - base[n].double()).pow(2).sum()) for n in names)
    atomic_write_json(out, {"rel_error_weights": (diff2 / w2) ** 0.5 if w2 else 0.0,
                            "rel_error_delta": (diff2 / d2) ** 0.5 if d2 else 0.0,
                            "max_abs_diff": max(float((after_removal[n] - direct[n]).abs().max()) for n in names)})


def _run_data_stats(spec: dict, out: Path, loaded: LoadedModel) -> None:
    data = _data(spec)
    doms = [load_domain(d, data) for d in spec["domains"]]
    _check_sources(spec, doms)
    atomic_write_json(out, {"rows": [row for d in doms for row in domain_stats(d, loaded.tokenizer,
                                                                               spec["max_length"])]})


def _run_prompt_route(spec: dict, out: Path, loaded: LoadedModel) -> None:
    """The prompt router's inputs (lm.prompt_routing): each domain's centroid of its training questions' features, and
    every validation and test example's squared distance to each centroid."""
    data = _data(spec)
    doms = [load_domain(d, data) for d in spec["domains"]]
    _check_sources(spec, doms)
    feats = {d.spec: {s: prompt_features(loaded, tokenize_records(loaded.tokenizer, d.records[s], spec["max_length"]),
                                         spec["batch_size"]) for s in SPLITS} for d in doms}
    centroids = np.stack([feats[d.spec]["train"].mean(0) for d in doms])  # (k, hidden)
    own = [squared_distances(feats[d.spec]["train"], centroids[i:i + 1])[:, 0] for i, d in enumerate(doms)]
    atomic_write_json(out, {"domains": [d.spec for d in doms], "scale": float(np.mean(np.concatenate(own))),
                            "distances": {s: {d.spec: squared_distances(feats[d.spec][s], centroids).tolist()
                                              for d in doms} for s in ("validation", "test")}})


def _run_throughput(spec: dict, out: Path, loaded: LoadedModel) -> dict:
    """Tokens per second of each serving variant (lm.throughput) on the subset's pooled test split; the figures are
    wall times, so they go to timings.json (the artifact keeps a copy and marks the job done)."""
    data = _data(spec)
    doms = [load_domain(d, data) for d in spec["domains"]]
    _check_sources(spec, doms)
    tok = loaded.tokenizer
    examples = {d.spec: tokenize_records(tok, d.records["test"], spec["max_length"]) for d in doms}
    centroids = None
    if any(v.startswith("prompt") for v in spec["variants"]):
        t0 = time.perf_counter()
        centroids = np.stack([prompt_features(loaded, tokenize_records(tok, d.records["train"], spec["max_length"]),
                                              spec["batch_size"]).mean(0) for d in doms])  # (k, hidden)
        centroid_s = time.perf_counter() - t0
    result = serving_throughput(loaded, _terms(spec, "adapters"), examples, centroids,
                                spec["params"] if "arrow" in spec["variants"] else None, spec["rounds"],
                                spec["batch_size"], spec["loss_on"])
    if centroids is not None:
        result["centroids_s"] = round(centroid_s, 4)
    atomic_write_json(out, result)
    return {"throughput": result}


def _run_predictors(spec: dict, out: Path, loaded: LoadedModel) -> dict:
    """The pair's predictors (lm.pair_predictors) from its two adapters and each domain's first `inputs` training
    questions; the artifact keeps the values and forward-pass tokens, timings.json the wall seconds."""
    data = _data(spec)
    doms = [load_domain(d, data) for d in spec["domains"]]
    _check_sources(spec, doms)
    prompts = [question_prompts([r.question for r in d.records["train"][:spec["inputs"]]]) for d in doms]
    (a, _), (b, _) = _terms(spec, "a")[0], _terms(spec, "b")[0]
    found = all_predictors(loaded, a, b, prompts[0], prompts[1], spec["max_length"], spec["batch_size"])
    atomic_write_json(out, {"values": found["values"], "forward_tokens": found["forward_tokens"]})
    return {"predictor_s": {k: round(v, 4) for k, v in found["seconds"].items()}}


def _train_work(spec: dict) -> float:
    """Training costs ~3 forward passes per token, plus a validation pass per epoch."""
    k, caps, epochs = len(partition_domains(spec["partition"])), spec["data"]["max_records"], spec["train"]["epochs"]
    share = spec.get("fraction") or 1.0  # a repair takes that share of the steps
    return 3.0 * k * (caps.get("train") or 500) * epochs * share + k * (caps.get("validation") or 60) * epochs


def _eval_work(spec: dict) -> float:
    caps = spec["data"]["max_records"]
    return float(caps.get(spec.get("split", "test")) or 60)


@dataclass(frozen=True)
class JobKind:
    """One kind of job: where its artifact lives, what its spec must hold, and how it runs."""

    name: str
    folder: str  # under the run folder
    required: tuple[str, ...]  # spec keys besides kind and run_dir
    run: Callable[[dict, Path, LoadedModel | None], dict | None]  # may return timings (kept out of results)
    needs_model: bool = True  # runs on a loaded base model (else on adapter files alone)
    folder_artifact: bool = False  # the artifact is a folder (an adapter), not a JSON file
    terms: tuple[str, ...] = ()  # keys holding lists of AdapterTerm
    work: Callable[[dict], float] = lambda spec: 0.5  # rough units of work, for the ETA


JOB_KINDS: dict[str, JobKind] = {k.name: k for k in (
    JobKind("train", "adapters", ("model", "partition", "data", "train"), _run_train, folder_artifact=True,
            terms=("start",), work=_train_work),
    JobKind("eval", "evals", ("model", "adapters", "domain", "data", "max_length", "batch_size", "loss_on"), _run_eval,
            terms=("adapters", "general"), work=_eval_work),
    JobKind("similarity", "sims", ("a", "b"), _run_similarity, needs_model=False, terms=("a", "b")),
    JobKind("inplace", "checks", ("model", "all", "removed"), _run_inplace),
    JobKind("data_stats", "checks", ("model", "domains", "data", "max_length"), _run_data_stats),
    JobKind("prompt_route", "checks", ("model", "domains", "data", "max_length", "batch_size"), _run_prompt_route,
            work=lambda spec: 3.0 * len(spec["domains"]) * (spec["data"]["max_records"].get("train") or 500)),
    JobKind("weight_search", "searches", ("model", "adapters", "domains", "data", "max_length", "batch_size", "loss_on",
                                          "trials", "method"), _run_weight_search, terms=("adapters",),
            work=lambda spec: 2.0 * spec["trials"] * len(spec["domains"])),
    JobKind("predictors", "sims", ("model", "a", "b", "domains", "data", "max_length", "batch_size", "inputs"),
            _run_predictors, terms=("a", "b"), work=lambda spec: 0.1 * spec["inputs"]),
    JobKind("throughput", "checks", ("model", "adapters", "domains", "data", "max_length", "batch_size", "loss_on",
                                     "params", "variants", "rounds"), _run_throughput, terms=("adapters",),
            work=lambda spec: spec["rounds"] * len(spec["variants"]) * len(spec["domains"])
            * (spec["data"]["max_records"].get("test") or 60) / 2),
)}


def artifact_path(spec: dict) -> Path:
    kind = JOB_KINDS[spec["kind"]]
    key = spec.get("key") or job_key(spec)
    return Path(spec["run_dir"]) / kind.folder / (key if kind.folder_artifact else f"{key}.json")


def is_done(spec: dict) -> bool:
    """The job's artifact exists and can be read; a damaged one (a truncated or invalid JSON file, a truncated
    safetensors file) is removed, with one line on stderr, so that the job runs again instead of breaking every
    later resume."""
    p = artifact_path(spec)
    if JOB_KINDS[spec["kind"]].folder_artifact:
        if not (p / WEIGHTS_FILE).is_file():
            return False
        return readable(p, [p / "adapter_config.json", p / "lorasum.json"], p / WEIGHTS_FILE)
    return p.is_file() and readable(p, [p])


def run_job(spec: dict, loaded: LoadedModel | None = None, timings: dict | None = None) -> Path:
    """Run one job and return its artifact path; `loaded` reuses an in-process model (else it is loaded). Timings
    the job measures itself (e.g. compose + apply) are added to `timings`."""
    kind = JOB_KINDS.get(spec["kind"]) if isinstance(spec.get("kind"), str) else None
    if kind is None:
        raise LorasumError(f"job spec: 'kind' must be one of {', '.join(JOB_KINDS)}, got {spec.get('kind')!r}")
    out = artifact_path(spec)
    if is_done(spec):
        return out
    if kind.needs_model and loaded is None:
        loaded = load_model(spec["model"], spec.get("device"), spec.get("dtype"), spec.get("autocast"))
    measured = kind.run(spec, out, loaded)
    if timings is not None and measured:
        timings.update(measured)
    return out


def check_spec(spec, where: str) -> None:
    """A job spec must be an object with a known kind, run_dir, its kind's keys and a key matching its content."""
    fix = "write it again from the plan (experiment.plan) or rerun the experiment"
    if not isinstance(spec, dict):
        raise LorasumError(f"{where}: expected a JSON object (a job spec), got {type(spec).__name__}; {fix}")
    kind = JOB_KINDS.get(spec["kind"]) if isinstance(spec.get("kind"), str) else None
    if kind is None:
        raise LorasumError(f"{where}: 'kind' must be one of {', '.join(JOB_KINDS)}, got {spec.get('kind')!r}")
    missing = [k for k in ("run_dir", *kind.required) if k not in spec]
    if "data" in kind.required and isinstance(spec.get("data"), dict):
        missing += [f"data.{k}" for k in schema.field_types(DataSpec) if k not in spec["data"] and k != "skip"]
    if missing:
        raise LorasumError(f"{where}: {'an' if kind.name[0] in 'aei' else 'a'} {kind.name} job spec needs "
                           f"{', '.join(missing)}; {fix}")
    try:
        for key in (k for k in kind.terms if k in spec):
            schema.convert(list[AdapterTerm], spec[key], None, f"{key}.", strict=True)
        nulls = [k for k in kind.required if spec[k] is None]
        if nulls:
            raise LorasumError(f"'{nulls[0]}' must not be null")
        schema.parse(JobSpec, spec, None, strict=True)
    except schema.Mismatch:
        raise LorasumError(f"{where}: '{key}' must be a list of {{\"train_key\": str, \"weight\": number}}, "
                           f"got {spec[key]!r:.60}; {fix}") from None
    except LorasumError as e:
        raise LorasumError(f"{where}: {e}; {fix}") from None
    if "key" in spec and spec["key"] != job_key(spec):
        raise LorasumError(f"{where}: 'key' {spec['key']} does not match the spec's content ({job_key(spec)}); "
                           f"the spec was edited: {fix}")


def run_job_file(path: str) -> Path:
    """`lorasum job SPEC.json`: run one job in this (fresh) process."""
    spec = read_json(path, "job spec", "write the spec as one JSON object", kind=None)
    check_spec(spec, f"job spec {path}")
    return run_job(spec)
