"""`lorasum search-weights`: Optuna TPE over the adapters' weights (optionally one weight per adapter for attention and
one for MLP modules), minimising the pooled validation perplexity exp(ΣNLL/Σtokens) of base + the merge method
applied exactly in place (delta.apply). The test split is never read.

The study lives in `OUT/study.db` (or any SQLAlchemy URL), like `lorasum tune`: a rerun adds only the missing trials,
and a rerun with other adapters, data, method or bounds is refused, as is one whose adapter or data files changed
at the same paths (their sha256s are stored on the study). Trial 0 is all weights 1 (the plain method), so
the best trial is never worse on validation than it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna

from ..delta.compose import to_factors
from ..delta.factors import Adapter
from ..delta.registry import METHODS, check_method, method_params
from ..delta.apply import applied
from ..delta.peft_format import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from ..errors import LorasumError
from ..files import atomic_write_json
from ..jsonfile import sha256_file
from ..lm.combination import GROUPS, combine, method_terms
from ..lm.data import DataConfig, load_domain, require_nonempty, require_predicted_tokens, tokenize_records
from ..lm.evaluate import per_example_nll
from .. import schema
from .search import MAX_TRIALS, finished, open_storage, open_study, storage_label
from .space import Param

LOW, HIGH = 0.0, 2.0  # the searched range of every weight
ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what an adapter's effect is read from


@dataclass(frozen=True)
class WeightSearch:
    """A checked search: the adapters (names unique), the method and its hyperparameters, trials, seed, grouping."""

    adapters: list[Adapter]
    method: str
    params: dict
    trials: int
    per_module: bool = False
    seed: int = 0

    @property
    def names(self) -> list[str]:
        """One searched parameter per adapter (and per module group with per_module): `w0`, `w0.attn`, …"""
        n = range(len(self.adapters))
        return [f"w{i}.{g}" for i in n for g in GROUPS] if self.per_module else [f"w{i}" for i in n]


def check_search(adapters: list[Adapter], method: str, params: dict | None, trials, per_module: bool = False,
                 seed: int = 0) -> WeightSearch:
    """The inputs checked before anything is written: ≥ 2 adapters, a known lorasum method, trials ≥ 1."""
    schema.check_count(trials, "trials", MAX_TRIALS)
    if len(adapters) < 2:
        raise LorasumError(f"weight search needs at least 2 adapters, got {len(adapters)}; pass A B [C ...]")
    check_method(method, METHODS)
    return WeightSearch(list(adapters), method, method_params(method, params or {}), trials, per_module, seed)


def validation_examples(loaded, domains: list[str], data: DataConfig, max_length: int, loss_on: str,
                        sources: dict | None = None) -> dict:
    """The domains' validation examples, tokenized (the test split is not touched); `sources`, when given, gets
    each data file's sha256 (path -> sha256) as read, for the study's record of its inputs."""
    doms = [load_domain(d, data) for d in domains]
    require_nonempty(doms, "validation")
    if sources is not None:
        sources.update({d.source: d.source_sha256 for d in doms})
    examples = {d.spec: tokenize_records(loaded.tokenizer, d.records["validation"], max_length) for d in doms}
    require_predicted_tokens(examples, "validation", max_length, loss_on)
    return examples


def input_files(adapters: list[Adapter], sources: dict) -> dict[str, str | None]:
    """{path: sha256} of every file a study's trials depend on: each adapter's weights and config, each data file.
    A study keyed on these is refused (or restarted) when one changes at the same path."""
    files = {str(Path(a.path) / n): sha256_file(Path(a.path) / n) for a in adapters for n in ADAPTER_FILES
             if (Path(a.path) / n).is_file()}
    return {**files, **sources}


def pooled_ppl(loaded, terms: list, examples: dict, batch_size: int, loss_on: str) -> float:
    """exp(ΣNLL / Σtokens) over every example, with `terms` applied in place (restored afterwards)."""
    with applied(loaded.model, terms), loaded.autocast():
        rows = per_example_nll(loaded.model, examples, loaded.tokenizer.pad_token_id, batch_size, loss_on,
                               desc="weights")
    loss = sum(r.nll for r in rows) / sum(r.tokens for r in rows)
    return math.exp(loss) if math.isfinite(loss) else math.inf


def search_weights(loaded, search: WeightSearch, examples: dict, out: str | Path, storage: str | None = None,
                   setup: dict | None = None, batch_size: int = 16, loss_on: str = "all") -> dict:
    """Run (or continue) the study until it holds `search.trials` finished trials; return the best trial as
    {weights, method, params, value, trial, trials}. `setup` (model, data, adapters) is stored on the study, so a
    rerun with another is refused."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{out / 'study.db'}"
    space = {n: Param(n, LOW, HIGH) for n in search.names}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = open_study(open_storage(url), "weights", storage_label(url), space,
                           {**(setup or {}), "method": search.method, "params": search.params,
                            "per_module": search.per_module}, search.seed, search.trials)
    except BaseException:
        if made and not any(out.iterdir()):  # a refused storage leaves no empty --out behind
            out.rmdir()
        raise
    if not study.trials:
        study.enqueue_trial({n: 1.0 for n in search.names})  # the plain method: the baseline to beat

    def objective(trial) -> float:
        w = {n: trial.suggest_float(n, LOW, HIGH) for n in search.names}
        weights = [w[f"w{i}"] for i in range(len(search.adapters))] if not search.per_module else w
        return pooled_ppl(loaded, method_terms(search.adapters, weights, search.method, search.params), examples,
                          batch_size, loss_on)

    missing = search.trials - finished(study)
    if missing > 0:
        study.optimize(objective, n_trials=missing, gc_after_trial=False)
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, t.number))
    return {"weights": {n: best.params[n] for n in search.names}, "method": search.method, "params": search.params,
            "per_module": search.per_module, "value": best.value, "trial": best.number,
            "trials": finished(study)}


