"""The report's figures as PNG bytes: RMS vs %Δ perplexity (paper Fig. 1), per-layer cosine heatmap, perplexity bars."""

from __future__ import annotations

import io
import re

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def split_layer(name: str) -> tuple[int, str]:
    """`transformer.h.3.attn.c_attn` -> (3, 'attn.c_attn'); `model.layers.0.self_attn.q_proj` -> (0, 'self_attn.q_proj')."""
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(m.group(1)), m.group(2)) if m else (0, name)


def rms_scatter(results: dict) -> bytes:
    """Each pair (and seed) as a point; least-squares line with its pointwise confidence band."""
    from .stats import fit_band

    plt = _plt()
    fit = results["fit"]
    pts = np.array(fit["points"], float).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    pairs = [r for r in results["compositions"] if r["level"] == 2 and "pct_change" in r]
    for r in pairs:
        ax.errorbar(r["rms"], r["pct_change"]["mean"], yerr=[[r["pct_change"]["mean"] - r["pct_change"]["ci"][0]],
                                                             [r["pct_change"]["ci"][1] - r["pct_change"]["mean"]]],
                    fmt="o", capsize=4)
        ax.annotate(" + ".join(r["subset"]), (r["rms"], r["pct_change"]["mean"]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    if len(pts) > len(pairs):
        ax.scatter(pts[:, 0], pts[:, 1], s=12, color="grey", alpha=0.6, label="per seed")
    if fit.get("slope") is not None:
        xs = np.linspace(pts[:, 0].min(), pts[:, 0].max(), 50)
        lo, hi = fit_band(fit, xs, pts[:, 0].tolist(), fit.get("level", 0.95))
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="C3",
                label=f"fit: y = {fit['slope']:.1f}x {fit['intercept']:+.1f} (r² {fit['r2']:.2f})")
        if fit.get("slope_ci"):
            ax.fill_between(xs, lo, hi, color="C3", alpha=0.15, label=f"{int(100 * fit['level'])}% band")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("RMS of per-layer cosine similarity")
    ax.set_ylabel("% change in perplexity (summed vs merged)")
    ax.set_title("RMS similarity vs perplexity change (pairs)")
    if ax.get_legend_handles_labels()[0]:  # no fit and one seed (e.g. two domains): nothing to label
        ax.legend(fontsize=8)
    return _png(fig)


def cosine_heatmap(results: dict) -> bytes:
    """Rows: pairs of fundamental blocks; columns: layers (grouped by module); colour: cosine."""
    plt = _plt()
    pairs = results["pairs"]
    labels = list(pairs)
    layers = sorted(next(iter(pairs.values()))["layers"], key=lambda n: (split_layer(n)[1], split_layer(n)[0]))
    data = np.array([[pairs[p]["layers"][n] for n in layers] for p in labels])
    lim = max(float(np.abs(data).max()), 1e-6)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.18 * len(layers)), 1 + 0.5 * len(labels)))
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_yticks(range(len(labels)), [p.replace("|", " / ") for p in labels], fontsize=8)
    kinds = [split_layer(n)[1] for n in layers]
    starts = [i for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    ends = starts[1:] + [len(kinds)]
    ax.set_xticks([(a + b - 1) / 2 for a, b in zip(starts, ends)], [kinds[i] for i in starts], fontsize=8)
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="black", lw=0.6)
    ax.set_xlabel("layers (by module, then depth)")
    fig.colorbar(im, ax=ax, label="cosine")
    ax.set_title("Per-layer cosine similarity between fundamental blocks")
    return _png(fig)


def perplexity_bars(results: dict) -> bytes:
    """Perplexity of base, fundamentals, merged and summed models on each domain, with CIs."""
    plt = _plt()
    doms = results["config"]["domains"]
    mat = results["perplexity"]
    full = "+".join(doms)
    order = ["base"] + [f"adapter[{d}]" for d in doms]
    order += [m for m in (f"adapter[{full}]", f"sum[{full}]", f"mean[{full}]") if m in mat]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(doms) * len(order) / 3), 4))
    width = 0.8 / len(order)
    for i, m in enumerate(order):
        means = [mat[m][d]["mean"] for d in doms]
        err = np.array([[mat[m][d]["mean"] - mat[m][d]["ci"][0] for d in doms],
                        [mat[m][d]["ci"][1] - mat[m][d]["mean"] for d in doms]])
        ax.bar(np.arange(len(doms)) + i * width, means, width, yerr=err, capsize=2, label=m)
    ax.set_xticks(np.arange(len(doms)) + 0.4 - width / 2, doms)
    ax.set_ylabel("test perplexity")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("Per-domain perplexity")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


FIGURES = {"rms_vs_pct_change": rms_scatter, "cosine_heatmap": cosine_heatmap, "perplexity_bars": perplexity_bars}
