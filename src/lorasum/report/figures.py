"""The report's figures as PNG bytes: RMS vs %Δ perplexity (paper Fig. 1), per-layer cosine heatmap, perplexity bars,
the unlearning curve; and each figure's alt text and caption (`figure_text`)."""

from __future__ import annotations

import re

import numpy as np
from matplotlib.ticker import LogFormatter, ScalarFormatter

from ..charts import png, pyplot
from ..stats import fit_band
from .ordering import find_model, pair_order
from .methods import method_label, ranked
from .paper import FIT
from .routing import ORACLE_LABEL, oracle_of
from .forecast import forecast_figure, forecast_figure_text


def split_layer(name: str) -> tuple[int, str]:
    """`transformer.h.3.attn.c_attn` -> (3, 'attn.c_attn'); `model.layers.0.self_attn.q_proj` -> (0, 'self_attn.q_proj')."""
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


# modules in the order a transformer block runs them (GPT-2, Llama family); others sort by name after these
_BLOCK_ORDER = ("c_attn", "q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "gate_proj", "up_proj", "c_proj", "down_proj")


def kind_key(kind: str) -> tuple:
    """Attention modules before MLP ones (the paper's Table 2 column order), each in the order the block runs them."""
    leaf = kind.rsplit(".", 1)[-1]
    return ("mlp" in kind or leaf in ("c_fc", "gate_proj", "up_proj", "down_proj"),
            _BLOCK_ORDER.index(leaf) if leaf in _BLOCK_ORDER else len(_BLOCK_ORDER), kind)


def _fit_line(ax, fit: dict, xs_data: list[float], level: int) -> None:
    """The least-squares line across the current x view, with its pointwise confidence band where the fit has one."""
    xs = np.linspace(*ax.get_xlim(), 60)
    sign = "+" if fit["intercept"] >= 0 else "−"
    ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="C3", zorder=1,
            label=f"least squares over {fit['n']} pairs: y = {fit['slope']:.1f}x {sign} {abs(fit['intercept']):.1f}"
                  f" (r² {fit['r2']:.2f})")
    if fit.get("slope_ci"):
        lo, hi = fit_band(fit, xs, xs_data, fit.get("level", 0.95))
        # the band of a fit on very few points can dwarf the data: clip the view to the data (+ margin)
        ax.fill_between(xs, lo, hi, color="C3", alpha=0.15, zorder=0,
                        label=f"{level}% confidence band of the line (clipped to the view)")


