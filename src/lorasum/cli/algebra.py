"""Commands on adapter files alone (similarity, compose) and on a base model's weights (merge).

Handlers import the library inside themselves, so that `lorasum --help` stays torch-free.
"""

from __future__ import annotations

import argparse
from typing import get_args

from ..delta.registry import METHODS, PEFT_METHODS, PREDICTOR_NAMES, RATIO_PREDICTORS, ROUTES, Param, all_methods, \
    all_routes, method_label, method_params
from ..lm.choices import LossOn
from ..outputs import ADAPTER, MERGED, SIMILARITY_MATRIX, WEIGHT_SEARCH
from .args import add_data_args, add_model_args, check_out, load, parse_max_rank, parse_term, print_json, terms_text


def similarity_command(args: argparse.Namespace) -> int:
    """Per-layer cosines and RMS between adapters (delta.similarity), as a table or JSON."""
    from ..delta.peft_format import load_terms
    from ..delta.similarity import scaled, similarity_report
    from ..delta.subspace import factor_similarity, factor_summary
    from ..errors import LorasumError

    if args.matrix is not None:
        return similarity_matrix(args)
    for flag in ("predictor", "out"):
        if getattr(args, flag) is not None:
            raise LorasumError("goes with --matrix DIR [DIR ...]; leave it out for positional adapters", key=flag)
    if args.overwrite:
        raise LorasumError("goes with --matrix DIR [DIR ...] --out FOLDER; leave it out", key="overwrite")
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


def similarity_matrix(args: argparse.Namespace) -> int:
    """`similarity --matrix DIR ...`: one weight-space predictor for every pair of a library of adapters
    (delta.library), written as matrix.csv, pairs.csv and a clustered heatmap.png; prints the pairs to combine."""
    from ..delta.library import library_matrix, write_library
    from ..errors import LorasumError

    if args.adapters:
        raise LorasumError("takes the adapters from its folders; pass positional adapters or --matrix, not both",
                           key="matrix")
    if args.factors:
        raise LorasumError("is for positional adapters; with --matrix pass --predictor a_subspace or b_subspace",
                           key="factors")
    if args.out is None:
        raise LorasumError("is required with --matrix: the folder for matrix.csv, pairs.csv and heatmap.png",
                           key="out")
    predictor = args.predictor or "rms"
    out = check_out(args.out, SIMILARITY_MATRIX, overwrite=args.overwrite)
    result = library_matrix(args.matrix, predictor)
    write_library(out, result, predictor)
    n, top = len(result["names"]), result["pairs"][:5]
    if args.json:
        print_json({"out": str(out), "predictor": predictor, "adapters": result["names"], "pairs": n * (n - 1) // 2,
                    "first": [{"a": a, "b": b, "value": v} for a, b, v in top]})
        return 0
    rule = "|log value|" if predictor in RATIO_PREDICTORS else "|value|"
    print(f"wrote {out}: {predictor} for {n} adapters, {n * (n - 1) // 2} pairs (matrix.csv, pairs.csv, heatmap.png)")
    print(f"pairs to combine first (lowest {rule}):")
    width = max(len(f"{a} ~ {b}") for a, b, _ in top)
    for a, b, v in top:
        print(f"  {f'{a} ~ {b}':<{width}}  {v:.4g}")
    a, b, v = result["pairs"][-1]
    print(f"most interfering: {a} ~ {b}  {v:.4g}")
    print(f"a ranking by {predictor}, not a forecast: on the evidence run no weight-space predictor forecast the "
          "cost of a sum (docs/evidence.md)")
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


# --- merge methods: --method and a flag per declared hyperparameter (delta.registry, which imports no torch) -----
def method_flags(seed: bool = True, routes: bool = False) -> list[Param]:
    """Every hyperparameter some method (and with `routes` some route) declares, once, by name (`seed=False`:
    without --seed)."""
    rows = {**all_methods(), **(ROUTES if routes else {})}
    declared = {p.name: p for m in rows.values() for p in m.params}
    return [declared[n] for n in sorted(declared) if seed or n != "seed"]


