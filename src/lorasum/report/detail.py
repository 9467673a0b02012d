"""The report's detail: per-layer tables (Table 2, each block vs the rest, Table 5, weight space), each section
collapsed behind a one-line summary of its numbers."""

from __future__ import annotations

from .blocks import Note, Section, Table
from .figures import kind_key, split_layer
from .ordering import by_domain, pair_order
from .text import num

L2P1_NEEDS = "a level-2 block + fundamental needs a subset of 3 domains"
HOW = "rows: block index, columns: module, each cell the cosine between the two deltas at that layer (0: orthogonal)"


def layer_table(layers: dict, fmt=lambda v: f"{v:.4f}") -> tuple[list[str], list[list[str]]]:
    """Per-layer values as rows = block index, columns = module (the paper's Table 2 layout)."""
    kinds = sorted({split_layer(n)[1] for n in layers}, key=kind_key)
    idx = sorted({split_layer(n)[0] for n in layers})
    cell = {split_layer(n): v for n, v in layers.items()}
    return ["layer", *kinds], [[str(i), *(fmt(cell[(i, k)]) if (i, k) in cell else "" for k in kinds)] for i in idx]


def absent(cfg: dict, need: int, composition: str | None, what: str) -> Note | None:
    """Why rows formed for subsets of `need` domains (if `composition` is asked for) are missing, or None.

    `what` says in a few words why they need that many domains."""
    n = len(cfg["domains"])
    level = cfg.get("max_level") or n
    if n < need:
        return Note(f"not applicable: {n} domains ({what}).")
    if composition and composition not in cfg["compositions"]:
        return Note(f"skipped: '{composition}' is not in compositions.")
    if level < need:
        return Note(f"skipped: max_level {level} < {need} domains ({what}).")
    return None


def _stats(tables: list[tuple[str, dict]], what: str) -> str:
    """`3 pairs × 6 layers; mean cosine +0.031; largest |cos| 0.210 (alpha vs gamma, h.1.mlp.c_proj)`."""
    vals = [(v, label, layer) for label, layers in tables for layer, v in layers.items()]
    if not vals:
        return "nothing to show"
    big = max(vals, key=lambda x: abs(x[0]))
    per = {len(layers) for _, layers in tables}
    shape = f"{len(tables)} {what}" + (f" × {per.pop()} layers" if len(per) == 1 else f", {len(vals)} layers")
    return (f"{shape}; mean cosine {sum(v for v, _, _ in vals) / len(vals):+.3f}; largest |cos| {abs(big[0]):.3f} "
            f"({big[1]}, {big[2]})")


def _layer_stats(layers: dict) -> str:
    if not layers:
        return "no layers"
    name, v = max(layers.items(), key=lambda kv: abs(kv[1]))
    return f"mean cosine {sum(layers.values()) / len(layers):+.3f}, largest |cos| {abs(v):.3f} at {name}"