def rms_scatter(results: dict) -> bytes:
    """Each pair as a point (mean over seeds, %Δ CI as error bar), the per-seed points in grey, and the
    least-squares line over the pair means with its pointwise confidence band."""
    plt = pyplot()
    fit = results["fit"]
    pts = np.array(fit["points"], float).reshape(-1, 2)
    per_seed = np.array(fit.get("points_per_seed") or [], float).reshape(-1, 2)
    if not fit.get("pairs") and len(pts):  # results.json from before the fit over pair means: its points are per seed
        per_seed = pts
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if len(per_seed) > len(pts) or (len(per_seed) and not fit.get("pairs")):
        ax.scatter(per_seed[:, 0], per_seed[:, 1], s=14, color="grey", alpha=0.6, label="per seed (shown, not fitted)",
                   zorder=2)
    rows = {"|".join(r["subset"]): r for r in results["compositions"] if r["level"] == 2 and "pct_change" in r}
    mid = float(np.mean(pts[:, 0])) if len(pts) else 0.0
    level = int(100 * fit.get("level", 0.95))
    groups = fit.get("groups") or ["pair"] * len(pts)  # schema 2: within one parent domain / across parents
    colours = {g: f"C{k}" for k, g in enumerate(dict.fromkeys(sorted(groups)))} if len(set(groups)) > 1 else {}
    seen: set = set()
    for i, ((x, y), name, group) in enumerate(zip(pts, fit.get("pairs") or [], groups)):
        ci = rows[name]["pct_change"]["ci"] if name in rows else [y, y]
        colour = colours.get(group, "C0")
        label = (f"{group} (mean over seeds), {level}% CI of %Δ" if colours else
                 f"pair (mean over seeds), {level}% CI of %Δ") if group not in seen else None
        seen.add(group)
        ax.errorbar(x, y, yerr=[[y - ci[0]], [ci[1] - y]], fmt="o", color=colour, ecolor=colour, capsize=4,
                    zorder=3, label=label)
        right = x > mid  # labels point inwards, so none runs off the axes
        if len(pts) > 6:  # many pairs: names would cover the points (the tables name them)
            continue
        label = " + ".join(results["pairs"].get(name, {}).get("domains") or name.split("|"))  # schema 1: no domains
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-7 if right else 7, 6),
                    ha="right" if right else "left", fontsize=8)
    if len(pts):
        allx = np.concatenate([pts[:, 0], per_seed[:, 0]]) if len(per_seed) else pts[:, 0]
        pad = 0.12 * max(float(np.ptp(allx)), 1e-3)
        ax.set_xlim(allx.min() - pad, allx.max() + pad)
    if fit.get("slope") is not None:
        _fit_line(ax, fit, pts[:, 0].tolist(), level)
    ys = np.concatenate([pts[:, 1], per_seed[:, 1] if len(per_seed) else pts[:, 1],
                         [c for r in rows.values() for c in r["pct_change"]["ci"]], [0.0]])
    span = max(float(np.ptp(ys)), 1.0)
    ax.set_ylim(ys.min() - 0.35 * span, ys.max() + 0.35 * span)
    ax.axhline(0, color="black", lw=0.5)
    _references(ax, results)
    lo, hi = ax.get_xlim()
    for ann in ax.texts:  # labels point inwards in the final view, so none runs off the axes
        right = ann.xy[0] > (lo + hi) / 2
        ann.set_horizontalalignment("right" if right else "left")
        ann.xyann = (-7 if right else 7, 6)
    ax.set_xlabel("RMS of per-layer cosine similarity (fundamental blocks)")
    ax.set_ylabel("% change in perplexity (summed vs merged)")
    ax.set_title("RMS similarity vs perplexity change (pairs)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    return png(fig)


def _references(ax, results: dict) -> None:
    """Vertical lines at the random null and at the same-domain ceilings, so each pair's RMS reads between them."""
    nulls = [p["null"]["mean"] for p in results.get("pairs", {}).values() if "null" in p]
    ceilings = sorted({p["ceiling"] for p in results.get("pairs", {}).values() if p.get("ceiling") is not None})
    lo, hi = ax.get_xlim()
    if nulls:
        x = float(np.mean(nulls))
        ax.axvline(x, color="grey", ls=":", lw=1, label=f"random null ({x:.4f})")
        lo = min(lo, x)
    if len(ceilings) > 3:  # one band for many pairs' ceilings
        ax.axvspan(ceilings[0], ceilings[-1], color="C2", alpha=0.15,
                   label=f"same-domain ceilings of the pairs ({ceilings[0]:.4f}–{ceilings[-1]:.4f})")
        hi = max(hi, ceilings[-1])
    for i, c in enumerate(ceilings if len(ceilings) <= 3 else []):
        ax.axvline(c, color="C2", ls="--", lw=1, label="same-domain ceilings of the pairs" if i == 0 else None)
        hi = max(hi, c)
    pad = 0.04 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)


