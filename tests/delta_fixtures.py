"""Shared helpers for the delta-algebra tests: stock-PEFT adapters on the tiny built-in models, dense references."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lorasum.lm.models import load_model

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

FAN_IN_FAN_OUT = {"tiny-gpt2": True, "tiny-llama": False}


def make_adapter(out: Path, model: str = "tiny-gpt2", seed: int = 0, r: int = 4, alpha: float = 64,
                 use_rslora: bool = False, base: str | None = None, targets: list[str] | None = None,
                 **lora_kwargs) -> Path:
    """Save a stock PEFT LoRA adapter with random A and B (B is zero at PEFT init) into `out`."""
    from peft import LoraConfig, get_peft_model

    lm = load_model(model, device="cpu")
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or lm.default_targets, use_rslora=use_rslora,
                     fan_in_fan_out=FAN_IN_FAN_OUT[model], **lora_kwargs)
    pm = get_peft_model(lm.model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pm.save_pretrained(out)
    if base is not None:
        set_config(out, base_model_name_or_path=base)
    return Path(out)


def set_config(folder: Path, **fields) -> None:
    path = Path(folder) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def peft_merged_state(model: str, folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Independent reference: stock PEFT load_adapter×n + add_weighted_adapter('cat') + merge_and_unload."""
    from peft import PeftModel

    base = load_model(model, device="cpu").model
    pm = PeftModel.from_pretrained(base, str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        pm.load_adapter(str(f), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(folders))]
    if len(folders) == 1:
        pm.add_weighted_adapter(names, weights, "sum", combination_type="linear")  # single adapter: w·ΔW exactly
    else:
        pm.add_weighted_adapter(names, weights, "sum", combination_type="cat")
    pm.set_adapter("sum")
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def dense64(adapter, layer: str) -> torch.Tensor:
    """Reference s·B A in float64, (out, in)."""
    f = adapter.layers[layer]
    return f.scale * (f.B.double() @ f.A.double())


def cos64(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """Logits of fixed random ids (drawn on the CPU, run on the model's device), brought back to the CPU."""
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.cpu()


def moved(adapter, device: str):
    """The adapter with its factors on `device` (as a caller holding them on a GPU would pass them)."""
    from lorasum.delta.factors import Adapter, LoraFactors

    layers = {n: LoraFactors(f.A.to(device), f.B.to(device), f.scale, f.fan_in_fan_out)
              for n, f in adapter.layers.items()}
    return Adapter(adapter.name, adapter.path, adapter.config, layers, adapter.lorasum)