def per_layer_sections(r: dict) -> list[Section]:
    """Table 2 (pairs), each block vs the sum of the others, Table 5 (level-2 block vs remaining fundamental)."""
    cfg, out, blocks, seen = r["config"], [], [], []
    for name in pair_order(r):
        p = r["pairs"][name]
        h, rows = layer_table(p["layers"])
        label = " vs ".join(p["domains"]) if "domains" in p else name.replace("|", " vs ")
        seen.append((label, p["layers"]))
        blocks.append(Table(h, rows, f"{label} (RMS {p['rms']:.4f}; {_layer_stats(p['layers'])}): {HOW}."))
    out.append(Section("Table 2 — per-layer cosine similarity of fundamental blocks", blocks,
                       summary=_stats(seen, "pairs")))
    triples = [c for c in r["compositions"] if c["level"] >= 3]
    blocks, seen = [n for n in (absent(cfg, 3, None, "each block vs the other two needs a subset of 3 domains"),)
                    if n], []
    for c in triples:
        bvr = c.get("block_vs_rest", {})
        for d in by_domain(r, bvr):
            v = bvr[d]
            if isinstance(v, dict):
                h, rows = layer_table(v["layers"])
                rest = " + ".join(x for x in c["subset"] if x != d)
                seen.append((f"{d} vs {rest}", v["layers"]))
                blocks.append(Table(h, rows, f"{d} block vs the sum ({rest}) (RMS {v['rms']:.4f}; RMS over all "
                                             f"block pairs of {' + '.join(c['subset'])}: {c['rms']:.4f}): {HOW}."))
            else:  # results.json written before per-layer cosines were kept
                blocks.append(Note(f"{d} block vs the sum of the others: RMS {v:.4f} (no per-layer values)."))
    out.append(Section("Each fundamental block vs the sum of the others", blocks,
                       summary=_stats(seen, "blocks") if seen else _note_text(blocks)))
    blocks, seen = [n for n in (absent(cfg, 3, "level2_plus_one", L2P1_NEEDS),) if n], []
    null = next((p["null"]["mean"] for p in r["pairs"].values() if "null" in p), None)
    for c in [c for c in triples if c["level"] == 3]:
        l2p1 = c.get("level2_plus_one", {})
        for d in by_domain(r, l2p1):
            h, rows = layer_table(l2p1[d]["layers"])
            ref = (r.get("references") or {}).get(d, {})
            ceil = ref.get("split", ref.get("seeds"))
            seen.append((f"({l2p1[d]['level2']}) vs {d}", l2p1[d]["layers"]))
            blocks.append(Table(h, rows, f"({l2p1[d]['level2']}) block vs {d} block (RMS {l2p1[d]['rms']:.4f}"
                                + ("" if null is None else f"; random null of these shapes {null:.4f}")
                                + ("" if ceil is None else f"; {d}'s same-domain ceiling {ceil:.4f}") + f"): {HOW}."))
    out.append(Section("Table 5 — per-layer cosine, level-2 block vs remaining fundamental", blocks,
                       summary=_stats(seen, "compositions") if seen else _note_text(blocks)))
    return out


def _note_text(blocks: list) -> str:
    return " ".join(b.text for b in blocks if isinstance(b, Note)) or "nothing to show"


def weight_space_section(r: dict) -> list[Section]:
    comps = r["compositions"]
    rows = [[" + ".join(c["subset"]), f"{c['weight_space']['mean_cos']:.4f}", f"{c['weight_space']['rms']:.4f}",
             f"{c['weight_space']['norm_ratio']:.3f}"] for c in comps]
    blocks: list = [Table(["subset", "mean cos(Σ, merged)", "RMS cos", "‖Σ‖/‖merged‖"], rows,
                          "How close the summed deltas are to the delta trained on merged data: cosine 1 and norm "
                          "ratio 1 would be the same update (mean and RMS of the cosine over layers; norm ratio over "
                          "all layers).")]
    for c in comps:
        h, rows = layer_table(c["weight_space"]["layers"], lambda v: f"{v['cos']:.3f} / {num(v.get('norm_ratio'), 3)}")
        blocks.append(Table(h, rows, f"{' + '.join(c['subset'])}: each cell is cos(Σ blocks, merged block) / "
                                     "‖Σ‖/‖merged‖ at that layer (rows: block index, columns: module)."))
    cos = [c["weight_space"]["mean_cos"] for c in comps]
    ratio = [c["weight_space"]["norm_ratio"] for c in comps]
    summary = (f"{len(comps)} compositions; mean cos(Σ, merged) {min(cos):.3f} to {max(cos):.3f}; ‖Σ‖/‖merged‖ "
               f"{min(ratio):.2f} to {max(ratio):.2f}") if comps else "no compositions"
    return [Section("Weight space — Σ fundamentals vs the merged-data block", blocks, summary=summary)]
