"""Matplotlib on the Agg backend, PNG bytes out, and the two charts drawn from plain numbers that both the tuning
summary and the experiment report show (optimisation history, parameter importances)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


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
