"""Training and eval throughput of lorasum vs a raw PEFT loop on the same batches (SmolLM2, 8x64 batches).

Both paths run in one process on the same model and batches, interleaved round by round; medians are reported,
since the machine is noisy. Targets: training >= 0.95x and eval >= 0.9x of the raw loop.

    python benchmarks/train_eval.py --data-dir ../shared/data [--rounds 5] [--batches 4] [--model smollm2-135m]
        [--device cuda]

On CUDA every timed region synchronizes before and after (bench_device.timed), so the rates count the work, not
its launch; the model lives on `--device` (default: cuda if available, else cpu), the raw loop's batches too, and
lorasum's batches are collated on the CPU and moved by its loop, as in `lorasum train`.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
from pathlib import Path

import torch

os.environ.setdefault("LORASUM_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from bench_device import add_device_arg, device_name, device_or_exit, timed  # noqa: E402

from lorasum.lm.data import DataConfig, collate, load_domain, tokenize_records  # noqa: E402
from lorasum.lm.evaluate import per_example_nll  # noqa: E402
from lorasum.lm.models import load_model  # noqa: E402
from lorasum.lm.train import TrainConfig, lora_config, train_epoch  # noqa: E402


def raw_train(model, batches, opt) -> None:
    """The plain PEFT loop: forward, backward, step."""
    model.train()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def raw_eval(model, batches) -> None:
    model.eval()
    for b in batches:
        model(**b).loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-dir", default=os.environ.get("LORASUM_DATA_DIR"))
    ap.add_argument("--domain", default="medicine")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4, help="8x64 batches per timed pass")
    ap.add_argument("--threads", type=int, default=None)
    add_device_arg(ap)
    args = ap.parse_args()
    device = device_or_exit(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    lm = load_model(args.model, device=str(device))
    tok = lm.tokenizer
    n = 8 * args.batches
    if args.data_dir:
        dom = load_domain(args.domain, DataConfig(args.data_dir, max_records={"train": n}))
        examples = tokenize_records(tok, dom.records["train"], 64)
    else:  # synthetic full-length records
        from lorasum.lm.data import Example

        g = torch.Generator().manual_seed(0)
        examples = [Example(torch.randint(3, len(tok), (64,), generator=g).tolist(), [1] * 64, True, 64)
                    for _ in range(n)]
    ex_batches = [examples[i:i + 8] for i in range(0, n, 8)]
    batches = [{k: v.to(device) for k, v in collate(b, tok.pad_token_id).items()} for b in ex_batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    cfg = TrainConfig()
    torch.manual_seed(0)
    model = get_peft_model(lm.model, lora_config(cfg, lm))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = get_linear_schedule_with_warmup(opt, 0, 10**6)

    def collated(chunk):
        """lorasum's own batches as its training gets them: collated on the CPU (train_epoch moves each)."""
        return (collate(b, tok.pad_token_id) for b in chunk)

    # warm-up both paths once
    raw_train(model, batches[:1], opt)
    train_epoch(model, collated(ex_batches[:1]), opt, sched, 1.0)
    res = {"train_lorasum": [], "train_raw": [], "eval_lorasum": [], "eval_raw": []}
    for r in range(args.rounds):
        pair = [("train_lorasum", lambda: train_epoch(model, collated(ex_batches), opt, sched, 1.0)),
                ("train_raw", lambda: raw_train(model, batches, opt)),
                ("eval_lorasum", lambda: per_example_nll(model, {"d": examples}, tok.pad_token_id, 8)),
                ("eval_raw", lambda: raw_eval(model, batches))]
        if r % 2:  # alternate the order within a round
            pair = [pair[1], pair[0], pair[3], pair[2]]
        for name, fn in pair:
            res[name].append(tokens / timed(fn, device))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in res.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items()}
    # paired per round (both paths timed back to back): robust to the machine drifting between rounds
    paired = {p: statistics.median(a / b for a, b in zip(res[f"{p}_lorasum"], res[f"{p}_raw"])) for p in ("train", "eval")}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmodel {lm.model_id} on {device_name(device)}, {len(batches)} batches of 8x64 ({tokens} tokens), "
          f"{args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"training: lorasum {med['train_lorasum']:.0f} tok/s   raw PEFT loop {med['train_raw']:.0f} tok/s   "
          f"ratio {med['train_lorasum'] / med['train_raw']:.3f}, median per-round ratio {paired['train']:.3f} "
          "(target >= 0.95)")
    print(f"eval:     lorasum {med['eval_lorasum']:.0f} tok/s   raw PEFT loop {med['eval_raw']:.0f} tok/s   "
          f"ratio {med['eval_lorasum'] / med['eval_raw']:.3f}, median per-round ratio {paired['eval']:.3f} "
          "(target >= 0.90)")
    print(f"peak resident memory {peak:.0f} MiB"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if device.type == "cuda"
             else ""))


if __name__ == "__main__":
    main()