def add_method_args(p: argparse.ArgumentParser, seed: bool = True, routes: bool = False) -> None:
    """--method and its hyperparameters (each None unless given, so a flag given to a method without it is refused);
    `seed=False` where the command already has a --seed (generate: it then seeds DARE's masks too); `routes`: also
    --route, its hyperparameters and --general (eval, generate)."""
    p.add_argument("--method", default=None, help=f"merge method (default: sum, the exact sum): {', '.join(METHODS)}, "
                   f"and PEFT's own {', '.join(PEFT_METHODS)} (see docs/merge-methods.md)")
    if routes:
        p.add_argument("--route", default=None, choices=list(all_routes()),
                       help="keep the adapters separate: arrow routes each token between them (PEFT's Arrow), "
                            "prompt sends each request to the adapter whose training questions are nearest its own")
        p.add_argument("--general", action="append", default=[], metavar="DIR",
                       help="general-domain adapter for Arrow's GenKnowSub (repeat; their mean is subtracted first)")
    rows = {**all_methods(), **(ROUTES if routes else {})}
    for param in method_flags(seed, routes):
        takers = [n for n, m in rows.items() if param in m.params]
        p.add_argument(f"--{param.name.replace('_', '-')}", default=None, metavar=param.metavar or None,
                       help=f"{param.help} ({', '.join(takers)}; default {param.default:g})")


def method_choice(args: argparse.Namespace, seed: bool = True) -> tuple[str, dict]:
    """(method or route, hyperparameters) from the flags, checked before any work (`seed=False`: --seed is the
    command's own and seeds the masks of methods that draw them)."""
    from ..errors import LorasumError

    route, routes = getattr(args, "route", None), hasattr(args, "route")
    if route is not None and args.method is not None:
        raise LorasumError("--route keeps the adapters separate and --method merges them; pass one of them",
                           key="route")
    name = route if route is not None else "sum" if args.method is None else args.method  # `--method ''`: refused
    if name in all_routes() and route is None:
        where = f"pass --route {name}" if routes else "routes are for `lorasum eval` and `lorasum generate`"
        raise LorasumError(f"'{name}' routes between adapters kept separate and merges nothing; {where}",
                           key="method")
    if name != "sum" and not getattr(args, "adapter", True):
        raise LorasumError(f"{name!r:.40} merges adapters, and none is given; pass --adapter DIR[:WEIGHT], or leave "
                           "--method out", key="method")
    if getattr(args, "general", None) and route is None:
        raise LorasumError("general-domain adapters serve Arrow's GenKnowSub; pass --route arrow with them",
                           key="general")
    given = {p.name: p.parse(getattr(args, p.name, None)) for p in method_flags(seed, routes)}
    params = method_params(name, given, all_routes() if route is not None else all_methods())
    if not seed and "seed" in params and getattr(args, "seed", None) is not None:
        params["seed"] = int(args.seed)
    return name, params


def compose_command(args: argparse.Namespace) -> int:
    """Merge adapter files into one stock PEFT adapter folder (lm.combination.compose); PEFT's methods load --model."""
    from ..lm.combination import compose

    method, params = method_choice(args)
    max_rank = parse_max_rank(args.max_rank)
    check_out(args.out, ADAPTER)
    report = compose([parse_term(t) for t in args.adapters], args.out, max_rank, method, params, lambda: load(args))
    if args.json:
        print_json(report)
        return 0
    label = method_label(method, params)
    how = f" by {label}" if label else ""
    lossy = report["relative_error"] > 0 or report["max_rank"] is not None
    err = f", relative error {report['relative_error']:.3e}" if lossy else ""
    print(f"wrote {report['out']}: {terms_text(report['adapters'])}{how}, rank {report['rank']} on "
          f"{report['layers']} layers{err}")
    if lossy:
        width = max(len(n) for n in report["layer_errors"])
        for n, e in report["layer_errors"].items():
            print(f"  {n:<{width}}  rank {report['layer_ranks'][n]:>4}  relative error {e:.3e}")
    return 0


def merge_command(args: argparse.Namespace) -> int:
    """Load the base model, add Σ wᵢ ΔWᵢ (or the method's merge) into its weights, save a merged model folder."""
    from ..delta.apply import apply_adapters
    from ..delta.peft_format import load_terms
    from ..errors import LorasumError
    from ..lm.adapters import check_base, save_merged
    from ..lm.combination import check_combination, merged_name, method_terms

    if not args.adapter:
        raise LorasumError("merge needs at least one --adapter DIR[:W]")
    method, params = method_choice(args)
    out = check_out(args.out, MERGED)
    adapters = load_terms(parse_term(t) for t in args.adapter)
    check_combination(adapters, method)
    lm = load(args)
    fingerprint = check_base(lm, adapters)
    terms = method_terms([a for a, _ in adapters], [w for _, w in adapters], method, params, lm,
                         merged_name(adapters, method, params))
    apply_adapters(lm.model, terms)
    meta = {"base_model": {"id": lm.model_id, "weights_sha256": fingerprint},
            "adapters": [{"name": a.name, "path": a.path, "weight": w} for a, w in adapters],
            "method": method, "params": params}
    save_merged(lm.model, lm.tokenizer, out, meta)
    label = method_label(method, params)
    print(f"wrote {out}: {lm.model_id} + {terms_text(meta['adapters'])}{f' by {label}' if label else ''}")
    return 0


