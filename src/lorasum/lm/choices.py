"""The named choices of the language-model layer, each declared once as a `Literal` type: config fields take them
as types (the schema refuses any other value, suggesting the closest), and code that needs the values reads them
with `typing.get_args`. Torch-free, so the command line offers them as flag choices without loading torch."""

from __future__ import annotations

from typing import Literal, get_args

Split = Literal["train", "validation", "test"]  # the three splits every domain's records are hashed into
SPLITS: tuple[str, ...] = get_args(Split)
# tokens the loss and perplexity count: "all" of the formatted record (paper) or the "answer" only
LossOn = Literal["all", "answer"]
InitMode = Literal["independent", "shared"]  # LoRA init seed: derived from partition and seed, or the seed alone
INIT_MODES: tuple[str, ...] = get_args(InitMode)
