"""LoRA deltas as factors: per-layer (A, B, scale), their dense form, and the checks that let deltas be combined.

A layer's delta is ΔW = s · B A with A (r, in), B (out, r) and s = α/r (α/√r with rsLoRA). In the base weight's
own layout this is the paper's eq. (1): ΔW = (α/r · B A)ᵀ for GPT-2's Conv1D, whose weight is (in, out).
Layer names are the base model's module paths (`transformer.h.0.attn.c_attn`), never PEFT's wrapped names.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..errors import LorasumError
from ..identity import canonical_base_id

def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """s in ΔW = s · B A: α/r, or α/√r with rsLoRA (Kalajdzievski 2023)."""
    return alpha / (math.sqrt(r) if rslora else r)


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


def module_kind(layer: str) -> str:
    """'attn', 'mlp' or 'other', from the module path."""
    low = layer.lower()
    if "attn" in low or "attention" in low:
        return "attn"
    if "mlp" in low or "feed_forward" in low or "ffn" in low:
        return "mlp"
    return "other"


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