def search_weights_command(args: argparse.Namespace) -> int:
    """Optuna TPE over the adapters' weights on pooled validation perplexity; best.json and OUT/adapter."""
    from ..delta.peft_format import load_terms
    from ..lm.adapters import check_base
    from ..tune.weights import check_search, run_search
    from .args import data_config, expand_domains

    from ..lm.data import check_max_length
    from ..lm.models import check_positions
    from ..lm.train import LIMITS
    from ..schema import check_count

    method, params = method_choice(args)
    check_max_length(args.max_length)
    check_count(args.batch_size, "batch_size", LIMITS["eval_batch_size"])
    adapters = [a for a, _ in load_terms(args.adapters)]
    search = check_search(adapters, method, params, args.trials, args.per_module, args.search_seed)
    out = check_out(args.out, WEIGHT_SEARCH)
    lm = load(args)
    check_positions(lm, args.max_length)  # before the study is created: a refusal leaves no study.db
    check_base(lm, [(a, 1.0) for a in adapters])
    best = run_search(lm, search, expand_domains(args.data), data_config(args), out, args.max_length,
                      args.batch_size, args.loss_on, args.storage)
    weights = ", ".join(f"{k}={v:.3f}" for k, v in best["weights"].items())
    print(f"best trial {best['trial']} of {best['trials']}: validation perplexity {best['value']:.4f} ({weights}); "
          f"wrote {out / 'best.json'} and {out / 'adapter'}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("similarity", help="per-layer cosines and RMS between adapters, from the LoRA factors")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="two or more adapter folders, "
                   "each delta scaled by its weight (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--factors", action="store_true", help="also the similarity of the A row spaces and of the B "
                   "column spaces (mean squared cosine of principal angles; A near 1 means a shared initial A)")
    p.add_argument("--matrix", nargs="+", default=None, metavar="DIR", help="a library of adapters instead: each "
                   "DIR an adapter folder or a folder of them; every pair's --predictor into --out (matrix.csv, "
                   "pairs.csv ranked least interfering first, heatmap.png in cluster order)")
    p.add_argument("--predictor", default=None, choices=PREDICTOR_NAMES, help="with --matrix: the weight-space "
                   "predictor (default rms); pairs.csv ranks the pairs to combine from least to most interfering, "
                   "lowest |value| first (norm ratios: lowest |log value|, the most balanced, first)")
    p.add_argument("--out", default=None, metavar="FOLDER", help="with --matrix (required): the output folder "
                   "(must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="with --matrix: replace a similarity matrix lorasum "
                   "wrote at --out")
    p.set_defaults(parser=p)

    p = sub.add_parser("compose", help="weighted sum (exact) or another merge of adapters, saved as one PEFT "
                       "adapter folder")
    p.add_argument("adapters", nargs="*", metavar="PATH[:WEIGHT]", help="adapter folders, weight defaults to 1")
    add_method_args(p)
    add_model_args(p)  # PEFT's own methods (peft_linear, peft_ties) combine on a loaded model
    p.add_argument("--max-rank", default=None, metavar="K", help="SVD-compress each layer to rank K (dense methods: "
                   "default the sum of the input ranks; K ≥ a layer's smaller dimension is exact)")
    p.add_argument("--out", required=True, help="output adapter folder (must not exist or be empty)")
    p.add_argument("--json", action="store_true", help="print the full report (per-layer errors) as JSON")
    p.set_defaults(parser=p)

    p = sub.add_parser("search-weights", help="Optuna TPE over adapter weights, minimising pooled validation "
                       "perplexity of base + the merge method; writes best.json and the composed adapter")
    p.add_argument("adapters", nargs="*", metavar="PATH", help="two or more adapter folders")
    add_model_args(p)
    add_data_args(p)
    add_method_args(p)
    p.add_argument("--data", action="append", required=True, help="domain whose validation split is pooled; repeat")
    p.add_argument("--trials", type=int, required=True, help="total finished trials (rerun to continue)")
    p.add_argument("--per-module", action="store_true", help="one weight per adapter for attention and one for MLP")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--storage", default=None, metavar="URL", help="SQLAlchemy URL (default: sqlite:///OUT/study.db)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--loss-on", choices=get_args(LossOn), default="all")
    p.add_argument("--out", required=True, help="folder for best.json, study.db and adapter/")
    p.set_defaults(parser=p)

    p = sub.add_parser("merge", help="add weighted adapter deltas into the base weights and save the model")
    add_model_args(p)
    p.add_argument("--adapter", action="append", default=[], metavar="DIR[:W]", help="repeatable")
    add_method_args(p)
    p.add_argument("--out", required=True, help="output model folder (must not exist or be empty)")
    p.set_defaults(parser=p)
