"""Train one LoRA adapter on a partition with the paper's recipe (r=4, alpha=64, max length 64) via PEFT.

The result is a stock PEFT adapter folder (adapter_config.json + adapter_model.safetensors) plus `lorasum.json`
with the config, data fingerprints, seed, per-epoch losses, throughput and provenance.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .data import DataConfig, Example, collate, load_domain, partition_domains, partition_records, \
    require_nonempty, require_predicted_tokens, tokenize_records
from .errors import LorasumError
from .evaluate import Perplexity, per_example_nll
from .files import atomic_dir, atomic_write_json, check_out_path, pause_for_test
from .models import LoadedModel, check_targets, targets_for, weights_fingerprint
from .progress import progress
from .provenance import provenance


@dataclass
class TrainConfig:
    """Hyperparameters of one adapter. r, alpha, targets and max_length are fixed across partitions (paper §3)."""

    r: int = 4  # LoRA rank (paper: 4)
    alpha: float = 64.0  # LoRA alpha; the delta is scaled by alpha/r (paper: 64)
    dropout: float = 0.05  # LoRA dropout (tuned in the paper)
    targets: list[str] | None = None  # module names; None = the architecture's preset
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    max_length: int = 64  # tokens per record after formatting (paper: 64)
    batch_size: int = 8  # records per optimizer step (tuned in the paper)
    epochs: int = 1  # passes over the training split (tuned in the paper); the best epoch by validation is kept
    lr: float = 1e-3  # AdamW peak learning rate, decayed linearly to 0
    warmup_ratio: float = 0.0  # share of steps with linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    loss_on: str = "all"  # "all" tokens of the formatted record (paper) or "answer" tokens only
    seed: int = 0  # initialisation, dropout and batch order; never moves records between splits
    eval_batch_size: int = 16  # records per validation batch

    def validate(self) -> None:
        self.check_types()
        if self.max_length < 8:
            raise LorasumError(f"--max-length {self.max_length} is too short; use at least 8 tokens")
        for name in ("r", "batch_size", "epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise LorasumError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise LorasumError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.loss_on not in ("all", "answer"):
            raise LorasumError(f"--loss-on must be 'all' or 'answer', got '{self.loss_on}'")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LorasumError(f"--lr must be a positive number, got {self.lr}")

    def check_types(self) -> None:
        """Each field holds its annotated type (e.g. from a --params JSON file); the error names field and type."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                ok, want = isinstance(v, int) and not isinstance(v, bool), "a whole number"
            elif f.type == "float":
                ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
            elif f.type == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif f.type == "str":
                ok, want = isinstance(v, str), "a string"
            else:  # targets: list[str] | None
                ok = v is None or (isinstance(v, list) and all(isinstance(t, str) and t for t in v))
                want = "a list of module names or null"
            if not ok:
                raise LorasumError(f"training parameter '{f.name}' must be {want}, got {json.dumps(v, default=repr)} "
                                   f"({type(v).__name__})")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LorasumError(f"unknown training parameter(s): {', '.join(sorted(unknown))}; known: "
                               f"{', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class TrainResult:
    out: Path
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lora_config(cfg: TrainConfig, loaded: LoadedModel):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        target_modules=targets_for(loaded.model_type, cfg.targets), bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=loaded.model_type == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
    )


