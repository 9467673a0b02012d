"""LoRA deltas as factors: load a stock PEFT adapter folder into per-layer (A, B, scale), parse `PATH[:WEIGHT]`.

A layer's delta is ΔW = s · B A with A (r, in), B (out, r) and s = α/r (α/√r with rsLoRA). In the base weight's
own layout this is the paper's eq. (1): ΔW = (α/r · B A)ᵀ for GPT-2's Conv1D, whose weight is (in, out).
Layer names are the base model's module paths (`transformer.h.0.attn.c_attn`), never PEFT's wrapped names.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import LorasumError

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


@dataclass
class LoraFactors:
    """One layer's delta s · B A. `fan_in_fan_out`: the base weight is stored (in, out) (GPT-2 Conv1D)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r); loaded adapters hold it column-major (B.T contiguous), see load_adapter
    scale: float
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta B A, whatever the base layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])


@dataclass
class Adapter:
    """A LoRA adapter as factors: `layers` maps base-model module paths to their factors."""

    name: str
    path: str
    config: dict
    layers: dict[str, LoraFactors]
    lorasum: dict = field(default_factory=dict)  # lorasum.json beside the adapter, if any

    @property
    def base_id(self) -> str | None:
        """Canonical base-model id: lorasum.json's, else the last component of `base_model_name_or_path`."""
        bm = self.lorasum.get("base_model") if isinstance(self.lorasum, dict) else None
        if isinstance(bm, dict) and bm.get("id"):
            return str(bm["id"])
        raw = self.config.get("base_model_name_or_path")
        return canonical_base_id(str(raw)) if raw else None

    @property
    def base_sha256(self) -> str | None:
        bm = self.lorasum.get("base_model") if isinstance(self.lorasum, dict) else None
        return bm.get("weights_sha256") if isinstance(bm, dict) else None

    def base_record(self) -> dict:
        """{"base_model": {...}} from lorasum.json (empty if none): what a derived adapter inherits."""
        bm = self.lorasum.get("base_model") if isinstance(self.lorasum, dict) else None
        return {"base_model": copy.deepcopy(bm)} if isinstance(bm, dict) else {}


def canonical_base_id(raw: str) -> str:
    """The last path component of `base_model_name_or_path` or of a `--model` .gguf path, with the embedded model's
    install folder and GGUF file (a path that differs per install) mapped to its built-in name; another `.gguf`
    file maps to its stem (as `load_model` names it)."""
    from .models import DEFAULT_MODEL, SMOLLM2_GGUF, SMOLLM2_PACKAGE

    last = raw.rstrip("/\\").replace("\\", "/").split("/")[-1]
    aliases = {SMOLLM2_PACKAGE: DEFAULT_MODEL, SMOLLM2_GGUF: DEFAULT_MODEL, Path(SMOLLM2_GGUF).stem: DEFAULT_MODEL}
    if last in aliases:
        return aliases[last]
    return last[:-len(".gguf")] if last.lower().endswith(".gguf") and len(last) > len(".gguf") else last


def module_kind(layer: str) -> str:
    """'attn', 'mlp' or 'other', from the module path."""
    low = layer.lower()
    if "attn" in low or "attention" in low:
        return "attn"
    if "mlp" in low or "feed_forward" in low or "ffn" in low:
        return "mlp"
    return "other"


# ---------------------------------------------------------------------------------------------------------------
def parse_adapter_arg(text: str) -> tuple[str, float]:
    """Split `PATH[:WEIGHT]` into (path, weight); the weight defaults to 1.0.

    Rule: if `text` names an existing file or folder, it is a path with weight 1 (so a folder may contain ':').
    Otherwise everything after the last ':' must be a finite number (`math:0.5`, `finance:-1`, `x:1e-3`).
    """
    if os.path.exists(text) or ":" not in text:
        if not text:
            raise LorasumError("empty adapter argument; write PATH or PATH:WEIGHT, e.g. math:0.5")
        return text, 1.0
    path, _, raw = text.rpartition(":")
    try:
        weight = float(raw)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise LorasumError(
            f"adapter argument '{text}': weight '{raw}' is not a finite number; "
            f"write PATH:WEIGHT, e.g. {path or 'math'}:0.5")
    if not path:
        raise LorasumError(f"adapter argument '{text}' has no path before ':'; write PATH:WEIGHT, e.g. math:0.5")
    return path, weight


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
    from safetensors import safe_open

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


# ---------------------------------------------------------------------------------------------------------------
def delta_matrix(f: LoraFactors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s · B A, shape (out, in)."""
    return f.scale * (f.B.to(dtype) @ f.A.to(dtype))  # (out, in)


def dense_delta(f: LoraFactors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW in the base weight's layout: (out, in), or (in, out) = (α/r · B A)ᵀ for Conv1D (the paper's eq. 1)."""
    d = delta_matrix(f, dtype)
    return d.T.contiguous() if f.fan_in_fan_out else d


def check_base_models(adapters: list[Adapter]) -> None:
    """All adapters name the same base model (canonical id, and weight hash where both recorded it)."""
    ref = adapters[0]
    for other in adapters[1:]:
        a, b = ref.base_id, other.base_id
        if a and b and a.lower() != b.lower():
            raise LorasumError(f"adapters '{ref.name}' and '{other.name}' were trained on different base models "
                               f"('{a}' vs '{b}'); combine only adapters of one base model")
        sa, sb = ref.base_sha256, other.base_sha256
        if sa and sb and sa != sb:
            raise LorasumError(f"adapters '{ref.name}' and '{other.name}' were trained on base '{a}' with different "
                               "weights (weights_sha256 differs); combine only adapters of one base model")


def check_compatible(adapters: list[Adapter]) -> list[str]:
    """Same base model, same target layers, equal shapes; returns the shared layer names (sorted)."""
    if not adapters:
        raise LorasumError("no adapters given")
    check_base_models(adapters)
    ref = adapters[0]
    for other in adapters[1:]:
        for layer in sorted(set(ref.layers) | set(other.layers)):
            if layer not in other.layers or layer not in ref.layers:
                has, lacks = (ref, other) if layer not in other.layers else (other, ref)
                raise LorasumError(f"layer '{layer}' is in adapter '{has.name}' but not in '{lacks.name}'; "
                                   "adapters must target the same layers")
            sa, sb = ref.layers[layer].shape, other.layers[layer].shape
            if sa != sb:
                raise LorasumError(f"layer '{layer}' is {sa[0]}x{sa[1]} in adapter '{ref.name}' but {sb[0]}x{sb[1]} "
                                   f"in '{other.name}'; adapters must share the base model")
    return sorted(ref.layers)
