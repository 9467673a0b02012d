"""Progress bars with ETA on stderr (tqdm); silenced with LORASUM_PROGRESS=0."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it", **kw) -> tqdm:
    disable = os.environ.get("LORASUM_PROGRESS", "1") == "0"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=sys.stderr,
                disable=disable, mininterval=0.5, **kw)


def quiet_libraries() -> None:
    """With LORASUM_PROGRESS=0, the bars other libraries draw (tqdm in transformers' model loading and GGUF
    conversion, the hub's downloads) are off as well: the setting means no bars at all."""
    if os.environ.get("LORASUM_PROGRESS", "1") == "0":
        os.environ["TQDM_DISABLE"] = "1"  # read by every tqdm bar created from now on
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