def cosine_heatmap(results: dict) -> bytes:
    """Rows: pairs of fundamental blocks; columns: layers (grouped by module, then depth); colour: cosine."""
    plt = pyplot()
    pairs = results["pairs"]
    labels = pair_order(results)
    layers = sorted(pairs[labels[0]]["layers"], key=lambda n: (kind_key(split_layer(n)[1]), split_layer(n)[0]))
    data = np.array([[pairs[p]["layers"][n] for n in layers] for p in labels])
    kinds = [split_layer(n)[1] for n in layers]
    starts = [i for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    ends = starts[1:] + [len(kinds)]
    fig, ax = plt.subplots(figsize=(min(14, max(6.5, 2.5 + 0.22 * len(layers))), 1.6 + 0.45 * len(labels)))
    lim = max(float(np.abs(data).max()), 1e-6)  # symmetric around 0 (white); real cosines are often ~0.05
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(labels)), [" / ".join(pairs[p].get("domains") or [p]) for p in labels], fontsize=8)
    short = [k.split(".")[-1] for k in kinds]  # self_attn.q_proj -> q_proj, unless that is ambiguous
    if len({short[i] for i in starts}) < len(starts):
        short = kinds
    ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)], [short[i] for i in starts], fontsize=8,
                  rotation=30 if len(starts) > 4 else 0, ha="right" if len(starts) > 4 else "center")
    for st in starts[1:]:
        ax.axvline(st - 0.5, color="black", lw=0.8)
    if len(layers) <= 40 and len(labels) <= 12:  # small grids: print the value in each cell
        for i in range(len(labels)):
            for j in range(len(layers)):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(data[i, j]) > 0.6 * lim else "black")
    if len(layers) <= 60:  # the depth of every column on the top axis
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(len(layers)), [str(split_layer(n)[0]) for n in layers], fontsize=6)
        top.set_xlabel("layer index", fontsize=8)
    ax.set_xlabel("module (columns grouped by module, depth increasing to the right)")
    fig.colorbar(im, ax=ax, label="cosine", fraction=0.04, pad=0.02)
    ax.set_title("Per-layer cosine similarity between fundamental blocks")
    return png(fig)


