"""The PEFT file format: a stock LoRA adapter folder (adapter_config.json + adapter_model.safetensors, and lorasum's
own lorasum.json beside them) read into per-layer factors, and factors written back as such a folder.

Only adapters whose effect is a plain sum of s·B·A deltas are read (no DoRA, trained biases, embedding LoRA ...).
Layer names are the base model's module paths (`transformer.h.0.attn.c_attn`), never PEFT's wrapped names.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import LorasumError
from ..files import atomic_dir, atomic_write_json
from .factors import Adapter, LoraFactors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LORASUM_FILE = "lorasum.json"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])\.weight$")

# Config fields whose truthy value makes the adapter something other than a plain sum of s·B·A deltas.
_UNSUPPORTED = {
    "use_dora": "DoRA rescales the merged weight, so its delta is not s·B·A",
    "modules_to_save": "fully trained modules are not a low-rank delta",
    "lora_bias": "a trained LoRA bias is not part of s·B·A",
    "layer_replication": "replicated layers share weights",
    "trainable_token_indices": "trained token embeddings are not a low-rank delta",
    "target_parameters": "LoRA on raw parameters is not supported",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
    "arrow_config": "Arrow routing mixes adapters per token",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "monteclora_config": "MonteCLoRA is not a fixed s·B·A delta",
    "kasa_config": "KaSA is not a plain s·B·A delta",
    "velora_config": "VeLoRA is not supported",
}

# Initialisations that rewrite the base weight (W - s·B₀A₀); saved unconverted, the adapter is relative to that.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _pattern_value(patterns: dict, layer: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", layer):
                return value
        except re.error:
            raise LorasumError(f"rank/alpha pattern '{key}' in the adapter config is not a valid regular expression; "
                               "fix adapter_config.json") from None
    return default


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorasumError(f"cannot read {what} {path}: {str(e).splitlines()[0]}; re-save the adapter") from None
    if not isinstance(obj, dict):
        raise LorasumError(f"{what} {path} is not a JSON object; re-save the adapter")
    return obj


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types; all mean the same to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorasumError(f"cannot read {path}: {first}; the file is corrupt or truncated, "
                           "re-save the adapter") from None


def check_config(config: dict, where: str) -> None:
    """Reject adapter configs whose effect is not a sum of s·B·A deltas (DoRA, modules_to_save, bias ...)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LorasumError(f"{where}: peft_type is '{config.get('peft_type')}', only LORA adapters can be summed")
    for key, why in _UNSUPPORTED.items():
        if config.get(key):
            raise LorasumError(f"{where}: '{key}' is set ({why}); retrain the adapter without it")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise LorasumError(f"{where}: init_lora_weights='{init}' also changes the base weights, so the factors alone "
                           "are not the delta; convert it with PEFT's path_initial_model_for_weight_conversion")
    if config.get("bias", "none") != "none":
        raise LorasumError(f"{where}: bias is '{config['bias']}' (trained biases are not a low-rank delta); "
                           "retrain with bias='none'")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise LorasumError(f"{where}: use_rslora with rank_pattern/alpha_pattern is not supported by PEFT either")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise LorasumError(f"{where}: '{key}' must be a positive number, got {value!r}")


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Load a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into per-layer factors."""
    folder = Path(path)
    if not folder.is_dir():
        raise LorasumError(f"adapter folder not found: {folder}; "
                           f"pass a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise LorasumError(f"adapter folder {folder} has no {CONFIG_FILE}; save it with PEFT's save_pretrained")
    if not w_path.is_file():
        extra = " (pickled adapter_model.bin is never loaded; re-save with safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise LorasumError(f"adapter folder {folder} has no {WEIGHTS_FILE}{extra}; save it with PEFT's save_pretrained")
    config = _read_json(cfg_path, "adapter config")
    check_config(config, str(cfg_path))
    meta = _read_json(folder / LORASUM_FILE, "lorasum metadata") if (folder / LORASUM_FILE).is_file() else {}
    tensors = _read_tensors(w_path)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            why = ("DoRA magnitude" if "lora_magnitude_vector" in key else
                   "embedding LoRA" if "lora_embedding" in key else
                   "a trained bias" if key.endswith(".bias") else "not a lora_A/lora_B weight")
            raise LorasumError(f"{w_path}: tensor '{key}' is {why}; only LoRA on Linear/Conv1D layers can be summed")
        if not torch.isfinite(t).all():
            raise LorasumError(f"{w_path}: tensor '{key}' contains NaN or Inf; retrain or replace the adapter")
        if t.ndim != 2:
            raise LorasumError(f"{w_path}: tensor '{key}' has {t.ndim} dims (conv LoRA?); "
                               "only 2-D factors are supported")
        pairs.setdefault(m["layer"].removeprefix(_PREFIX), {})[m["which"]] = t
    if not pairs:
        raise LorasumError(f"{w_path} holds no LoRA tensors; re-save the adapter")

    fan = bool(config.get("fan_in_fan_out", False))
    layers: dict[str, LoraFactors] = {}
    for layer in sorted(pairs):
        ab = pairs[layer]
        if set(ab) != {"A", "B"}:
            raise LorasumError(f"{w_path}: layer '{layer}' lacks lora_{'B' if 'A' in ab else 'A'}; re-save the adapter")
        A, B = ab["A"], ab["B"]  # (r, in), (out, r)
        r = A.shape[0]
        want_r = _pattern_value(config.get("rank_pattern"), layer, config["r"])
        if B.shape[1] != r or r != want_r:
            raise LorasumError(f"{w_path}: layer '{layer}' has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                               f"but the config says rank {want_r}; re-save the adapter")
        alpha = _pattern_value(config.get("alpha_pattern"), layer, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # B column-major: Bᵀ rows are what the Gram products and rank concatenation read (similarity, compose)
        layers[layer] = LoraFactors(A, B.T.contiguous().T, float(scale), fan)
    return Adapter(folder.name, str(folder), config, layers, meta)


def save_adapter(adapter: Adapter, out: str | os.PathLike, extra_meta: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write `adapter` as a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors), atomically.

    Scales are folded into the factors, so the config sets lora_alpha = r (scale 1) per layer, with
    rank_pattern/alpha_pattern for layers whose rank differs from the most common one. Target modules are the
    exact layer paths.
    """
    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, f in adapter.layers.items():
        # fold the scale into B so the stored adapter has scale 1 (lora_alpha == r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (f.B * f.scale).contiguous()
        ranks[name] = f.rank
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = copy.deepcopy(adapter.config)
    config.update({
        "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(adapter.layers), "exclude_modules": None, "layers_to_transform": None,
        "layers_pattern": None, "init_lora_weights": True, "use_dora": False, "modules_to_save": None, "bias": "none",
        "inference_mode": True,
        "peft_type": "LORA",
    })
    meta = {**adapter.base_record(), **(extra_meta or {})}  # the base identity carries over, training records don't
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
        if meta:
            atomic_write_json(tmp / LORASUM_FILE, meta)
    return out


Term = tuple[Adapter, float]


def load_terms(items) -> list[Term]:
    """Adapters with their weights, loaded once: each item is an Adapter, a folder (weight 1) or a (folder or Adapter,
    weight) pair. The command line's `PATH[:WEIGHT]` text is parsed by the CLI before it reaches here."""
    out: list[Term] = []
    for item in items:
        target, weight = item if isinstance(item, tuple) else (item, 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise LorasumError(f"adapter weight {weight!r} for {target} is not a finite number")
        out.append((target if isinstance(target, Adapter) else load_adapter(target), float(weight)))
    return out
