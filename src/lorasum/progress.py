"""Progress bars with ETA on stderr (tqdm); silenced with LORASUM_PROGRESS=0."""

from __future__ import annotations

import functools
import os
import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it", disable: bool = False, **kw) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                disable=disable or not enabled(), mininterval=0.5, **kw)



def enabled() -> bool:
    return os.environ.get("LORASUM_PROGRESS", "1") != "0"


def quiet_libraries() -> None:
    """With LORASUM_PROGRESS=0, the bars other libraries draw are off as well: transformers' (loading and saving
    shards) and the hub's now, and tqdm's in any process started later (tqdm reads TQDM_DISABLE when imported)."""
    if enabled():
        return
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def quiet_module(module) -> None:
    """With LORASUM_PROGRESS=0, a library module that draws a bare `tqdm` (transformers' GGUF conversion) draws none."""
    if not enabled():
        module.tqdm = functools.partial(tqdm, disable=True)
