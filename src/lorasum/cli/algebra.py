"""Commands on adapter files alone (similarity, compose) and on a base model's weights (merge).

Handlers import the library inside themselves, so that `lorasum --help` stays torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_model_args, check_out, load, parse_max_rank, parse_term, print_json, terms_text


def similarity(args: argparse.Namespace) -> int:
    from ..delta.peft_format import load_terms
    from ..delta.similarity import scaled, similarity_report
    from ..delta.subspace import factor_similarity, factor_summary
    from ..errors import LorasumError

    if len(args.adapters) < 2:
        raise LorasumError("similarity needs at least two adapters: lorasum similarity A B [C ...]")
    # each delta scaled by its weight; a negative weight flips the sign of its cosines
    adapters = [scaled(a, w) for a, w in load_terms(parse_term(t) for t in args.adapters)]
    report = similarity_report(adapters)
    if args.factors:  # the pairs in similarity_report's order: (0, 1), (0, 2), …, (1, 2), …
        pairs = iter(report["pairs"])
        for i in range(len(adapters)):
            for j in range(i + 1, len(adapters)):
                per = factor_similarity(adapters[i], adapters[j])
                mean = factor_summary(per)
                next(pairs)["factors"] = {"A": {m: v["A"] for m, v in per.items()},
                                          "B": {m: v["B"] for m, v in per.items()},
                                          "mean_A": mean["A"], "mean_B": mean["B"]}
    print_json(report) if args.json else print(format_table(report))
    return 0


def format_table(report: dict) -> str:
    """Layers × pairs of cosines, with the module kind, an RMS row, for pairs with factors the mean A row-space and
    B column-space similarities (A-space, B-space rows), and for N > 2 the N × N RMS matrix."""
    heads = [f"{p['a']} ~ {p['b']}" for p in report["pairs"]]
    layers = list(report["kinds"])
    factors = all("factors" in p for p in report["pairs"])
    lw = max(len("layer"), *(len(m) for m in layers), *((len("A-space"),) if factors else ()))
    cw = [max(9, len(h)) for h in heads]
    lines = ["  ".join([f"{'layer':<{lw}}", "kind "] + [f"{h:>{w}}" for h, w in zip(heads, cw)])]
    for m in layers:
        vals = [f"{p['layers'][m]:>{w}.4f}" for p, w in zip(report["pairs"], cw)]
        lines.append("  ".join([f"{m:<{lw}}", f"{report['kinds'][m]:<5}"] + vals))
    lines.append("  ".join([f"{'RMS':<{lw}}", "     "] + [f"{p['rms']:>{w}.4f}" for p, w in zip(report["pairs"], cw)]))
    if factors:  # mean over layers of the factor-subspace similarities, formatted as the RMS row
        for label, key in (("A-space", "mean_A"), ("B-space", "mean_B")):
            lines.append("  ".join([f"{label:<{lw}}", "     "]
                                   + [f"{p['factors'][key]:>{w}.4f}" for p, w in zip(report["pairs"], cw)]))
    names = report["adapters"]
    if len(names) > 2:  # the pairwise RMS matrix
        nw = max(9, *(len(n) for n in names))
        lines += ["", "RMS matrix", "  ".join([" " * nw] + [f"{n:>{nw}}" for n in names])]
        for a, cells in zip(names, report["rms_matrix"]):
            lines.append("  ".join([f"{a:<{nw}}"] + [f"{c:>{nw}.4f}" for c in cells]))
    return "\n".join(lines)


def compose(terms: list[tuple[str, float]], out: str, max_rank: int | None = None) -> dict:
    """Load the adapters, sum them exactly, optionally compress to `max_rank`, save one stock PEFT folder.

    Returns a report: inputs, output path, rank, and (with max_rank) the relative Frobenius errors.
    """
    from ..delta.compose import compress, weighted_sum
    from ..delta.peft_format import load_terms, save_adapter
    from ..errors import LorasumError

    if not terms:
        raise LorasumError("compose needs at least one adapter: lorasum compose A B[:W] ... --out DIR")
    adapters = load_terms(terms)
    total = weighted_sum(adapters, name=Path(out).name)
    errors = None
    if max_rank is not None:
        total, errors = compress(total, max_rank)
    record = {"composition": {
        "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters],
        "max_rank": max_rank, "relative_error": errors["overall"] if errors else 0.0,
    }}
    save_adapter(total, out, extra_meta=record)
    ranks = sorted({f.rank for f in total.layers.values()})
    return {"out": str(out), "adapters": record["composition"]["adapters"], "rank": ranks[-1],
            "layers": len(total.layers), "max_rank": max_rank,
            "relative_error": errors["overall"] if errors else 0.0,
            "layer_errors": errors["layers"] if errors else {}}


def compose_command(args: argparse.Namespace) -> int:
    max_rank = parse_max_rank(args.max_rank)
    check_out(args.out)
    report = compose([parse_term(t) for t in args.adapters], args.out, max_rank)
    if args.json:
        print_json(report)
    else:
        err = f", relative error {report['relative_error']:.3e}" if report["max_rank"] else ""
        print(f"wrote {report['out']}: {terms_text(report['adapters'])}, rank {report['rank']} on "
              f"{report['layers']} layers{err}")
    return 0


def merge(args: argparse.Namespace) -> int:
    """Load the base model, add Σ wᵢ ΔWᵢ into its weights, save a merged model folder."""
    from ..delta.apply import apply_adapters
    from ..delta.factors import check_compatible
    from ..delta.peft_format import load_terms
    from ..errors import LorasumError
    from ..lm.adapters import check_base, save_merged

    if not args.adapter:
        raise LorasumError("merge needs at least one --adapter DIR[:W]")
    out = check_out(args.out)
    adapters = load_terms(parse_term(t) for t in args.adapter)
    check_compatible([a for a, _ in adapters])
    lm = load(args)
    fingerprint = check_base(lm, adapters)
    apply_adapters(lm.model, adapters)
    meta = {"base_model": {"id": lm.model_id, "weights_sha256": fingerprint},
            "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters]}
    save_merged(lm.model, lm.tokenizer, out, meta)
    print(f"wrote {out}: {lm.model_id} + {terms_text(meta['adapters'])}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similarity", help="per-layer cosines and RMS between adapters, from the LoRA factors")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="two or more adapter folders, "
                   "each delta scaled by its weight (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--factors", action="store_true", help="also the similarity of the A row spaces and of the B "
                   "column spaces (mean squared cosine of principal angles; A near 1 means a shared initial A)")
    p.set_defaults(func=similarity, parser=p)

    p = sub.add_parser("compose", help="exact weighted sum of adapters, saved as one PEFT adapter folder")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="adapter folders, weight defaults to 1")
    p.add_argument("--max-rank", default=None, metavar="K", help="SVD-compress each layer to rank K")
    p.add_argument("--out", required=True, help="output adapter folder (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="print the full report (per-layer errors) as JSON")
    p.set_defaults(func=compose_command, parser=p)

    p = sub.add_parser("merge", help="add weighted adapter deltas into the base weights and save the model")
    add_model_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:W]", help="repeatable")
    p.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")
    p.set_defaults(func=merge, parser=p)
