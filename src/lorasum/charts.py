"""Matplotlib on the Agg backend, PNG bytes out, and the two charts drawn from plain numbers that both the tuning
summary and the experiment report show (optimisation history, parameter importances); the heatmap of a matrix
of adapter pairs."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, TwoSlopeNorm  # noqa: E402


def value_text(v) -> str:
    """A tuning parameter's value as the tables beside a study and in the report print it (6 significant digits)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (no timestamp or software tag, so the same figure gives the same bytes); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def history_png(history: list[list], title: str) -> bytes:
    """Value per trial (dots: complete, crosses: pruned at their last reported value) and the best so far."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        pts = [(n, v) for n, s, v in history if s == state and v is not None]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=state.lower(), zorder=3)
    best, line = math.inf, []
    for n, s, v in sorted(history):
        if s == "COMPLETE" and v is not None:
            best = min(best, v)
        if math.isfinite(best):
            line.append((n, best))
    if line:
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    if history:
        ax.legend(fontsize=8)
    return png(fig)


def importance_png(imp: dict | None, note: str, title: str) -> bytes:
    """Horizontal bars of normalised importances, or `note` where there are none."""
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(len(imp or {}), 2)))
    if imp:
        names = sorted(imp, key=imp.get)
        ax.barh(names, [imp[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=9)
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return png(fig)


def heatmap_png(matrix: list[list[float]], labels: list[str], title: str, label: str, signed: bool = False,
                log: bool = False) -> bytes:
    """A square matrix as a heatmap with a colourbar titled `label`, rows and columns named by `labels` (ticks
    left out past 60 names). `signed`: a diverging scale centred on 0; `log`: a logarithmic scale (positive
    values). Non-finite cells (inf) are drawn grey."""
    m = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    n = len(labels)
    side = min(3.5 + 0.16 * n, 22.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    cmap = plt.get_cmap("RdBu_r" if signed else "viridis").with_extremes(bad="lightgrey")
    finite = m.compressed()
    norm = None
    if log and finite.size and finite.min() > 0 and finite.max() > finite.min():
        norm = LogNorm(vmin=finite.min(), vmax=finite.max())
    elif signed:
        top = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-12)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top)
    img = ax.imshow(m, cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04, label=label)
    if n <= 60:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    return png(fig)