def weight_list(best: dict, n: int) -> list[float] | dict[str, float]:
    """best.json's weights as `lm.combination.combine` takes them: a list per adapter, or the per-group mapping."""
    w = best["weights"]
    return w if best.get("per_module") else [w[f"w{i}"] for i in range(n)]


def write_search(search: WeightSearch, best: dict, out: str | Path) -> dict:
    """OUT/best.json and OUT/adapter: the best weights composed like `lorasum compose` (dense results refactored
    to the sum of the input ranks), with lorasum.json recording the composition and the search."""
    out = Path(out)
    weights = weight_list(best, len(search.adapters))
    total, errors = to_factors(combine(search.adapters, weights, search.method, search.params))
    record = {"composition": {
        "adapters": [{"name": a.name, "path": a.path, "weight": weights[i] if isinstance(weights, list) else
                      {g: weights[f"w{i}.{g}"] for g in GROUPS}} for i, a in enumerate(search.adapters)],
        "method": search.method, "params": search.params, "max_rank": None,
        "rank": max(f.rank for f in total.layers.values()), "relative_error": errors["overall"],
        "layer_errors": errors["layers"]}, "search": {**best, "chosen_on": "validation"}}
    save_adapter(total, out / "adapter", extra_meta=record, overwrite=True)  # derived from the study: rewritten
    atomic_write_json(out / "best.json", {**best, "adapters": record["composition"]["adapters"]})
    return record


def run_search(loaded, search: WeightSearch, domains: list[str], data: DataConfig, out: str | Path,
               max_length: int = 64, batch_size: int = 16, loss_on: str = "all", storage: str | None = None) -> dict:
    """The whole command: validation examples, the study (resumed), best.json and the composed adapter."""
    sources: dict = {}
    examples = validation_examples(loaded, domains, data, max_length, loss_on, sources)
    setup = {"model": loaded.model_id, "adapters": [str(a.path) for a in search.adapters],
             "domains": list(examples), "max_records": data.max_records.get("validation"),
             "split_seed": data.split_seed, "max_length": max_length, "loss_on": loss_on,
             "inputs": input_files(search.adapters, sources)}
    best = search_weights(loaded, search, examples, out, storage, setup, batch_size, loss_on)
    write_search(search, best, out)
    return best