def perplexity_bars(results: dict) -> bytes:
    """Perplexity of base, fundamentals, merged and summed models on each domain, with CIs.

    A linear axis when all values lie within a factor of 10 (a log axis would label no tick); otherwise a log
    axis with its minor ticks labelled. The legend sits above the plot, never over a bar.
    """
    plt = pyplot()
    doms = results["config"]["domains"]
    mat = results["perplexity"]
    wanted = [("base", []), *(("adapter", [d]) for d in doms), ("adapter", doms), ("sum", doms), ("mean", doms)]
    order = [m for m in (find_model(results, kind, subset) for kind, subset in wanted)
             if m in mat and all(d in mat[m] for d in doms)]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.28 * len(doms) * len(order) + 1.5), 4.2))
    width = 0.8 / len(order)
    colors = plt.get_cmap("tab10" if len(order) <= 10 else "tab20").colors
    lows, highs = [], []
    for i, m in enumerate(order):
        means = [mat[m][d]["mean"] for d in doms]
        lo = [mat[m][d]["ci"][0] for d in doms]
        hi = [mat[m][d]["ci"][1] for d in doms]
        lows += lo
        highs += hi
        err = np.array([[a - b for a, b in zip(means, lo)], [b - a for a, b in zip(means, hi)]])
        ax.bar(np.arange(len(doms)) + i * width, means, width, yerr=err, capsize=2, label=m,
               color=colors[i % len(colors)], edgecolor="white", linewidth=0.5)
    ax.set_xticks(np.arange(len(doms)) + 0.4 - width / 2, doms)
    ax.set_ylabel("test perplexity")
    top, bottom = max(highs), min(lows)
    if top / max(bottom, 1e-12) >= 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.tick_params(axis="y", which="both", labelsize=8)
    else:  # bars start at 0, so their lengths compare honestly
        ax.set_ylim(0, top * 1.05)
    ax.grid(axis="y", color="#ddd", lw=0.6)
    ax.set_axisbelow(True)
    level = int(100 * results["config"].get("ci_level", 0.95))
    ax.set_title(f"Per-domain test perplexity (error bars: {level}% CI)", pad=8)
    ax.legend(fontsize=7, ncol=min(4, len(order)), loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    return png(fig)


def unlearning_curve(results: dict) -> bytes:
    """Forgetting vs retention over the subtraction weight λ, one line per removed domain (validation split):
    x = the worst other domain's perplexity relative to before removal (the retention rule is per domain), y = the
    removed domain's perplexity relative
    to the model trained without it (1 = forgotten as if never trained). The chosen λ is ringed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, u in enumerate(results["unlearning"]):
        before, target = u["validation_reference"]["before"], u["validation_reference"]["without"]
        xs = [max(s["validation_others"][o] / before[o] for o in before) for s in u["sweep"]]
        ys = [s["validation_removed"] / target for s in u["sweep"]]
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{u['removed']} removed")
        for s, x, y in zip(u["sweep"], xs, ys):
            ax.annotate(f"λ={s['weight']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
            if s["weight"] == u["chosen"]["weight"]:
                ax.scatter([x], [y], s=140, facecolors="none", edgecolors=f"C{i}", linewidths=1.5, zorder=3)
    tol = 1 + results["config"].get("retention_tolerance", 0.05)
    ax.axvline(tol, color="grey", ls=":", lw=1, label=f"retention limit (1 + δ = {tol:g})")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xlabel("worst other domain: perplexity / perplexity before removal (validation)")
    ax.set_ylabel("removed domain: perplexity / model trained without it")
    ax.set_title("Unlearning: forgetting vs retention over λ (chosen λ ringed)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return png(fig)


def method_ranking(results: dict) -> bytes:
    """One panel per subset: every composition's %Δ perplexity vs merged on test with its CI, ranked by validation
    perplexity (best at the top, in red: the one chosen on validation)."""
    plt = pyplot()
    rows = [c for c in results["compositions"] if c.get("method_choice")]
    n = max(len(ranked(rows[0])), 1) + 1
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 0.9 + (0.28 * n + 0.6) * len(rows)), squeeze=False)
    for ax, c in zip(axes[:, 0], rows):
        items = ranked(c)
        oracle = oracle_of(results, c["subset"])
        ys = np.arange(len(items))[::-1] + (oracle is not None)
        for y, (name, _, change, _) in zip(ys, items):
            colour = "C3" if name == c["method_choice"]["best"] else ("C0" if name != "sum" else "black")
            m, (lo, hi) = change["mean"], change["ci"]
            ax.errorbar(m, y, xerr=[[m - lo], [hi - m]], fmt="o", color=colour, capsize=3)
        labels = [method_label(name, c.get("baselines", {}).get(name)) for name, *_ in items]
        if oracle is not None:  # a reference, not a candidate: it needs each example's domain
            m, (lo, hi) = oracle["pct_change"]["mean"], oracle["pct_change"]["ci"]
            ax.errorbar(m, 0, xerr=[[m - lo], [hi - m]], fmt="D", color="grey", capsize=3)
            ys, labels = np.append(ys, 0), labels + [ORACLE_LABEL]
        ax.set_yticks(ys, labels, fontsize=7)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_title(" + ".join(c["subset"]), fontsize=9)
    axes[-1, 0].set_xlabel("% change in test perplexity vs the merged-data block (CI)")
    fig.suptitle("Merge methods ranked by validation perplexity (best on top, red; grey: the oracle router)",
                 fontsize=10)
    fig.tight_layout()
    return png(fig)


FIGURES = {"rms_vs_pct_change": rms_scatter, "cosine_heatmap": cosine_heatmap, "perplexity_bars": perplexity_bars,
           "unlearning_curve": unlearning_curve, "method_ranking": method_ranking, "forecast": forecast_figure}


def available(results: dict) -> list[str]:
    """The figures this results file can draw (the unlearning curve needs the λ sweep of schema 2)."""
    sweep = any("sweep" in u for u in results.get("unlearning", []))
    methods = any(c.get("method_choice") for c in results.get("compositions", []))
    return [n for n in FIGURES if (n != "unlearning_curve" or sweep) and (n != "method_ranking" or methods)
            and (n != "forecast" or bool(results.get("forecast", {}).get("predictors")))]


def _fit_text(results: dict) -> str:
    fit = results["fit"]
    if fit.get("slope") is None:
        return "Too few points for a fit."
    unit = "pairs (each the mean over seeds)" if len(results["config"]["seeds"]) > 1 else "pairs"
    return (f"Fit over {fit['n']} {unit}: y = {fit['slope']:.2f}x {fit['intercept']:+.2f}, r² {fit['r2']:.3f}"
            + (f", slope CI [{fit['slope_ci'][0]:.1f}, {fit['slope_ci'][1]:.1f}]." if fit.get("slope_ci")
               else ", too few points for a slope CI."))


def _span(xs: list[float], fmt: str) -> str:
    return "none" if not xs else fmt.format(xs[0]) if min(xs) == max(xs) else \
        f"{fmt.format(min(xs))} to {fmt.format(max(xs))}"


def figure_text(results: dict, name: str) -> tuple[str, str]:
    """(alt text, caption) of a report figure: what it shows, with its numbers, and how to read it."""
    level = int(100 * results["config"].get("ci_level", 0.95))
    if name == "forecast":
        return forecast_figure_text(results)
    if name == "rms_vs_pct_change":
        rows = [c for c in results["compositions"] if c["level"] == 2 and "pct_change" in c]
        pts = "; ".join(f"{' + '.join(c['subset'])}: RMS {results['pairs'].get('|'.join(c['subset']), c)['rms']:.4f}"
                        f", {c['pct_change']['mean']:+.1f}%" for c in rows)
        nulls = [p["null"]["mean"] for p in results["pairs"].values() if "null" in p]
        ceils = [p["ceiling"] for p in results["pairs"].values() if p.get("ceiling") is not None]
        return (f"Scatter of % change in perplexity (summed vs merged) against RMS cosine similarity for {len(rows)} "
                f"pairs ({pts or 'none'}); random null RMS {_span(nulls, '{:.4f}')}, same-domain ceilings "
                f"{_span(ceils, '{:.4f}')}.",
                f"Headline: each point is a pair of fundamental blocks; x = how similar their deltas are (RMS of the "
                f"per-layer cosines), y = how much worse (above 0) or better (below 0) their sum does than the "
                f"block trained on the pair's merged data, with its {level}% CI. Dotted line: the RMS of two unrelated "
                f"random deltas; dashed: the RMS of two adapters of the same domain. {_fit_text(results)} Paper (GPT-2 small, their "
                f"data): {FIT}.")
    if name == "perplexity_bars":
        return ("Grouped bar chart of test perplexity per domain for the base model, each fundamental block, the "
                "block trained on all domains' merged data, their sum and their mean, with confidence intervals.",
                f"Lower is better. Per domain, compare the sum with the merged-data block and with that domain's own "
                f"block; error bars: {level}% CI.")
    if name == "cosine_heatmap":
        pairs = results["pairs"]
        vals = [v for p in pairs.values() for v in p["layers"].values()]
        return (f"Heatmap of the cosine similarity between the deltas of {len(pairs)} pairs of fundamental blocks at "
                f"each of {max((len(p['layers']) for p in pairs.values()), default=0)} layers; cosines "
                f"{_span(vals, '{:+.2f}')}.",
                "One row per pair, one column per layer (grouped by module, deeper to the right). White: "
                "orthogonal (cosine 0); red: the deltas point the same way; blue: opposite ways.")
    if name == "unlearning_curve":
        return ("Line chart, one line per removed domain, of forgetting against retention as the subtraction "
                "weight λ grows, on the validation split; the chosen λ is ringed.",
                "y = 1: the removed domain is forgotten as if never trained; left of the dotted line: every other "
                "domain keeps its perplexity within the tolerance. The ringed λ is the one chosen on validation.")
    if name == "method_ranking":
        best = "; ".join(f"{' + '.join(c['subset'])}: {c['method_choice']['best']}" for c in results["compositions"]
                         if c.get("method_choice"))
        return (f"Per subset, every merge method's % change in test perplexity vs the merged-data block with its "
                f"{level}% CI, ranked by validation perplexity; best on validation — {best}.",
                "Each row is a composition of the subset's blocks, top = lowest validation perplexity (red: the one "
                "chosen on validation; black: the exact sum). Left of 0: better than the merged-data block. The "
                "choice never looks at test; the test CI shows whether it holds there. The grey diamond at the "
                "bottom is the oracle router (each domain's examples served by its own block): a reference, not a "
                "candidate, since it needs each example's domain.")
    return name.replace("_", " "), name.replace("_", " ")