def _check_out(out: Path, overwrite: bool) -> None:
    """Before training: --out must be a nameable folder that is absent, empty, or (with --overwrite) replaceable."""
    check_out_path(out, "--out")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "adapter_config.json").exists():
        raise LorasumError(f"{out} already holds a finished adapter; pass --overwrite or choose another --out")
    raise LorasumError(f"--out {out} exists and is not empty (and holds no adapter); choose a new folder, or pass "
                       "--overwrite to replace the whole folder")


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def train_adapter(loaded: LoadedModel, partition: str, out: str | Path, cfg: TrainConfig | None = None,
                  data: DataConfig | None = None, overwrite: bool = False,
                  on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on `partition` (e.g. "math" or "math+medicine") and save it to `out`.

    The base model is left as it was (LoRA layers are unloaded afterwards), so one loaded model serves many runs.
    `on_epoch(epoch, val_loss)` is called after each epoch's validation; an exception it raises (e.g. a tuning
    trial pruned) aborts training and nothing is saved.
    """
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    cfg, data = cfg or TrainConfig(), data or DataConfig()
    cfg.validate()
    out = Path(out)
    _check_out(out, overwrite)
    domains = [load_domain(d, data) for d in partition_domains(partition)]
    require_nonempty(domains, "train")
    require_nonempty(domains, "validation")
    tok = loaded.tokenizer
    train_rec = partition_records(domains, "train", seed=data.split_seed)
    val_rec = partition_records(domains, "validation", shuffle=False)
    train_ex, val_ex = (tokenize_records(tok, recs, cfg.max_length) for recs in (train_rec, val_rec))
    for split, recs, exs in (("train", train_rec, train_ex), ("validation", val_rec, val_ex)):  # no NaN losses
        by_domain = {d.spec: [e for e, r in zip(exs, recs) if r.domain == d.spec] for d in domains}
        require_predicted_tokens(by_domain, split, cfg.max_length, cfg.loss_on)
    # the base identity is the fp32 weights' hash; a half-precision model cannot reproduce it, so none is recorded
    fp32 = next(loaded.model.parameters()).dtype == torch.float32
    base_sha = weights_fingerprint(loaded.model) if fp32 else None
    grad_flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}

    lcfg = lora_config(cfg, loaded)
    check_targets(loaded.model, list(lcfg.target_modules))
    set_seed(cfg.seed)
    try:
        peft_model = get_peft_model(loaded.model, lcfg)
    except ValueError as e:  # e.g. a target that is a container module, not a layer PEFT can adapt
        raise LorasumError(f"cannot add LoRA layers for --targets {' '.join(sorted(lcfg.target_modules))}: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    try:
        result = _fit(peft_model, train_ex, val_ex, tok.pad_token_id, cfg, get_linear_schedule_with_warmup,
                      loaded.autocast, on_epoch)
        peft_model.peft_config["default"].base_model_name_or_path = loaded.model_id
        meta = {
            "lorasum_version": provenance()["lorasum"], "partition": partition, "domains": [d.spec for d in domains],
            "base_model": {"id": loaded.model_id, "model_type": loaded.model_type, "weights_sha256": base_sha},
            "train": asdict(cfg), "data": {**asdict(data), "domains": [d.fingerprint() for d in domains]},
            "seed": cfg.seed, "epochs": result.epochs, "best_epoch": result.best_epoch,
            "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s, "provenance": provenance(),
        }
        with atomic_dir(out, overwrite=overwrite) as tmp:
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
            _sort_target_modules(tmp / "adapter_config.json")
            atomic_write_json(tmp / "lorasum.json", meta)
    finally:
        peft_model.unload()  # removes LoRA layers, restoring the base modules in place
        for n, p in loaded.model.named_parameters():  # PEFT froze the base: give back its requires_grad flags
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
    result.out = out
    return result


def _sort_target_modules(config_file: Path) -> None:
    """PEFT stores target_modules as a set, so its order in adapter_config.json follows the process's string hash
    seed; sorted, the file is the same bytes in every process (`lorasum job` reproduces it)."""
    import json

    text = config_file.read_text(encoding="utf-8")
    cfg = json.loads(text)
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train_epoch(model, batches, opt, sched, max_grad_norm: float, bar=None, epoch: int = 1,
                autocast=contextlib.nullcontext) -> dict:
    """One pass of AdamW steps over collated batches; returns summed loss, steps and tokens seen.

    `autocast` wraps the forward pass only (backward, clipping and the optimizer step run in fp32).
    """
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, steps, tokens = 0.0, 0, 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        pause_for_test("train")  # test-only hook (LORASUM_TEST_PAUSE=train): no-op unless set
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        loss_sum, steps = loss_sum + loss.item(), steps + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / steps:.3f}")
    return {"loss_sum": loss_sum, "steps": steps, "tokens": tokens}


def _fit(model, train_ex: list[Example], val_ex: list[Example], pad_id: int, cfg: TrainConfig,
         schedule_fn, autocast=contextlib.nullcontext,
         on_epoch: Callable[[int, float], None] | None = None) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = schedule_fn(opt, int(cfg.warmup_ratio * total), total)
    rng = random.Random(cfg.seed)
    result = TrainResult(out=Path())
    best_loss, best_state = float("inf"), None
    tokens, train_s, wall0 = 0, 0.0, time.perf_counter()
    bar = progress(total=total, desc="train", unit="step")
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        batches = (collate(b, pad_id, cfg.loss_on) for b in _batches(train_ex, cfg.batch_size, rng))
        stats = train_epoch(model, batches, opt, sched, cfg.max_grad_norm, bar, epoch, autocast)
        train_s += time.perf_counter() - t_epoch  # validation time is excluded from throughput
        tokens += stats["tokens"]
        running, seen = stats["loss_sum"], stats["steps"]
        with autocast():
            rows = per_example_nll(model, {"validation": val_ex}, pad_id, cfg.eval_batch_size, cfg.loss_on,
                                   desc="val")
        val = Perplexity(sum(r.nll for r in rows), sum(r.tokens for r in rows))
        result.epochs.append({"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val.loss,
                              "val_perplexity": val.perplexity})
        bar.set_postfix(epoch=epoch, val_loss=f"{val.loss:.3f}")
        if val.loss < best_loss:
            best_loss, result.best_epoch = val.loss, epoch
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if on_epoch is not None:
            try:
                on_epoch(epoch, val.loss)
            except BaseException:
                bar.close()
                raise
    bar.close()
    result.wall_s = time.perf_counter() - wall0
    result.tokens_per_s = tokens / train_s if train_s > 0 else 0.0
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    model.eval()
    return result


def read_params(params_file: str | None) -> dict:
    """`--params FILE`: a JSON object of training parameters, or {"params": {...}} (a tuning best.json)."""
    params: dict = {}
    if params_file:
        try:
            with open(params_file, encoding="utf-8") as f:
                params = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LorasumError(f"cannot read --params {params_file}: {e}") from None
        params = params.get("params", params) if isinstance(params, dict) else params
        if not isinstance(params, dict):
            raise LorasumError(f"--params {params_file} must hold a JSON object of training parameters")
    return params


def train_command(loaded: LoadedModel, partition: str, out: str, overrides: dict, params_file: str | None,
                  data: DataConfig, overwrite: bool) -> TrainResult:
    """`lorasum train`: defaults < `--params FILE` (e.g. a tuning best.json) < explicit flags."""
    cfg = TrainConfig.from_dict({**read_params(params_file), **overrides})
    try:
        cfg.check_types()  # flags are typed by argparse: a wrong type comes from the file
    except LorasumError as e:
        raise LorasumError(f"{e}; fix --params {params_file}") from None
    return train_adapter(loaded, partition, out, cfg, data, overwrite)


def demo(loaded: LoadedModel, domain: str, out: str, data_dir: str | None, train_records: int = 200,
         test_records: int = 200) -> dict:
    """The main job until the experiment grid exists: train on a slice of one domain, compare perplexities."""
    from .evaluate import evaluate

    data = DataConfig(data_dir=data_dir, max_records={"train": train_records, "validation": 50,
                                                      "test": test_records})
    print(f"[1/3] perplexity of {loaded.model_id} on {domain} (test, {test_records} records)")
    base = evaluate(loaded, [domain], [], data)["results"][domain]
    print(f"[2/3] training a LoRA adapter (r=4, alpha=64) on {train_records} {domain} records -> {out}")
    res = train_adapter(loaded, domain, out, TrainConfig(), data, overwrite=True)
    print(f"[3/3] perplexity with the adapter")
    tuned = evaluate(loaded, [domain], [out], data)["results"][domain]
    ratio = tuned["perplexity"] / base["perplexity"]
    print(f"\nbase    {loaded.model_id:<14} {domain}: perplexity {base['perplexity']:.3f} ({base['tokens']} tokens)")
    print(f"adapter {Path(out).name:<14} {domain}: perplexity {tuned['perplexity']:.3f} ({ratio:.2f}x base; "
          f"trained {res.wall_s:.0f} s at {res.tokens_per_s:.0f} tokens/s)")
    return {"base": base, "adapter": tuned, "train": {"wall_s": res.wall_s, "tokens_per_s": res.tokens_per_s}}
