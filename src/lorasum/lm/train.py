"""Train one LoRA adapter on a partition with the paper's recipe (r=4, alpha=64, max length 64) via PEFT.

The result is a stock PEFT adapter folder (adapter_config.json + adapter_model.safetensors) plus `lorasum.json`
with the config, data fingerprints, seed, per-epoch losses, throughput and provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from .. import schema
from ..delta.factors import Adapter, lora_scale
from ..errors import DivergedError, LorasumError
from ..files import atomic_dir, atomic_write_json, pause_for_test
from ..jsonfile import read_json
from ..progress import progress
from ..provenance import provenance
from ..schema import Range, Rule, Wording
from .choices import INIT_MODES, InitMode, LossOn  # noqa: F401 - INIT_MODES re-exported
from .data import DataConfig, Example, check_max_length, collate, load_domain, partition_domains, \
    partition_records, require_nonempty, require_predicted_tokens, tokenize_records
from .evaluate import Perplexity, per_example_nll
from .models import LoadedModel, check_positions, check_targets, targets_for, weights_fingerprint


SEED_LIMIT = 2**63  # seeds are 0 ≤ seed < 2⁶³: torch, random and numpy all accept them
# The one rule for every seed lorasum takes (training, generation, experiments).
Seed = Annotated[int, Range(0, SEED_LIMIT - 1), Wording("a whole number from 0 to 2**63 - 1")]
# Upper bounds of the counts a user sets: far above any useful value, low enough that a typo (an extra digit run)
# is refused at once instead of allocating a rank-10⁹ LoRA or looping for a geological time.
LIMITS = {"r": 4096, "batch_size": 65_536, "eval_batch_size": 65_536, "epochs": 1000}
# Bounds of the real-valued hyperparameters (a non-finite value is refused by every Range).
Positive = Annotated[float, Range(0, low_open=True), Wording("a finite number > 0")]
NonNegative = Annotated[float, Range(0), Wording("a finite number ≥ 0")]
Share = Annotated[float, Range(0, 1, high_open=True), Wording("a finite number in [0, 1)")]


def check_seed(value, key: str = "seed") -> int:
    """A seed given in code or as a flag, by the `Seed` rule. Returns it; a LorasumError keyed by `key` otherwise."""
    return schema.require(Seed, value, key)


@dataclass
class TrainConfig:
    """Hyperparameters of one adapter. r, alpha, targets and max_length are fixed across partitions (paper §3)."""

    r: Annotated[int, Range(1, LIMITS["r"])] = 4  # LoRA rank (paper: 4)
    alpha: Positive = 64.0  # LoRA alpha; the delta is scaled by alpha/r (paper: 64)
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.05  # LoRA dropout (tuned in the paper)
    targets: list[str] | None = None  # module names; None = the architecture's preset
    use_rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    max_length: Annotated[int, Rule(check_max_length)] = 64  # tokens per record after formatting (paper: 64)
    batch_size: Annotated[int, Range(1, LIMITS["batch_size"])] = 8  # records per optimizer step (tuned in the paper)
    # passes over the training split (tuned in the paper); the best epoch by validation is kept
    epochs: Annotated[int, Range(1, LIMITS["epochs"])] = 1
    lr: Annotated[float, Range(0, low_open=True), Wording("a positive number")] = 1e-3  # AdamW peak, decayed to 0
    warmup_ratio: Share = 0.0  # share of steps with linear warm-up
    weight_decay: NonNegative = 0.0  # AdamW weight decay
    max_grad_norm: Positive = 1.0  # gradient clipping
    loss_on: LossOn = "all"  # "all" tokens of the formatted record (paper) or "answer" tokens only
    seed: Seed = 0  # dropout and batch order (and the initialisation, see init); never moves records between splits
    # LoRA init seed: "independent" (derived from partition and seed) or "shared" (seed)
    init: Annotated[InitMode, Wording("independent or shared")] = "independent"
    eval_batch_size: Annotated[int, Range(1, LIMITS["eval_batch_size"])] = 16  # records per validation batch

    @property
    def scale(self) -> float:
        """The LoRA scale s that multiplies B A."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    @property
    def scale_text(self) -> str:
        """The scale for a message: `alpha/r = 64/4 = 16`."""
        over, r = ("sqrt(r)", f"sqrt({self.r})") if self.use_rslora else ("r", str(self.r))
        return f"alpha/{over} = {self.alpha:g}/{r} = {self.scale:g}"

    def check(self) -> None:
        """Every rule, also for a TrainConfig built in code (from command-line flags): the ones declared on the
        fields (types are the schema's: see from_dict), then the LoRA scale, which alpha, r and use_rslora make
        together. Errors are keyed by the field."""
        schema.check_fields(self)
        if self.scale > torch.finfo(torch.float32).max:  # PEFT multiplies by it in float32: inf, then 0·inf
            raise LorasumError(f"{self.alpha:g} makes the LoRA scale {self.scale_text}, beyond float32's range "
                               "(3.4e+38); the paper uses 64", key="alpha")

    @classmethod
    def from_dict(cls, d: dict, where: str | None = "training parameters", strict: bool = False) -> "TrainConfig":
        """A checked TrainConfig from a mapping (a config section, a job spec, a tuning best.json's params);
        `strict` for JSON sources, where a numeric string is an error (see schema)."""
        return schema.parse(cls, d, where, strict=strict)


