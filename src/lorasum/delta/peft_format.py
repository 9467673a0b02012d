"""The PEFT file format: a stock LoRA adapter folder (adapter_config.json + adapter_model.safetensors, and lorasum's
own lorasum.json beside them) read into per-layer factors, and factors written back as such a folder.

Only adapters whose effect is a plain sum of s·B·A deltas are read (no DoRA, trained biases, embedding LoRA ...).
Layer names are the base model's module paths (`transformer.h.0.attn.c_attn`), never PEFT's wrapped names.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from pathlib import Path

import regex

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import LorasumError
from ..files import atomic_dir, atomic_write_json, recover
from ..jsonfile import read_json
from .factors import Adapter, LoraFactors, lora_scale

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


_REGEX_META = frozenset(".^$*+?{}[]\\|()")
_MATCH_BUDGET_S = 0.5  # all untrusted regular expressions of one adapter config together


class _Matcher:
    """Match untrusted name patterns from an adapter config as PEFT does, but never unboundedly.

    A key made only of literal characters, escaped characters (what save_adapter's `re.escape` writes) and `.` (any
    character) is matched by a linear scan with PEFT's meaning; anything else runs as a regular expression with a
    time budget shared by the whole config, and a pattern that exhausts it is refused by name.
    """

    def __init__(self, where: str, budget_s: float = _MATCH_BUDGET_S):
        self.where, self.left = where, budget_s  # seconds the regular-expression engine may still run

    def suffix(self, key: str, layer: str, field: str) -> bool:
        """PEFT's rank/alpha pattern rule: `re.match(rf"(.*\\.)?({key})$", layer)`."""
        chars = _plain_chars(key)
        if chars is not None:
            n = len(chars)
            if n > len(layer) or not _chars_match(chars, layer[len(layer) - n:]):
                return False
            head = layer[:len(layer) - n]
            return head == "" or head.endswith(".")
        return self._regex(rf"(.*\.)?({key})$", layer, key, field, full=False) is not None

    def full(self, pattern: str, layer: str, field: str) -> bool:
        """PEFT's target_modules-as-a-string rule: `re.fullmatch(pattern, layer)`."""
        chars = _plain_chars(pattern)
        if chars is not None:
            return len(chars) == len(layer) and _chars_match(chars, layer)
        return self._regex(pattern, layer, pattern, field, full=True) is not None

    def _regex(self, pattern: str, text: str, key: str, field: str, full: bool):
        try:
            compiled = regex.compile(pattern)
            re.compile(pattern)  # PEFT matches with `re`: a pattern `re` rejects is invalid for it too
        except (re.error, regex.error, RecursionError, OverflowError):
            raise LorasumError(f"{self.where}: {field} pattern {key!r} is not a valid regular expression; "
                               "use the layer's name") from None
        start = time.monotonic()
        try:
            if self.left <= 0:
                raise TimeoutError
            found = (compiled.fullmatch if full else compiled.match)(text, timeout=self.left)
        except TimeoutError:
            raise LorasumError(f"{self.where}: {field} pattern {key!r:.80} takes too long to match the layer names "
                               "(a backtracking regular expression); use the layers' names") from None
        finally:
            self.left -= time.monotonic() - start
        return found

    def layer_index(self, layer: str, pattern: str | None) -> int | None:
        """PEFT's layers_to_transform index of `layer`: the number segment right after the first segment named by
        `pattern` (PEFT matches `(?:^|.*?\\.)PATTERN\\.(\\d+)\\.`); with no pattern, the first all-digit segment
        from the third on (PEFT: `.*?\\.[^.]*\\.(\\d+)\\.`). Either is followed by another segment; None if none is."""
        parts = layer.split(".")
        numbered = [j for j in range(len(parts) - 2) if parts[j + 1].isdecimal()]  # a number with more after it
        if not pattern:
            return next((int(parts[j + 1]) for j in numbered if j >= 1), None)
        chars = _plain_chars(pattern)
        if chars is not None and None not in chars and "." not in chars:  # one plain segment name
            name = "".join(chars)
            return next((int(parts[j + 1]) for j in numbered if parts[j] == name), None)
        found = self._regex(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", layer, pattern, "layers_pattern", full=False)
        idx = found.group("idx") if found else None  # None too where an alternation matched without the group
        return None if idx is None else int(idx)


def _plain_chars(pattern: str) -> list[str | None] | None:
    """The pattern as one entry per matched character (None for `.`, any character), or None if it is a real
    regular expression (quantifiers, groups, classes, anchors, escapes such as \\d)."""
    out: list[str | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum() or pattern[i + 1] == "_":
                return None  # \d, \w, \1 ...: a character class or reference, not a literal
            out.append(pattern[i + 1])
            i += 2
            continue
        if c == ".":
            out.append(None)
        elif c in _REGEX_META or c.isspace():
            return None  # whitespace could be a verbose-mode pattern's; leave it to the regex engine
        else:
            out.append(c)
        i += 1
    return out


def _chars_match(chars: list[str | None], text: str) -> bool:
    return all(c is None or c == t for c, t in zip(chars, text)) and "\n" not in text


def _pattern_value(patterns: dict, layer: str, default, matcher: _Matcher, field: str):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key, in the config's
    order, whose pattern matches the layer's name or a dotted suffix of it."""
    for key, value in patterns.items():
        if matcher.suffix(key, layer, field):
            return value
    return default


def _finite_positive(value) -> bool:
    """A JSON number that is > 0 and finite as a float (a 400-digit integer is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def _patterns(config: dict, field: str, where: str) -> dict:
    """rank_pattern/alpha_pattern: a mapping of name patterns to positive numbers (whole numbers for ranks)."""
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise LorasumError(f"{where}: '{field}' must be a mapping of layer-name patterns to numbers, "
                           f"got {patterns!r:.60}; fix adapter_config.json")
    for key, value in patterns.items():
        whole = field != "rank_pattern" or isinstance(value, int)
        if not _finite_positive(value) or not whole:
            kind = "a whole number ≥ 1" if field == "rank_pattern" else "a positive number"
            raise LorasumError(f"{where}: '{field}' key {key!r:.80} must map to {kind}, got {value!r:.40}; "
                               "fix adapter_config.json")
    return patterns


def _not_adapted_by(config: dict, layer: str, matcher: _Matcher) -> str | None:
    """The config field under which PEFT would not have adapted `layer` (peft's `check_target_module_exists`), or
    None where it would: not named by exclude_modules, named by target_modules (a list of names or dotted suffixes,
    or one regular expression matched in full; none at all covers everything) and, for a list with
    layers_to_transform, in one of those layers (its index found by layers_pattern)."""
    excluded = config.get("exclude_modules")
    if excluded and (matcher.full(excluded, layer, "exclude_modules") if isinstance(excluded, str)
                     else _names(excluded, layer)):
        return "exclude_modules"
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    if isinstance(targets, str):
        return None if matcher.full(targets, layer, "target_modules") else "target_modules"
    if layer in targets:  # named in full: PEFT applies no layer filter
        return None
    if not _names(targets, layer):
        return "target_modules"
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return None
    patterns = config.get("layers_pattern") or [None]
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        index = matcher.layer_index(layer, pattern)
        if index is not None:
            covered = index == indexes if isinstance(indexes, int) else index in indexes
            return None if covered else "layers_to_transform"
    return "layers_to_transform"


def _names(names: list[str], layer: str) -> bool:
    return any(layer == t or layer.endswith("." + t) for t in names)


def _check_targets_field(config: dict, where: str) -> None:
    """The fields that say which layers PEFT adapts, each of the type PEFT gives it."""
    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = config.get(field)
        if value is None or isinstance(value, str):
            continue
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise LorasumError(f"{where}: '{field}' must be a list of module names or one regular expression, "
                               f"got {value!r:.60}; fix adapter_config.json")
    indexes = config.get("layers_to_transform")
    whole = (lambda i: isinstance(i, int) and not isinstance(i, bool) and i >= 0)
    if indexes is not None and not (whole(indexes) or isinstance(indexes, list) and all(map(whole, indexes))):
        raise LorasumError(f"{where}: 'layers_to_transform' must be a layer index or a list of them, got "
                           f"{indexes!r:.60}; fix adapter_config.json")


def _read_json(path: Path, what: str) -> dict:
    return read_json(path, what, "re-save the adapter")


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
        if not _finite_positive(value):
            raise LorasumError(f"{where}: '{key}' must be a positive number, got {value!r:.40}")
    _patterns(config, "rank_pattern", where)
    _patterns(config, "alpha_pattern", where)
    _check_targets_field(config, where)


def _layer_rank(A: torch.Tensor, B: torch.Tensor, config: dict, layer: str, w_path: Path) -> int:
    """The layer's rank, from its tensors (never from a rank_pattern): lora_A's rows, which lora_B's columns and,
    without a rank_pattern, the config's r must equal."""
    r = int(A.shape[0])
    if r < 1 or B.shape[1] != r:
        raise LorasumError(f"{w_path}: layer '{layer}' has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                           "whose ranks disagree; re-save the adapter")
    if not config.get("rank_pattern") and r != config["r"]:
        raise LorasumError(f"{w_path}: layer '{layer}' has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                           f"but the config says rank {config['r']}; re-save the adapter")
    return r


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Load a stock PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) into per-layer factors."""
    folder = Path(path)
    if not folder.exists():
        recover(folder)  # a replacement of this folder killed between its two renames is completed from its journal
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
        if not t.dtype.is_floating_point:
            raise LorasumError(f"{w_path}: tensor '{key}' is {str(t.dtype).removeprefix('torch.')}; LoRA factors "
                               "must be floating point (float32, bfloat16, float16), re-save the adapter")
        if not torch.isfinite(t).all():
            raise LorasumError(f"{w_path}: tensor '{key}' contains NaN or Inf; retrain or replace the adapter")
        if t.ndim != 2:
            raise LorasumError(f"{w_path}: tensor '{key}' has {t.ndim} dims (conv LoRA?); "
                               "only 2-D factors are supported")
        pairs.setdefault(m["layer"].removeprefix(_PREFIX), {})[m["which"]] = t
    if not pairs:
        raise LorasumError(f"{w_path} holds no LoRA tensors; re-save the adapter")

    fan = bool(config.get("fan_in_fan_out", False))
    matcher = _Matcher(str(cfg_path))
    alphas = config.get("alpha_pattern") or {}
    layers: dict[str, LoraFactors] = {}
    for layer in sorted(pairs):
        ab = pairs[layer]
        if set(ab) != {"A", "B"}:
            raise LorasumError(f"{w_path}: layer '{layer}' lacks lora_{'B' if 'A' in ab else 'A'}; re-save the adapter")
        A, B = ab["A"], ab["B"]  # (r, in), (out, r)
        r = _layer_rank(A, B, config, layer, w_path)
        field = _not_adapted_by(config, layer, matcher)
        if field:
            raise LorasumError(f"{cfg_path}: '{field}' {config[field]!r:.120} leaves out layer '{layer}' of "
                               f"{WEIGHTS_FILE}; the config does not belong to these weights, re-save the adapter")
        alpha = float(_pattern_value(alphas, layer, config["lora_alpha"], matcher, "alpha_pattern"))
        scale = lora_scale(alpha, r, bool(config.get("use_rslora")))
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
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise LorasumError(f"cannot write adapter {out}: tensor '{bad}' would hold Inf or NaN (its factors times "
                           "their weights overflow float32); use smaller weights")
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
