"""Load the embedded SmolLM2-135M from its GGUF (de-quantizing) and from lorasum's converted copy, side by side.

Each round loads the model twice in fresh subprocesses (so no state is shared): once with the cache off (the GGUF
is read and de-quantized) and once from the copy in a temporary cache folder (written by a first, untimed load).
Prints per-round seconds, the medians and their ratio, and whether both loads give the same weights fingerprint.

    .venv/bin/python benchmarks/model_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, time
t0 = time.perf_counter()
from lorasum.lm.models import load_model, weights_fingerprint
t1 = time.perf_counter()
lm = load_model("smollm2-135m", device="cpu")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "fingerprint": weights_fingerprint(lm.model)}))
"""


def one(cache: str) -> dict:
    env = {**os.environ, "LORASUM_CACHE_DIR": cache, "LORASUM_PROGRESS": "0"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorasum-bench-cache-") as cache:
        one(cache)  # writes the copy
        gguf, copy, prints = [], [], set()
        for r in range(args.rounds):
            a, b = one("off"), one(cache)
            gguf.append(a["load_s"])
            copy.append(b["load_s"])
            prints |= {a["fingerprint"], b["fingerprint"]}
            print(f"round {r + 1}: GGUF {a['load_s']:.2f} s, copy {b['load_s']:.2f} s "
                  f"(imports {a['import_s']:.1f} / {b['import_s']:.1f} s)", flush=True)
    g, c = statistics.median(gguf), statistics.median(copy)
    print(f"median load: GGUF {g:.2f} s, copy {c:.2f} s: {g / c:.1f}x faster; same weights: {len(prints) == 1}")


if __name__ == "__main__":
    main()