@dataclass
class TrainResult:
    out: Path
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0  # optimizer steps taken


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _stable_seed(*parts) -> int:
    """A seed from sha256 of the parts (never Python's per-process `hash()`), the same on every machine."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def init_seed(partition: str, cfg: TrainConfig, sample: str = "") -> int:
    """The seed of the LoRA initialisation (A ~ kaiming, B = 0). `shared`: `seed` itself, so every adapter trained
    with one seed starts from the same A (what seeding once before get_peft_model does); `independent`: derived from
    (partition, seed) — and `sample`, naming another sample of the partition's records — so no two adapters share A
    and the summed deltas' row spaces are not tied by init."""
    if cfg.init == "shared":
        return cfg.seed
    return _stable_seed("lorasum-init", partition, cfg.seed, *((sample,) if sample else ()))


def train_stream_seed(cfg: TrainConfig) -> int:
    """The seed of dropout after initialisation, the same in both init modes: they differ only in the initial A."""
    return _stable_seed("lorasum-train", cfg.seed)


def lora_config(cfg: TrainConfig, loaded: LoadedModel) -> LoraConfig:
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.use_rslora,
        target_modules=targets_for(loaded.model_type, cfg.targets), bias="none", task_type="CAUSAL_LM",
        fan_in_fan_out=loaded.model_type == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
    )


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def start_config(start: Adapter, cfg: TrainConfig, loaded: LoadedModel) -> LoraConfig:
    """The LoRA layers that continue `start` (e.g. the exact sum of blocks, rank r₁ + r₂ on every layer): its rank
    and layers, and lora_alpha = s·r so that the scale s multiplying B A is the recipe's own (cfg.scale)."""
    ranks = {f.rank for f in start.layers.values()}
    if len(ranks) != 1:
        raise LorasumError(f"adapter '{start.name}' has layers of ranks {sorted(ranks)}; training continues one rank "
                           "on every layer")
    r = ranks.pop()
    return LoraConfig(r=r, lora_alpha=cfg.scale * r, lora_dropout=cfg.dropout, target_modules=sorted(start.layers),
                      bias="none", task_type="CAUSAL_LM", fan_in_fan_out=loaded.model_type == "gpt2")


@torch.no_grad()
def load_start(peft_model, start: Adapter, scale: float) -> None:
    """Copy `start`'s factors into the LoRA layers made by start_config: A as is, B·s_start/scale (the same ΔW)."""
    for name, f in start.layers.items():
        module = peft_model.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.copy_(f.A)
        module.lora_B["default"].weight.copy_(f.B * (f.scale / scale))


def train_adapter(loaded: LoadedModel, partition: str, out: str | Path, cfg: TrainConfig | None = None,
                  data: DataConfig | None = None, overwrite: bool = False,
                  on_epoch: Callable[[int, float], None] | None = None, sample: str = "",
                  start: Adapter | None = None, max_steps: int | None = None) -> TrainResult:
    """Train a LoRA adapter on `partition` (e.g. "math" or "math+medicine") and save it to `out` (a non-empty `out`
    is replaced only with `overwrite`).

    The base model is left as it was (LoRA layers are unloaded afterwards), so one loaded model serves many runs.
    `on_epoch(epoch, val_loss)` is called after each epoch's validation; an exception it raises (e.g. a tuning
    trial pruned) aborts training and nothing is saved. `sample` names a second sample of the partition's records
    (data.skip), so that it gets an initialisation of its own in `independent` mode. With `start` training
    continues that adapter's factors (its rank, at the recipe's LoRA scale) instead of a fresh initialisation; with
    `max_steps` it stops after that many optimizer steps (the schedule spans them; 0 saves `start` as it is).
    """
    cfg = TrainConfig.from_dict(asdict(cfg)) if cfg is not None else TrainConfig()
    check_positions(loaded, cfg.max_length)
    data, out, tok = data or DataConfig(), Path(out), loaded.tokenizer
    domains, train_ex, val_ex = _training_examples(tok, partition, cfg, data)
    # the base identity is the fp32 weights' hash; a half-precision model cannot reproduce it, so none is recorded
    fp32 = next(loaded.model.parameters()).dtype == torch.float32
    base_sha = weights_fingerprint(loaded.model) if fp32 else None
    grad_flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}

    lcfg = lora_config(cfg, loaded) if start is None else start_config(start, cfg, loaded)
    check_targets(loaded.model, list(lcfg.target_modules))
    a_seed = init_seed(partition, cfg, sample)
    set_seed(a_seed)
    try:
        peft_model = get_peft_model(loaded.model, lcfg)
        if start is not None:
            load_start(peft_model, start, cfg.scale)
    except ValueError as e:  # e.g. a target that is a container module, not a layer PEFT can adapt
        raise LorasumError(f"cannot add LoRA layers for {' '.join(sorted(lcfg.target_modules))}: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}", key="targets") from None
    torch.manual_seed(train_stream_seed(cfg))
    try:
        result = _fit(peft_model, train_ex, val_ex, tok.pad_token_id, cfg, get_linear_schedule_with_warmup,
                      loaded.autocast, on_epoch, max_steps)
        peft_model.peft_config["default"].base_model_name_or_path = loaded.model_id
        meta = {
            "lorasum_version": provenance()["lorasum"], "partition": partition, "domains": [d.spec for d in domains],
            "base_model": {"id": loaded.model_id, "model_type": loaded.model_type, "weights_sha256": base_sha},
            "train": asdict(cfg), "data": {**asdict(data), "domains": [d.fingerprint() for d in domains]},
            "seed": cfg.seed, "init": {"mode": cfg.init, "seed": a_seed}, "epochs": result.epochs, "best_epoch": result.best_epoch,
            "tokens_per_s": result.tokens_per_s, "wall_s": result.wall_s,
            "provenance": provenance(str(next(loaded.model.parameters()).device)),
            **({"start": {"adapter": start.name, "rank": lcfg.r, "scale": cfg.scale, "max_steps": max_steps,
                          "steps": result.steps}} if start is not None else {}),
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


def _training_examples(tok, partition: str, cfg: TrainConfig, data: DataConfig) -> tuple[list, list, list]:
    """The partition's domains and its tokenized train and validation examples (train shuffled by the split seed),
    refused where a split is empty or would give no predicted token (a NaN loss)."""
    domains = [load_domain(d, data) for d in partition_domains(partition)]
    require_nonempty(domains, "train")
    require_nonempty(domains, "validation")
    train_rec = partition_records(domains, "train", seed=data.split_seed)
    val_rec = partition_records(domains, "validation", shuffle=False)
    train_ex, val_ex = (tokenize_records(tok, recs, cfg.max_length) for recs in (train_rec, val_rec))
    for split, recs, exs in (("train", train_rec, train_ex), ("validation", val_rec, val_ex)):
        by_domain = {d.spec: [e for e, r in zip(exs, recs) if r.domain == d.spec] for d in domains}
        require_predicted_tokens(by_domain, split, cfg.max_length, cfg.loss_on)
    return domains, train_ex, val_ex


def _sort_target_modules(config_file: Path) -> None:
    """PEFT stores target_modules as a set, so its order in adapter_config.json follows the process's string hash
    seed; sorted, the file is the same bytes in every process (`lorasum job` reproduces it)."""
    cfg = read_json(config_file, "adapter config", "re-run training")
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_finite_loss(loss: float, step: int, epoch: int, cfg: TrainConfig | None = None,
                      what: str = "training loss") -> None:
    """Stop, before anything is saved, when the loss leaves the finite numbers. After an update the step size did
    it: AdamW moves ΔW = s·B A by about lr·s per step (s the LoRA scale), so the message names both factors."""
    if math.isfinite(loss):
        return
    where = f"at step {step} of epoch {epoch}" if step else f"after epoch {epoch}"
    if step == 1 and epoch == 1:  # before any update: the base model itself, not the learning rate
        raise LorasumError(f"the base model's {what} is {loss} {where}, before any update; nothing was saved "
                           "(with --dtype float16/bfloat16, try float32)")
    if cfg is None:
        raise DivergedError(f"the {what} became {loss} {where}; nothing was saved")
    raise DivergedError(f"the {what} became {loss} {where}: the updates diverged with lr {cfg.lr:g} and the LoRA "
                        f"scale {cfg.scale_text}; lower lr or alpha (nothing was saved)")


def train_epoch(model, batches, opt, sched, max_grad_norm: float, bar=None, epoch: int = 1,
                autocast=contextlib.nullcontext, cfg: TrainConfig | None = None) -> dict:
    """One pass of AdamW steps over collated batches; returns summed loss, steps and tokens seen. A loss that is
    not finite raises a LorasumError naming `cfg`'s lr and LoRA scale (the step size) before its step is taken.

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
        check_finite_loss(float(loss.detach()), steps + 1, epoch, cfg)
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
         on_epoch: Callable[[int, float], None] | None = None, max_steps: int | None = None) -> TrainResult:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs if max_steps is None else min(max_steps, steps_per_epoch * cfg.epochs)
    epochs = math.ceil(total / steps_per_epoch)  # a step budget may end inside an epoch (or before the first)
    sched = schedule_fn(opt, int(cfg.warmup_ratio * total), max(total, 1))
    rng = random.Random(cfg.seed)
    result = TrainResult(out=Path())
    best_loss, best_state = float("inf"), None
    tokens, train_s, wall0 = 0, 0.0, time.perf_counter()
    bar = progress(total=total, desc="train", unit="step")
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        left = total - (epoch - 1) * steps_per_epoch
        batches = (collate(b, pad_id, cfg.loss_on) for b in _batches(train_ex, cfg.batch_size, rng)[:left])
        try:
            stats = train_epoch(model, batches, opt, sched, cfg.max_grad_norm, bar, epoch, autocast, cfg)
        except LorasumError:
            bar.close()
            raise
        train_s += time.perf_counter() - t_epoch  # validation time is excluded from throughput
        tokens += stats["tokens"]
        running, seen = stats["loss_sum"], stats["steps"]
        result.steps += seen
        with autocast():
            rows = per_example_nll(model, {"validation": val_ex}, pad_id, cfg.eval_batch_size, cfg.loss_on,
                                   desc="val")
        val = Perplexity(sum(r.nll for r in rows), sum(r.tokens for r in rows))
        if not math.isfinite(val.loss):
            bar.close()
            check_finite_loss(val.loss, 0, epoch, cfg, "validation loss")
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
